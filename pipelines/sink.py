"""Parquet output folders that resume: each part file is written whole or not at all, under a
name unique to its slice of work and to the run, so a re-run reads back which rows are done
and writes only the rest, and a retried task overwrites its own part instead of adding one.

Layout: OUTPUT/part-*.parquet, OUTPUT/summary.json, OUTPUT/_kiln_job.json (what the output
holds: the arguments that decide its rows).

A part's footer records, under PART_META, the unit of input it came from, whether it is the
last part of that unit, and its stats (rows, errors, labels): a re-run reads the footers alone
(memory that grows with the parts, not the rows), skips every unit whose last part is written,
and reads the keys of the rest only (the units in flight when the run stopped, and the parts of
an earlier kiln, which have no PART_META). A whole unit's parts are not read again: data that
rots under an intact footer is found by the next reader of the output, not by a resume."""

from __future__ import annotations

import io
import json
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import storage
from .lease import LEASE_FILE, Lease

JOB_FILE, SUMMARY_FILE = "_kiln_job.json", "summary.json"
PART_META = b"kiln.part"  # a part's footer: {"unit": id or None, "last": bool, "stats": {...}}


class OutputError(RuntimeError):
    pass


class _NoPandas:
    """An import hook under which `import pandas` fails."""

    def find_spec(self, name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def skip_pandas_probe() -> None:
    """pyarrow imports pandas (slow) the first time it builds an array, only to ask whether
    the input is a pandas object; kiln's writers never hand it one. In a process that has not
    imported pandas, this lets that first probe find no pandas, which pyarrow remembers for
    the probe alone: an explicit pandas conversion later (Ray Data's, say) still imports it
    and turns the probe back on."""
    if "pandas" in sys.modules:
        return
    hook = _NoPandas()
    sys.meta_path.insert(0, hook)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(hook)


class Parts:
    """Where a run writes its parts: OUTPUT/part-NAME-RUN_ID.parquet. The actors hold one."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = str(uri).rstrip("/"), run_id

    def uri_of(self, name: str) -> str:
        return storage.join(self.uri, f"part-{name}-{self.run_id}.parquet")

    def write(self, name: str, table: pa.Table, meta: dict | None = None) -> None:
        """`meta`: the PART_META record (unit, last, stats) that resume reads back."""
        if meta is not None:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                   PART_META: json.dumps(meta).encode()})
        write_part(self.uri_of(name), table)


@dataclass
class PartInfo:
    """A part as its footer describes it."""

    uri: str
    rows: int
    unit: str | None = None  # the unit of input it came from (pipelines.units.unit_id)
    last: bool = False  # its unit's last part: every row of the unit is written
    stats: dict | None = None  # what its writer counted (rows, errors, labels); None: an
    # earlier kiln's part, whose keys tell


class Written:
    """What an output holds already, from its parts' footers. Whole units are skipped by
    their id; the keys of the other parts are read only when asked (read_keys, column)."""

    def __init__(self, parts: list[PartInfo], key_columns: list[str], damaged: bool = False):
        """`damaged`: a part was set aside (its footer could not be read, now or by an
        earlier run): which unit it held is unknown, so no unit counts as whole and every row
        is skipped by its key."""
        self.parts, self.key_columns, self.damaged = parts, key_columns, damaged

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def whole_units(self) -> set[str]:
        if self.damaged:
            return set()
        return {p.unit for p in self.parts if p.unit is not None and p.last}

    def unfinished(self, whole: set[str]) -> list[PartInfo]:
        """The parts with a footer record whose unit is not in `whole`."""
        return [p for p in self.parts if p.stats is not None and p.unit not in whole]

    def read_keys(self, parts: list[PartInfo], columns: list[str] | None = None
                  ) -> set[tuple]:
        columns = columns or self.key_columns
        keys: set[tuple] = set()
        for table in self._tables(parts, columns):
            keys.update(zip(*(table.column(c).to_pylist() for c in columns), strict=True))
        return keys

    def _tables(self, parts: list[PartInfo], columns: list[str]) -> Iterator[pa.Table]:
        """Those columns of each part. A part whose footer read but whose data does not (a
        disk that lost part of its last write) is set aside as NAME.unreadable, and its rows
        are done again."""
        for p in list(parts):
            try:
                yield pq.read_table(io.BytesIO(storage.read_bytes(p.uri)), columns=columns)
            except (pa.ArrowInvalid, OSError):
                storage.move(p.uri, p.uri + ".unreadable")
                self.parts.remove(p)

    def column(self, name: str) -> pa.Array:
        """One key column of every part, as one Arrow array (numbers in 8 bytes a row, not a
        set of tuples)."""
        chunks = [t.column(name).combine_chunks() for t in self._tables(self.parts, [name])]
        if chunks and pa.types.is_string(chunks[0].type):  # past 2 GiB of text in all
            chunks = [c.cast(pa.large_string()) for c in chunks]
        return pa.concat_arrays(chunks) if chunks else pa.array([], pa.int64())

    def legacy(self) -> list[PartInfo]:
        """The parts an earlier kiln wrote, without stats."""
        return [p for p in self.parts if p.stats is None]


def read_part_info(uri: str) -> PartInfo:
    """A part's row count and PART_META, from its footer alone."""
    with storage.open_input(uri) as f:
        meta = pq.read_metadata(f)
    record = json.loads((meta.metadata or {}).get(PART_META, b"null")) or {}
    return PartInfo(uri, meta.num_rows, record.get("unit"), bool(record.get("last")),
                    record.get("stats"))


class OutputDir:
    """A job's output folder: what it holds, which rows are done, its summary. kiln writes
    only into a folder that is new, empty, or marked as a kiln output by JOB_FILE, holds its
    lease (pipelines.lease) while it writes, and deletes only its own files there (OWN_FILES,
    parts, its temporary files): never a folder, never a file it did not write."""

    def __init__(self, uri: str, job: dict | None = None, overwrite: bool = False):
        """`job`: the arguments that decide which rows the output holds (JSON-able); None to
        only read the output."""
        uri = str(uri)
        self.uri = uri.rstrip("/") if storage.is_s3(uri) else storage.local_path(uri)
        self.job, self.overwrite = job, overwrite
        self.run_id = uuid.uuid4().hex[:8]
        self.parts_read: list[str] = []
        self.lease: Lease | None = None

    def prepare(self, key_columns: list[str]) -> Written:
        """Checks the output can take this job, takes its lease (close() gives it back) and
        returns what it holds already."""
        if self.job is None:
            raise ValueError("an OutputDir opened to read has no job to prepare")
        storage.check_reachable(self.uri)
        kind = storage.info(self.uri).type
        if kind not in (pafs.FileType.Directory, pafs.FileType.NotFound):
            raise OutputError(f"{self.uri} is a file; the output is a folder: choose another "
                              "--output")
        self._check_is_kiln(storage.list_dir(self.uri))
        self.lease = Lease(self.uri, self.job.get("job", "kiln"), self.run_id).acquire()
        try:
            return self._prepare(key_columns)
        except BaseException:
            self.close()
            raise

    def _check_is_kiln(self, held: list[str]) -> None:
        # A run killed between taking the lease and writing JOB_FILE leaves only the lease.
        held = [n for n in held if n != LEASE_FILE and not (_TMP.match(n) and is_own_file(n))]
        if held and JOB_FILE not in held:
            raise OutputError(
                f"{self.uri} holds files ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''})"
                f" and is not a kiln output (no {JOB_FILE}); kiln writes only into a new or "
                "empty folder or one of its own outputs, and deletes only what it wrote: choose "
                "another --output")

    def _prepare(self, key_columns: list[str]) -> Written:
        job_uri = storage.join(self.uri, JOB_FILE)
        held = storage.list_dir(self.uri)  # again, under the lease
        self._check_is_kiln(held)
        before = None
        if JOB_FILE in held:
            before = read_job(self.uri)
            if before is None and not self.overwrite:
                raise OutputError(f"{self.uri}/{JOB_FILE} is not readable; pass "
                                  "--overwrite to start the output over, or choose "
                                  "another --output")
        was = before.get("job") if before else None
        if self.overwrite:
            # Its files first, the marker last (rewritten below): a kill midway leaves an
            # output that is still the old job's, which --overwrite takes again.
            self._remove(n for n in held if is_own_file(n, was) and n not in (JOB_FILE,
                                                                             LEASE_FILE))
        elif before is not None:
            if before != self.job:
                changed = sorted(k for k in set(before) | set(self.job)
                                 if before.get(k) != self.job.get(k))
                raise OutputError(
                    f"{self.uri} holds the output of a different job (differs in: "
                    f"{', '.join(changed)}); pass --overwrite to replace it or choose another "
                    "--output"
                )
        storage.write_bytes(job_uri, json.dumps(self.job, indent=2, sort_keys=True).encode())
        self._remove(n for n in held if _TMP.match(n) and is_own_file(n, was))
        return self.written(key_columns)

    def _remove(self, files) -> None:
        for name in files:
            storage.delete_file(storage.join(self.uri, name))

    def check(self) -> None:
        """Raises where this job lost its lease to another (pipelines.lease)."""
        if self.lease is not None:
            self.lease.check()

    def confirm(self) -> None:
        """Renews the lease now, or raises: before this job deletes or finishes anything."""
        if self.lease is not None:
            self.lease.confirm()

    def close(self) -> None:
        """Gives the lease back."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def parts(self) -> list[str]:
        return [storage.join(self.uri, n) for n in storage.list_dir(self.uri) if is_part(n)]

    def written(self, key_columns: list[str]) -> Written:
        """Every part, from its footer. A part is written whole or not at all; one that cannot
        be read (a disk that lost its last write) is set aside as NAME.unreadable, not
        deleted, and its rows are done again."""
        parts: list[PartInfo] = []
        held = storage.list_dir(self.uri)
        # A part set aside by this or an earlier run: which unit it held is unknown.
        damaged = any(n.endswith(".unreadable") for n in held)
        self.parts_read = []  # what a later listing is compared with (late parts)
        for part in (storage.join(self.uri, n) for n in held if is_part(n)):
            try:
                parts.append(read_part_info(part))
            except (pa.ArrowInvalid, OSError, ValueError):
                storage.move(part, part + ".unreadable")
                damaged = True
                continue
            self.parts_read.append(part)
        return Written(parts, key_columns, damaged)

    def part_uri(self, name: str) -> str:
        return Parts(self.uri, self.run_id).uri_of(name)

    def write_summary(self, summary: dict) -> None:
        storage.write_bytes(storage.join(self.uri, SUMMARY_FILE),
                            json.dumps(summary, indent=2).encode())

    def read_table(self) -> pa.Table:
        """Every row written so far (for reports and tests)."""
        tables = [pq.read_table(io.BytesIO(storage.read_bytes(p))) for p in self.parts()]
        return pa.concat_tables(tables) if tables else pa.table({})


# The files kiln writes into an output folder; its parts (part-*.parquet) and the temporary
# files of its atomic writes (NAME.XXXXXXXX.tmp) besides; and a job's own: kiln label
# --report's page, kiln eval's figures and page.
OWN_FILES = (JOB_FILE, SUMMARY_FILE, LEASE_FILE)
JOB_FILES = {"label": ("report.html",), "eval": ("eval.json", "eval.html")}
MAX_JOB_FILE = 16 * 1024 * 1024


def read_job(uri: str) -> dict | None:
    """The identity an output's JOB_FILE records; None where it has none it can read."""
    try:
        job = json.loads(storage.read_bytes(storage.join(uri, JOB_FILE), MAX_JOB_FILE))
    except (storage.StorageError, ValueError):
        return None
    return job if isinstance(job, dict) else None


_PART = re.compile(r"part-[0-9a-f-]+-[0-9a-z]{8}\.parquet\Z")  # Parts.uri_of's names
_TMP = re.compile(r"(.+)\.[0-9a-f]{8}\.tmp\Z")


def is_part(name: str) -> bool:
    return bool(_PART.match(name))


def is_own_file(name: str, job: str | None = None) -> bool:
    """Whether a name in an output folder is one kiln writes (for `job`, its own too)."""
    tmp = _TMP.match(name)
    name = tmp.group(1) if tmp else name
    return name in OWN_FILES or is_part(name) or name in JOB_FILES.get(job, ())


def write_part(uri: str, table: pa.Table) -> None:
    """One part file, whole or not at all (storage.write_bytes is atomic)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(uri, buf.getvalue())


class Progress:
    """Counts rows as parts finish; prints a live line through Rich when on a terminal."""

    def __init__(self, total: int | None, what: str, console=None):
        self.total, self.what, self.console = total, what, console
        self.done = self.errors = 0
        self.start = time.monotonic()
        self._last = 0.0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def update(self, rows: int, errors: int = 0) -> None:
        self.done += rows
        self.errors += errors
        now = time.monotonic()
        if self.console is not None and (now - self._last > 1.0):
            self._last = now
            total = f"/{self.total:,}" if self.total else ""
            self.console.print(
                f"  {self.what}: {self.done:,}{total} rows, {self.rate:,.0f} rows/s, "
                f"{self.errors:,} errors", highlight=False
            )
