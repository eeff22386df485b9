"""What pipelines.sources plans and reads: a Record (one row's input), a Unit (a slice of an
input that one task reads) and its id across runs, and the reading of one file by path, which
sources and pipelines.listing share."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field

from . import archives, storage


@dataclass
class Record:
    source: str  # the input URI: archive, directory, Parquet file or lone image file
    path: str  # member path, path under the directory, or the Parquet row's path/id, in
    # pipelines.names' text form: unique in its source
    data: bytes | None  # encoded image; None where error is set
    error: str | None = None  # "kind: detail"
    label: str | None = None  # class name, for training data


@dataclass
class Unit:
    source: str
    kind: str  # files | folder | s3page | tar | tarshard (a whole local tar) | tarstream | zip
    # | parquet | broken | reviewed (a label output's reviewed rows of one source)
    items: list = field(default_factory=list)  # files: (path, URI, size, error); folder:
    # [folder under the source, first name, last name, files]; s3page: [prefix, the key before
    # the page, its last key, objects, their first folders]; tar: (path, data offset, size,
    # error); zip: (path, entry index); parquet: row group numbers; reviewed: (path, label)
    index: int = 0
    repeats: dict | None = None  # parquet: {key: rows of it before this unit} for the keys
    # that repeat in the file
    stamp: tuple | None = None  # an archive's or Parquet file's (size, mtime_ns), a folder's
    # (mtime_ns,), at planning: part of its units' ids, so that a unit whose file or folder
    # changed between two runs is another, whose rows are skipped by key, not whole

    @property
    def key(self) -> str:
        return f"{self.source}#{self.index}"


def unit_id(unit: Unit) -> str:
    """What names a unit across runs: its source, kind, items (paths, offsets, sizes, a
    folder's slice) and stamp, hashed; not its place in the plan, which a change elsewhere in
    the input shifts. An input that changed between two runs plans other units, whose ids the
    first run's parts do not carry: their rows are then skipped by key, not by unit."""
    record = json.dumps([unit.source, unit.kind, unit.items, unit.stamp], default=str)
    return hashlib.sha1(record.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def chunks(source: str, kind: str, items: list, chunk: int) -> list[Unit]:
    return [Unit(source, kind, items[i : i + chunk], n)
            for n, i in enumerate(range(0, len(items), chunk))]


def file_status(path: str) -> tuple[int | None, str | None]:
    try:
        st = os.stat(path)  # follows links
    except OSError:
        return None, "not_a_file: broken link"
    if not stat.S_ISREG(st.st_mode):
        return None, "not_a_file: device, fifo, socket or other special file"
    return st.st_size, None


def file_record(source: str, rel: str, uri: str, size: int | None, error: str | None
                 ) -> Record:
    if error:
        return Record(source, rel, None, error)
    if size is not None and size > archives.MAX_MEMBER_BYTES:
        return Record(source, rel, None, f"too_large: {size} bytes")
    try:  # at most archives.MAX_MEMBER_BYTES, and only a regular file: it may have changed
        return Record(source, rel, storage.read_bytes(uri, archives.MAX_MEMBER_BYTES))
    except storage.TooLarge as e:
        return Record(source, rel, None, f"too_large: {e}")
    except (storage.StorageError, ValueError) as e:  # ValueError: a key Arrow cannot take
        return Record(source, rel, None, f"unreadable: {e}")
