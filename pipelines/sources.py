"""Image sources: directories (recursive), .tar/.tar.gz/.tgz/.zip archives and Parquet files
with an `image` column, local or s3://, and glob patterns of these.

plan() cuts the inputs into Units, small slices that one task reads on its own: a local
folder's files in slices (named by their first and last file, listed again by the task), an
S3 prefix's objects a listing page at a time (named by the keys around it, listed again by the
task), a local tar's or a zip's members in chunks (found from the
headers, so one huge archive is read by many tasks at once), a Parquet file's row groups. A
compressed tar (or a tar on S3) can only be read front to back, so it is one streaming unit
that yields its members a few at a time. Each tar of a sharded set (SHARDED_TARS or more local
tars) is one unit too, its shards being the tasks already: the plan then holds a unit per
shard, not an item per member, and reads no header; the task reads each header as it reaches
its member.
read_unit() yields Records; nothing is ever extracted onto disk."""

from __future__ import annotations

import posixpath
import tarfile
import zipfile
import zlib
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import archives, names, storage
from .listing import plan_folders, plan_pages, read_folder, read_page, read_paths, slice_holds
from .units import Record, Unit, chunks, file_record

PARQUET_SUFFIXES = (".parquet", ".pq")


def input_kind(uri: str) -> str:
    low = uri.lower()
    if low.endswith((".tar.gz", ".tgz")) or (low.endswith(".tar") and storage.is_s3(uri)):
        return "tarstream"
    if low.endswith(".tar"):
        return "tar"
    if low.endswith(".zip"):
        return "zip"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "dir" if storage.is_dir(uri) else "file"


SHARDED_TARS = 16  # local tars at least this many: a unit each, read front to back


def plan(inputs: list[str], chunk: int = 1000) -> list[Unit]:
    """Units covering every input; fails fast when an input does not exist."""
    uris: list[str] = []
    for pattern in inputs:
        found = storage.expand(pattern)
        if not found:
            raise storage.StorageError(f"{pattern}: the pattern matches nothing")
        for uri in found:
            if not storage.exists(uri):
                raise storage.StorageError(f"{uri}: not found")
            uris.append(uri)
    sharded = sum(input_kind(u) == "tar" for u in uris) >= SHARDED_TARS
    return [unit for uri in uris for unit in _plan_one(uri, chunk, sharded)]


def _stamp(uri: str) -> tuple:
    i = storage.info(uri)
    return i.size, i.mtime_ns


def unit_paths(unit: Unit) -> list[str] | None:
    """Every path a unit yields when it is known without reading it, else None."""
    if unit.kind in ("files", "tar", "zip"):
        return [item[0] for item in unit.items]
    if unit.kind == "broken":
        return [""]
    return None  # folders, parquet and whole tars only learn their paths as they read


def count_known(units: list[Unit]) -> int | None:
    """How many rows the units hold, when every unit knows without reading."""
    total = 0
    for unit in units:
        if unit.kind in ("folder", "s3page"):
            total += unit.items[3]
            continue
        paths = unit_paths(unit)
        if paths is None:
            return None
        total += len(paths)
    return total


def estimated_rows(units: list[Unit]) -> float:
    """How many rows the units hold, estimated where count_known cannot say, for choosing
    where a job runs: a sharded set of tars from its first shard's members per byte (its
    headers read); inf where nothing tells (Parquet, compressed tars)."""
    known = count_known(units)
    if known is not None:
        return known
    shards = [u for u in units if u.kind == "tarshard"]
    if len(shards) != sum(u.kind not in ("files", "folder", "s3page", "tar", "zip", "broken")
                          for u in units):
        return float("inf")
    rest = count_known([u for u in units if u.kind != "tarshard"]) or 0
    with storage.open_input(shards[0].source) as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:", tarinfo=archives.CheckedTarInfo)
            members = sum(1 for _ in archives.iter_tar(tar))
        except tarfile.TarError:
            return float("inf")
    per_byte = members / max(1, shards[0].stamp[0] or 1)
    return rest + per_byte * sum(u.stamp[0] or 0 for u in shards)


def _plan_one(uri: str, chunk: int, sharded: bool = False) -> list[Unit]:
    kind = input_kind(uri)
    if kind in ("tarstream", "tar", "zip", "parquet"):
        units, stamp = _plan_file(uri, kind, chunk, sharded), _stamp(uri)
        for unit in units:
            unit.stamp = stamp
        return units
    if kind == "dir":
        return plan_pages(uri, chunk) if storage.is_s3(uri) else plan_folders(uri, chunk)
    if kind == "file":
        i = storage.info(uri)
        error = None if i.type == pafs.FileType.File else \
            "not_a_file: device, fifo, socket or other special file"
        return [Unit(uri, "files", [(names.text(posixpath.basename(uri)), uri, i.size, error)])]
    raise AssertionError(kind)


def _plan_file(uri: str, kind: str, chunk: int, sharded: bool) -> list[Unit]:
    """The units of an archive or a Parquet file."""
    if kind == "tarstream":
        return [Unit(uri, "tarstream")]
    if kind == "tar" and sharded:
        return [Unit(uri, "tarshard")]
    if kind == "parquet":
        return _plan_parquet(uri)
    with storage.open_input(uri) as f:
        if kind == "tar":
            try:
                tar = tarfile.open(fileobj=f, mode="r:", tarinfo=archives.CheckedTarInfo)
            except tarfile.TarError as e:
                return [Unit(uri, "broken", [str(e)])]
            return chunks(uri, "tar", archives.scan_tar(tar), chunk)
        try:
            with archives.open_zip(f) as zf:
                count = names.Counter()
                entries = [(count.key(archives.zip_name(i)), n) for n, i in enumerate(zf.infolist())
                           if not i.is_dir()]
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            return [Unit(uri, "broken", [str(e)])]
        return chunks(uri, "zip", entries, chunk)


def _plan_parquet(uri: str) -> list[Unit]:
    try:
        with storage.open_input(uri) as f:
            pf = pq.ParquetFile(f)
            groups, cols = pf.num_row_groups, pf.schema_arrow.names
            key = parquet_key(cols)
            repeats = _repeated_keys(pf, key) if key else {}
    except (pa.ArrowException, OSError) as e:
        return [Unit(uri, "broken", [str(e)])]
    if "image" not in cols:
        raise storage.StorageError(f"{uri}: Parquet input needs an 'image' column (encoded "
                                   f"image bytes); it has {', '.join(cols)}")
    units = chunks(uri, "parquet", list(range(groups)), 1)
    for unit, before in zip(units, repeats.get("before", []), strict=False):
        unit.repeats = before
    return units


def parquet_key(columns: list[str]) -> str | None:
    return "path" if "path" in columns else "id" if "id" in columns else None


def _repeated_keys(pf: pq.ParquetFile, key: str) -> dict:
    """{"before": for each row group, {key: its rows in earlier groups} for the keys of the
    group that occur more than once in the file} (empty, mostly: then {}). Only the key
    column is read; the dicts hold at most the rows of repeated keys."""
    import pyarrow.compute as pc

    col = pf.read(columns=[key]).column(key)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or \
            pa.types.is_integer(col.type):  # their text is Arrow's and Python's alike
        counts = pc.value_counts(col.drop_null()).to_pylist()
        repeated = {key_text(v["values"]) for v in counts if v["counts"] > 1}
    else:
        seen: set[str] = set()
        repeated = set()
        for v in col.to_pylist():
            if v is not None:
                k = key_text(v)
                (repeated if k in seen else seen).add(k)
    del col
    if not repeated:
        return {}
    before, total = [], {}
    for g in range(pf.num_row_groups):
        here = [k for k in map(key_text, pf.read_row_group(g, columns=[key]).column(key)
                               .drop_null().to_pylist()) if k in repeated]
        before.append({k: total.get(k, 0) for k in set(here)})
        for k in here:
            total[k] = total.get(k, 0) + 1
    return {"before": before}


def read_named(source: str, paths: set[str]) -> Iterator[Record]:
    """The records of a source whose paths are among `paths` (pipelines.names' text forms),
    read again from it: units that hold none are not read, a folder's or an S3 page's wanted
    files alone; it stops once every path is found. A path the source no longer holds yields
    nothing."""
    left = set(paths)
    for unit in plan([names.parse(source)[0]]):
        known = unit_paths(unit)
        if known is not None and not left.intersection(known):
            continue
        records = None
        if unit.kind in ("folder", "s3page"):  # the wanted files alone, not their slice
            records = read_paths(unit, [p for p in left if slice_holds(unit, p)])
        skip = frozenset(known).difference(left) if known is not None else frozenset()
        for rec in records if records is not None else read_unit(unit, skip):
            if rec.path in left:
                left.discard(rec.path)
                yield rec
        if not left:
            return


def _read_reviewed(unit: Unit, skip) -> Iterator[Record]:
    """A `reviewed` unit (pipelines.review.reviewed_units): rows of a label output that a
    person labeled, read again from their source, with the person's labels."""
    wanted = {path: label for path, label in unit.items if path not in skip}
    why = "missing: its source no longer holds it"
    if storage.exists(names.parse(unit.source)[0]):
        for rec in read_named(unit.source, set(wanted)):
            rec.label = wanted.pop(rec.path)
            yield rec
    else:
        why = "missing: its source is gone (moved or deleted since it was labeled)"
    for path in wanted:
        yield Record(unit.source, path, None, why)


def read_unit(unit: Unit, skip: frozenset[str] = frozenset(),
              with_labels: bool = False) -> Iterator[Record]:
    """Every record of a unit, in order, but those whose path is in `skip`."""
    readers = {"files": _read_files, "folder": read_folder, "s3page": read_page,
               "tar": _read_tar,
               "tarshard": _read_tar,
               "tarstream": _read_tarstream,
               "zip": _read_zip, "parquet": _read_parquet, "broken": _read_broken,
               "reviewed": _read_reviewed}
    for rec in readers[unit.kind](unit, skip):
        if with_labels and rec.label is None and unit.kind != "parquet":
            rec.label = names.folder(rec.path)
        yield rec


def _read_broken(unit: Unit, skip) -> Iterator[Record]:
    yield Record(unit.source, "", None, f"unreadable: archive cannot be opened: {unit.items[0]}")


def _read_files(unit: Unit, skip) -> Iterator[Record]:
    for rel, uri, size, error in unit.items:
        if rel not in skip:
            yield file_record(unit.source, rel, uri, size, error)


def _read_tar(unit: Unit, skip) -> Iterator[Record]:
    with storage.open_input(unit.source) as f:
        items = unit.items
        if unit.kind == "tarshard":  # the whole tar, each header read as its member is
            try:
                tar = tarfile.open(fileobj=f, mode="r:", tarinfo=archives.CheckedTarInfo)
            except tarfile.TarError as e:
                yield Record(unit.source, "", None, f"unreadable: archive cannot be opened: {e}")
                return
            items = archives.iter_tar(tar)
        for name, offset, size, error in items:
            if name in skip:
                continue
            if error:
                yield Record(unit.source, name, None, error)
                continue
            try:
                f.seek(offset)
                data = f.read(size)
            except OSError as e:
                yield Record(unit.source, name, None, f"unreadable: {e}")
                continue
            if len(data) != size:
                yield Record(unit.source, name, None, "truncated: archive ends inside member")
            else:
                yield Record(unit.source, name, data)


def _read_tarstream(unit: Unit, skip) -> Iterator[Record]:
    name, count = None, names.Counter()
    try:
        with storage.open_stream(unit.source) as f, \
                tarfile.open(fileobj=f, mode="r|*", tarinfo=archives.CheckedTarInfo) as tar:
            for m in tar:
                tar.members.clear()  # memory stays flat on a huge archive
                name = m.name
                item = archives.tar_item(m, count)
                if item is None or item[0] in skip:
                    continue
                if item[3]:
                    yield Record(unit.source, item[0], None, item[3])
                    continue
                yield Record(unit.source, item[0], tar.extractfile(m).read())
            end = archives.tar_end_error(tar, name)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        # The stream cannot go past this point; what came before is kept.
        where = f" after {names.text(name)}" if name else ""
        end = (f"<archive{where}>", 0, 0, f"truncated: {e}")
    if end and end[0] not in skip:
        yield Record(unit.source, end[0], None, end[3])


def _read_zip(unit: Unit, skip) -> Iterator[Record]:
    with storage.open_input(unit.source) as f, archives.open_zip(f) as zf:
        entries = zf.infolist()
        for name, index in unit.items:
            if name in skip:
                continue
            info = entries[index]  # by place: two entries of one name are two members
            error = archives.zip_member_error(info)
            if error:
                yield Record(unit.source, name, None, error)
                continue
            try:
                # zipfile stops at the size the directory declares, so a lying member cannot
                # inflate past archives.MAX_MEMBER_BYTES; a bad CRC or stream raises instead.
                with zf.open(info) as member:
                    data = member.read()
            except Exception as e:  # BadZipFile, zlib.error, RuntimeError (encrypted), ...
                yield Record(unit.source, name, None, f"unreadable: {type(e).__name__}: {e}")
                continue
            yield Record(unit.source, name, data)


def _read_parquet(unit: Unit, skip) -> Iterator[Record]:
    """A row group in batches of about READ_BYTES by its average row. pyarrow decodes a
    column chunk whole (about twice its size at the peak), so a group of more than
    MAX_GROUP_BYTES (uncompressed, the columns read) is an error row: a 4 KB file of zeros
    would otherwise inflate to gigabytes."""
    with storage.open_input(unit.source) as f:
        # The images as a dictionary array, each row made bytes only as it is read: a value
        # repeated a thousand times is not a thousand copies at once.
        pf = pq.ParquetFile(f, read_dictionary=["image"])
        cols = pf.schema_arrow.names
        key = parquet_key(cols)
        cols = ["image"] + [c for c in (key, "label") if c and c in cols]
        for group in unit.items:
            meta = pf.metadata.row_group(group)
            size = sum(meta.column(i).total_uncompressed_size for i in range(meta.num_columns)
                       if meta.column(i).path_in_schema in cols)
            if size > MAX_GROUP_BYTES:
                where = f"<row group {group}>"
                if where not in skip:
                    yield Record(unit.source, where, None, (
                        f"too_large: a row group of {size:,} bytes uncompressed (at most "
                        f"{MAX_GROUP_BYTES:,}): write the file with smaller row groups"))
                continue
            rows = int(max(1, min(1024, READ_BYTES * meta.num_rows // max(1, size))))
            row = sum(pf.metadata.row_group(g).num_rows for g in range(group))
            seen = dict(unit.repeats or {})
            try:
                for batch in pf.iter_batches(batch_size=rows, row_groups=[group], columns=cols):
                    yield from _parquet_records(unit, batch, row, key, skip, seen)
                    row += batch.num_rows
            except (pa.ArrowException, OSError) as e:
                where = f"<row group {group}>"
                if where not in skip:
                    yield Record(unit.source, where, None, f"unreadable: {e}")


READ_BYTES = 64 * 1024 * 1024
MAX_GROUP_BYTES = 1024 * 1024 * 1024


def key_text(value) -> str:
    """A Parquet `path` or `id` value as a name: text as it is, bytes as a file name's bytes,
    anything else as Python writes it."""
    if isinstance(value, bytes):
        return names.from_bytes(value)
    return value if isinstance(value, str) else str(value)


def _parquet_records(unit, batch, base, key, skip, seen) -> Iterator[Record]:
    """A row's path is its `path` or `id` (a repeated one: names' `#N` form; a null one:
    `"row-N"`, quoted, which no key of the file can be), else `row-N`. `seen`: the rows of
    each repeated key so far."""
    source = unit.source
    images = batch.column("image")
    keys = batch.column(key).to_pylist() if key else None
    labels = (batch.column("label").to_pylist() if "label" in batch.schema.names
              else [None] * len(images))
    for i, lab in enumerate(labels):
        if keys is None:
            path_ = f"row-{base + i}"
        elif keys[i] is None:
            path_ = f'"row-{base + i}"'
        else:
            k = key_text(keys[i])
            n = 1
            if unit.repeats is not None and k in seen:
                seen[k] = n = seen[k] + 1
            path_ = names.text(k, n)
        if path_ in skip:
            continue
        img = images[i].as_py()
        if img is None:
            yield Record(source, path_, None, "empty: null image", lab)
        elif not isinstance(img, bytes | bytearray):
            yield Record(source, path_, None, "not_image: image column is not binary", lab)
        else:
            yield Record(source, path_, bytes(img), None, lab)
