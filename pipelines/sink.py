"""Parquet output folders that resume: each part file is written whole or not at all, under a
name unique to its slice of work and to the run, so a re-run reads back which rows are done
and writes only the rest, and a retried task overwrites its own part instead of adding one.

Layout: OUTPUT/part-*.parquet, OUTPUT/summary.json, OUTPUT/_kiln_job.json (what the output
holds: the arguments that decide its rows)."""

from __future__ import annotations

import io
import json
import sys
import time
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import storage

JOB_FILE, SUMMARY_FILE = "_kiln_job.json", "summary.json"


class OutputError(RuntimeError):
    pass


class _NoPandas:
    """An import hook under which `import pandas` fails."""

    def find_spec(self, name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def skip_pandas_probe() -> None:
    """pyarrow imports pandas (~0.45 s) the first time it builds an array, only to ask whether
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

    def write(self, name: str, table: pa.Table) -> None:
        write_part(self.uri_of(name), table)


class OutputDir:
    """A job's output folder: what it holds, which rows are done, its summary."""

    def __init__(self, uri: str, job: dict | None = None, overwrite: bool = False):
        """`job`: the arguments that decide which rows the output holds (JSON-able); None to
        only read the output."""
        self.uri, self.job, self.overwrite = str(uri).rstrip("/"), job, overwrite
        self.run_id = uuid.uuid4().hex[:8]
        self.parts_read: list[str] = []

    def prepare(self, key_columns: list[str]) -> set[tuple]:
        """Checks the output can take this job and returns the keys already written."""
        if self.job is None:
            raise ValueError("an OutputDir opened to read has no job to prepare")
        storage.check_reachable(self.uri)
        if storage.info(self.uri).type == pafs.FileType.File:
            raise OutputError(f"{self.uri} is a file; the output is a folder: choose another "
                              "--output")
        job_uri = storage.join(self.uri, JOB_FILE)
        if self.overwrite:
            storage.delete_dir(self.uri)
        elif storage.exists(job_uri):
            held = json.loads(storage.read_bytes(job_uri))
            if held != self.job:
                changed = sorted(k for k in set(held) | set(self.job)
                                 if held.get(k) != self.job.get(k))
                raise OutputError(
                    f"{self.uri} holds the output of a different job (differs in: "
                    f"{', '.join(changed)}); pass --overwrite to replace it or choose another "
                    "--output"
                )
        elif storage.exists(self.uri) and storage.list_files(self.uri):
            raise OutputError(
                f"{self.uri} exists and is not a kiln output; pass --overwrite to replace it "
                "or choose another --output"
            )
        storage.write_bytes(job_uri, json.dumps(self.job, indent=2, sort_keys=True).encode())
        self._remove_leftovers()
        return self.done_keys(key_columns)

    def _remove_leftovers(self) -> None:
        """Temporary files of writes that a killed run never finished (storage.write_bytes
        renames them into place only once whole)."""
        if storage.exists(self.uri):
            for i in storage.list_files(self.uri):
                if i.path.endswith(".tmp"):
                    storage.delete_dir(storage.to_uri(self.uri, i.path))

    def parts(self) -> list[str]:
        if not storage.exists(self.uri):
            return []
        return [storage.to_uri(self.uri, i.path) for i in storage.list_files(self.uri)
                if i.path.rsplit("/", 1)[-1].startswith("part-") and i.path.endswith(".parquet")]

    def done_keys(self, key_columns: list[str]) -> set[tuple]:
        """Keys of every row in a complete part; a part cut short by a crash is removed."""
        done: set[tuple] = set()
        self.parts_read = []  # what a later listing is compared with (late parts)
        for part in self.parts():
            try:
                table = pq.read_table(io.BytesIO(storage.read_bytes(part)), columns=key_columns)
            except (pa.ArrowInvalid, OSError):
                storage.delete_dir(part)
                continue
            done.update(zip(*(table.column(c).to_pylist() for c in key_columns), strict=True))
            self.parts_read.append(part)
        return done

    def part_uri(self, name: str) -> str:
        return Parts(self.uri, self.run_id).uri_of(name)

    def write_summary(self, summary: dict) -> None:
        storage.write_bytes(storage.join(self.uri, SUMMARY_FILE),
                            json.dumps(summary, indent=2).encode())

    def read_table(self) -> pa.Table:
        """Every row written so far (for reports and tests)."""
        tables = [pq.read_table(io.BytesIO(storage.read_bytes(p))) for p in self.parts()]
        return pa.concat_tables(tables) if tables else pa.table({})


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
