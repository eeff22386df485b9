"""Image sources: directories (recursive), .tar/.tar.gz/.tgz/.zip archives and Parquet files
with an `image` column, local or s3://, and glob patterns of these.

plan() cuts the inputs into Units, small slices that one task reads on its own: a directory's
files in chunks, a local tar's or a zip's members in chunks (found from the headers, so one
huge archive is read by many tasks at once), a Parquet file's row groups. A compressed tar
(or a tar on S3) can only be read front to back, so it is one streaming unit that yields its
members a few at a time. read_unit() yields Records; nothing is ever extracted onto disk."""

from __future__ import annotations

import posixpath
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from . import storage

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_MEMBER_BYTES = 256 * 1024 * 1024  # a bigger single member is refused, never read


@dataclass
class Record:
    source: str  # the input URI: archive, directory, Parquet file or lone image file
    path: str  # member path, path under the directory, or the Parquet row's path/id
    data: bytes | None  # encoded image; None where error is set
    error: str | None = None  # "kind: detail"
    label: str | None = None  # class name, for training data


@dataclass
class Unit:
    source: str
    kind: str  # files | tar | tarstream | zip | parquet
    items: list = field(default_factory=list)
    index: int = 0

    @property
    def key(self) -> str:
        return f"{self.source}#{self.index}"


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


def unsafe_name(name: str) -> bool:
    return name.startswith("/") or ".." in name.replace("\\", "/").split("/")


def plan(inputs: list[str], chunk: int = 1000) -> list[Unit]:
    """Units covering every input; fails fast when an input does not exist."""
    units: list[Unit] = []
    for pattern in inputs:
        uris = storage.expand(pattern)
        if not uris:
            raise storage.StorageError(f"{pattern}: the pattern matches nothing")
        for uri in uris:
            if not storage.exists(uri):
                raise storage.StorageError(f"{uri}: not found")
            units.extend(_plan_one(uri, chunk))
    return units


def _chunks(source: str, kind: str, items: list, chunk: int) -> list[Unit]:
    return [Unit(source, kind, items[i : i + chunk], n)
            for n, i in enumerate(range(0, len(items), chunk))]


def _plan_one(uri: str, chunk: int) -> list[Unit]:
    kind = input_kind(uri)
    if kind == "dir":
        fs, base = storage.filesystem(uri)
        files = [(posixpath.relpath(i.path, base), storage.to_uri(uri, i.path), i.size)
                 for i in storage.list_files(uri)]
        return _chunks(uri, "files", files, chunk)
    if kind == "file":
        return [Unit(uri, "files", [(posixpath.basename(uri), uri, storage.info(uri).size)])]
    if kind == "tarstream":
        return [Unit(uri, "tarstream")]
    fs, path = storage.filesystem(uri)
    if kind == "parquet":
        with fs.open_input_file(path) as f:
            groups = list(range(pq.ParquetFile(f).num_row_groups))
        return _chunks(uri, "parquet", groups, 1)
    with fs.open_input_file(path) as f:
        if kind == "tar":
            try:
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    members = [_tar_item(m) for m in tar]  # headers only; data is skipped
            except tarfile.TarError as e:
                return [Unit(uri, "broken", [str(e)])]
            return _chunks(uri, "tar", [m for m in members if m], chunk)
        try:
            with zipfile.ZipFile(f) as zf:
                names = [i.filename for i in zf.infolist() if not i.is_dir()]
        except (zipfile.BadZipFile, OSError) as e:
            return [Unit(uri, "broken", [str(e)])]
        return _chunks(uri, "zip", names, chunk)


def _tar_item(m: tarfile.TarInfo):
    """(name, data offset, size, error) for a tar member; None for a directory."""
    if m.isdir():
        return None
    if unsafe_name(m.name):
        return (m.name, 0, 0, "unsafe_path: absolute or '..' member name")
    if m.issym() or m.islnk():
        return (m.name, 0, 0, "not_a_file: link member")
    if not m.isfile():
        return (m.name, 0, 0, "not_a_file: device, fifo or other special member")
    if m.size > MAX_MEMBER_BYTES:
        return (m.name, 0, 0, f"too_large: {m.size} bytes")
    return (m.name, m.offset_data, m.size, None)


def read_unit(unit: Unit, skip: frozenset[str] = frozenset(),
              with_labels: bool = False) -> Iterator[Record]:
    """Every record of a unit, in order, but those whose path is in `skip`."""
    readers = {"files": _read_files, "tar": _read_tar, "tarstream": _read_tarstream,
               "zip": _read_zip, "parquet": _read_parquet, "broken": _read_broken}
    for rec in readers[unit.kind](unit, skip):
        if with_labels and rec.label is None and unit.kind != "parquet":
            rec.label = rec.path.split("/", 1)[0] if "/" in rec.path else None
        yield rec


def _read_broken(unit: Unit, skip) -> Iterator[Record]:
    yield Record(unit.source, "", None, f"unreadable: archive cannot be opened: {unit.items[0]}")


def _read_files(unit: Unit, skip) -> Iterator[Record]:
    for rel, uri, size in unit.items:
        if rel in skip:
            continue
        if size is not None and size > MAX_MEMBER_BYTES:
            yield Record(unit.source, rel, None, f"too_large: {size} bytes")
            continue
        try:
            yield Record(unit.source, rel, storage.read_bytes(uri))
        except storage.StorageError as e:
            yield Record(unit.source, rel, None, f"unreadable: {e}")


def _read_tar(unit: Unit, skip) -> Iterator[Record]:
    fs, path = storage.filesystem(unit.source)
    with fs.open_input_file(path) as f:
        for name, offset, size, error in unit.items:
            if name in skip:
                continue
            if error:
                yield Record(unit.source, name, None, error)
                continue
            data = f.read_at(size, offset)
            if len(data) != size:
                yield Record(unit.source, name, None, "truncated: archive ends inside member")
            else:
                yield Record(unit.source, name, data)


def _read_tarstream(unit: Unit, skip) -> Iterator[Record]:
    fs, path = storage.filesystem(unit.source)
    name = None
    try:
        with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                name = m.name
                item = _tar_item(m)
                if item is None or m.name in skip:
                    continue
                if item[3]:
                    yield Record(unit.source, m.name, None, item[3])
                    continue
                yield Record(unit.source, m.name, tar.extractfile(m).read())
    except (tarfile.TarError, OSError, EOFError) as e:
        # The stream cannot go past this point; what came before is kept.
        where = f" after {name}" if name else ""
        yield Record(unit.source, f"<archive{where}>", None, f"truncated: {e}")


def _read_zip(unit: Unit, skip) -> Iterator[Record]:
    fs, path = storage.filesystem(unit.source)
    with fs.open_input_file(path) as f, zipfile.ZipFile(f) as zf:
        for name in unit.items:
            if name in skip:
                continue
            if unsafe_name(name):
                yield Record(unit.source, name, None, "unsafe_path: absolute or '..' member name")
                continue
            info = zf.getinfo(name)
            if info.file_size > MAX_MEMBER_BYTES:
                yield Record(unit.source, name, None, f"too_large: {info.file_size} bytes")
                continue
            try:
                with zf.open(info) as member:
                    data = member.read(MAX_MEMBER_BYTES + 1)
            except (zipfile.BadZipFile, OSError, NotImplementedError, EOFError) as e:
                yield Record(unit.source, name, None, f"unreadable: {e}")
                continue
            yield Record(unit.source, name, data)


def _read_parquet(unit: Unit, skip) -> Iterator[Record]:
    fs, path = storage.filesystem(unit.source)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if "image" not in names:
            raise storage.StorageError(f"{unit.source}: Parquet input needs an 'image' column")
        key = "path" if "path" in names else "id" if "id" in names else None
        cols = ["image"] + [c for c in (key, "label") if c and c in names]
        for group in unit.items:
            table = pf.read_row_group(group, columns=cols)
            images = table.column("image").to_pylist()
            keys = (table.column(key).to_pylist() if key
                    else [None] * len(images))
            labels = (table.column("label").to_pylist() if "label" in names
                      else [None] * len(images))
            base = sum(pf.metadata.row_group(g).num_rows for g in range(group))
            for i, (img, k, lab) in enumerate(zip(images, keys, labels, strict=True)):
                path_ = str(k) if k is not None else f"row-{base + i}"
                if path_ in skip:
                    continue
                if img is None:
                    yield Record(unit.source, path_, None, "empty: null image", lab)
                else:
                    yield Record(unit.source, path_, bytes(img), None, lab)
