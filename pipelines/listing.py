"""The listings that plan a local directory and an S3 prefix without holding their names: a
folder's files in slices named by their first and last file, an S3 prefix in content-defined
runs of keys, each listed again by the task that reads it (pipelines.sources dispatches)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

from . import names, storage
from .units import Record, Unit, chunks, file_record, file_status


def slice_holds(unit: Unit, key: str) -> bool:
    """Whether a folder or S3 page unit is where the row of `key` (a path's text form) comes
    from: a folder's, from its slice's first name to its last; a page's, after the key
    before it up to its last."""
    if unit.kind == "s3page":
        prefix, after, last = unit.items[:3]
        return after < prefix + names.parse(key)[0] <= last
    rel, first, last, _ = unit.items
    folder, _, name = names.parse(key)[0].rpartition("/")
    return (folder or ".") == rel and first <= name <= last


def plan_pages(uri: str, chunk: int) -> list[Unit]:
    """An S3 prefix's units without its keys: runs of about `chunk` objects in key order,
    each named by the key before it and its last key (its task lists it again from there),
    with a digest of its keys, sizes and ETags in its id. A run ends where a key's hash says
    (content-defined, at most 4 x `chunk` objects), so that an object added, removed or
    replaced between two runs changes the run it falls in, not every run after it."""
    bucket, prefix = _prefix(uri)
    units: list[Unit] = []
    objects: list[dict] = []
    after = ""

    def close() -> None:
        digest = hashlib.sha1("\n".join(f"{o['Key']}\t{o['Size']}\t{o.get('ETag', '')}"
                                        for o in objects).encode()).hexdigest()
        folders = sorted({names.folder(names.text(o["Key"][len(prefix):])) or ""
                          for o in objects})
        units.append(Unit(uri, "s3page", [prefix, after, objects[-1]["Key"], len(objects),
                                          folders], len(units), stamp=(digest,)))

    for page in _pages(uri, bucket, prefix, "", 1000):
        for o in page:
            if o["Key"].endswith("/"):
                continue  # a folder marker: no image
            objects.append(o)
            cut = int(hashlib.sha1(o["Key"].encode()).hexdigest()[:8], 16) % chunk == 0
            if cut or len(objects) >= 4 * chunk:
                close()
                after, objects = o["Key"], []
    if objects:
        close()
    return units


def _prefix(uri: str) -> tuple[str, str]:
    from .s3 import s3_bucket_key

    bucket, key = s3_bucket_key(uri)
    return bucket, key.rstrip("/") + "/" if key.strip("/") else ""


def _pages(uri: str, bucket: str, prefix: str, after: str, size: int) -> Iterator[list[dict]]:
    """The prefix's objects after `after`, a listing page at a time."""
    from .s3 import s3_client

    try:
        pages = s3_client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, **({"StartAfter": after} if after else {}),
            PaginationConfig={"PageSize": size})
        for page in pages:
            if page.get("Contents"):
                yield page["Contents"]
    except Exception as e:  # botocore's errors: a dead endpoint, a missing bucket, a denial
        raise storage.StorageError(f"{uri}: cannot list: {type(e).__name__}: {e}") from None


def read_paths(unit: Unit, paths: list[str]) -> Iterator[Record]:
    """The records of these paths (their text forms) of a folder or S3 page unit, read
    without listing the unit again."""
    if unit.kind == "folder":
        base = storage.local_path(unit.source)
        for key in paths:
            full = os.path.join(base, names.parse(key)[0])
            yield file_record(unit.source, key, full, *file_status(full))
        return
    bucket, prefix = _prefix(unit.source)
    for key in paths:
        yield file_record(unit.source, key, f"s3://{bucket}/{prefix}{names.parse(key)[0]}",
                           None, None)


def read_page(unit: Unit, skip) -> Iterator[Record]:
    """An S3 page unit's objects, listed again: those after the key before it up to its last
    one."""
    prefix, after, last = unit.items[:3]
    bucket, _ = _prefix(unit.source)
    found = []
    for page in _pages(unit.source, bucket, prefix, after, 1000):
        found += [o for o in page if o["Key"] <= last and not o["Key"].endswith("/")]
        if page[-1]["Key"] >= last:
            break
    for o in found:
        key = names.text(o["Key"][len(prefix):])
        if key not in skip:
            yield file_record(unit.source, key, f"s3://{bucket}/{o['Key']}", o["Size"], None)


FOLDER_NAMES_HELD = 20_000  # a folder with more files directly in it: the plan holds them


def plan_folders(uri: str, chunk: int) -> list[Unit]:
    """A local directory's units without its files' names: each folder's files, sorted, in
    slices of `chunk` named by their first and last name, which the task lists again (a
    folder's mtime in the unit's id: a file added or removed between two runs makes it
    another unit). A folder of more than FOLDER_NAMES_HELD files is held name by name
    instead (listing it again for each slice would cost more than holding it), as are the
    error rows of folders that cannot be listed and links to folders (never followed: they
    can loop). A link to a regular file is followed; a broken link, a FIFO or a device is an
    error row, never opened (reading one can block forever)."""
    base = storage.local_path(uri)
    units: list[Unit] = []
    held: list[tuple] = []

    def unlistable(e: OSError) -> None:
        rel = os.path.relpath(e.filename or base, base)
        held.append((names.text(rel), e.filename or base, None,
                     f"unreadable: cannot list directory: {e.strerror}"))

    for root, dirs, files in os.walk(base, onerror=unlistable):
        dirs.sort()  # the walk's order, and so the units', is the names'
        for name in dirs:
            full = os.path.join(root, name)
            if os.path.islink(full):
                held.append((names.text(os.path.relpath(full, base)), full, None,
                             "not_a_file: link to a directory (not followed)"))
        rel = os.path.relpath(root, base)
        files.sort()
        if len(files) > FOLDER_NAMES_HELD:
            for name in files:
                full = os.path.join(root, name)
                held.append((names.text(os.path.relpath(full, base)), full,
                             *file_status(full)))
            continue
        try:
            stamp = os.stat(root).st_mtime_ns
        except OSError:
            stamp = None
        for i in range(0, len(files), chunk):
            part = files[i : i + chunk]
            units.append(Unit(uri, "folder", [rel, part[0], part[-1], len(part)],
                              stamp=(stamp,)))
    held.sort()
    units += chunks(uri, "files", held, chunk)
    for n, unit in enumerate(units):
        unit.index = n
    return units


def read_folder(unit: Unit, skip) -> Iterator[Record]:
    """A folder unit's files, listed again: those from its first name to its last."""
    rel, first, last, _ = unit.items
    base = storage.local_path(unit.source)
    root = os.path.normpath(os.path.join(base, rel))
    try:
        with os.scandir(root) as it:
            found = sorted(e.name for e in it if first <= e.name <= last and not _is_dir(e))
    except OSError as e:  # listed when the job was planned: its files' rows are not lost
        raise storage.StorageError(f"{root}: cannot list the folder again ({e.strerror}); it "
                                   "could be listed when the job started: make it readable "
                                   "and run the command again to finish") from None
    for name in found:
        full = os.path.join(root, name)
        key = names.text(os.path.relpath(full, base))
        if key not in skip:
            yield file_record(unit.source, key, full, *file_status(full))


def _is_dir(entry: os.DirEntry) -> bool:
    """As os.walk tells a folder from a file: a link to a folder is one; an entry whose kind
    cannot be read (a link that loops) is a file, which then becomes an error row."""
    try:
        return entry.is_dir()
    except OSError:
        return False
