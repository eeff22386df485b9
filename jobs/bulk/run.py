"""The driver that `kiln label` and `kiln generate` share: plan the job's tasks -> skip what
the output already holds -> run the tasks where the job's executor says (kiln.bulk.executors:
this process's threads, forked processes or a Ray Data actor pool) -> follow the parts as they
are written -> summary.json -> the totals line.

What differs per job lives in a BulkJob (jobs/bulk/label.py, jobs/bulk/generate.py): what
decides the output's rows, how the input becomes tasks, the actor class that runs them, the
summary's own fields and the totals line."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from rich.console import Console

from kiln.bulk.executors import choose
from kiln.cluster.connect import check_address
from kiln.cluster.placement import Placement, place
from kiln.pipelines import storage
from kiln.pipelines.bulk import Layout
from kiln.pipelines.sink import OutputDir, Progress, Written, skip_pandas_probe
from kiln.redact import redact


@dataclass
class Plan:
    """What a job has still to do."""

    tasks: list[dict]  # pipelines.bulk.pack()ed tasks
    rows: int | None  # rows they hold; None when unknown before reading
    work: float  # their size in the job's unit of work (images, characters to step)


class BulkJob:
    """One bulk job: the driver calls these in order."""

    name = ""  # "label" | "generate": the identity's "job" and the messages
    verb = ""  # "labeling" | "generating"
    done_word = ""  # "labeled" | "generated": the progress lines
    key_columns: list[str] = []  # read back from the output to skip what is done
    rate_per_cpu = 1.0  # units of work a core does a second (Placement.runs_here)
    decodes = False  # whether a GPU actor wants CPUs of its own for decoding
    actor: type = object  # the pipelines.bulk.BulkActor subclass

    def __init__(self, opts, loaded, where: Placement | None = None):
        """`where`: the command's placement (check_options), else placed here."""
        self.opts, self.loaded, self.where = opts, loaded, where or place(opts)

    def identity(self) -> dict:
        """What decides the output's rows besides the job's name: a re-run that differs in
        any of it is another job."""
        raise NotImplementedError

    def plan(self, written: Written) -> Plan:
        """What is left to do, given what the output holds already."""
        raise NotImplementedError

    def settings(self, out: OutputDir, layout: Layout):
        """The actor's settings for this output and layout."""
        raise NotImplementedError

    def describe(self, plan: Plan, written: Written) -> str | None:
        """A line on what the job has to do, before it starts."""
        return None

    def done_errors(self, written: Written) -> Counter:
        """Error rows by kind among the rows an earlier run wrote."""
        return Counter()

    def summary(self, written: Written, parts: dict[str, dict], common: dict) -> dict:
        """The job's own summary fields; `common`: the shared ones, made already."""
        return {}

    def finish(self, out: OutputDir, summary: dict, parts: dict[str, dict],
               console: Console) -> None:
        """Runs once the rows are written, before summary.json marks the output finished."""

    def totals(self, summary: dict) -> str:
        raise NotImplementedError


MAX_BATCH = 65_536  # images a forward pass (or rows a generation block) at most


def check_options(opts) -> Placement:
    """The options every bulk job has; the job's placement, decided and checked."""
    if opts.batch_size is not None and not 1 <= opts.batch_size <= MAX_BATCH:
        raise ValueError(f"--batch-size must be from 1 to {MAX_BATCH:,}, got {opts.batch_size:,}")
    if opts.actors is not None and opts.actors < 1:
        raise ValueError(f"--actors must be at least 1, got {opts.actors}")
    check_address(opts.address)
    return place(opts)


def prepare_process(where: Placement) -> None:
    """Before any Arrow array is built: a job that may run here skips pyarrow's pandas probe."""
    if where.here_only:
        skip_pandas_probe()


def run_bulk(job: BulkJob, console: Console) -> dict:
    """Runs the job; returns the summary that it also writes to OUTPUT/summary.json."""
    opts, start = job.opts, time.monotonic()
    out = OutputDir(opts.output, {"job": job.name, **job.identity()}, opts.overwrite)
    written = out.prepare(job.key_columns)  # and takes the output's lease
    try:
        return _run(job, out, written, start, console)
    finally:
        out.close()


def _run(job: BulkJob, out: OutputDir, written: Written, start: float, console: Console
         ) -> dict:
    before = set(out.parts_read)  # a part listed later but not read is late
    plan = job.plan(written)
    if written.rows:
        console.print(f"resuming: {written.rows:,} rows already in {redact(out.uri)}",
                      highlight=False)
    line = job.describe(plan, written)
    if line:
        console.print(line, highlight=False)
    progress = Progress(plan.rows, job.done_word, console)
    parts: dict[str, dict] = {}
    if plan.tasks:
        executor = choose(job.where, job.actor, len(plan.tasks), plan.work, job.rate_per_cpu)
        with contextlib.closing(executor.run(job, out, plan.tasks, console)) as stats:
            parts = follow(stats, progress, out)
    elif written.rows:
        console.print("nothing left to do: every row is in the output (--overwrite redoes "
                      "the job)", highlight=False)
    out.confirm()  # this job still holds the output: then what it deletes is no one's
    remove_late_parts(out, before, console)
    summary = make_summary(job, written, parts, time.monotonic() - start)
    job.finish(out, summary, parts, console)
    out.confirm()
    out.write_summary(summary)
    console.print(job.totals(summary), highlight=False)
    return summary


def follow(stats: Iterable[dict], progress: Progress, out: OutputDir | None = None
           ) -> dict[str, dict]:
    """Streams the stats of every part written, keyed by part so that a part a retried task
    wrote again counts once; stops where another job took the output over."""
    parts: dict[str, dict] = {}
    for s in stats:
        if out is not None:
            out.check()
        again = parts.get(s["part"])
        parts[s["part"]] = s
        if again is None:
            progress.update(s["rows"], sum(s["errors"].values()))
    return parts


def remove_late_parts(out: OutputDir, before: set[str], console: Console) -> None:
    """Deletes parts that an earlier run's last actors wrote after this run read which rows
    were done: this run has written each of their rows again. That run is over: this one
    holds the output's lease, which it took only once that run's holder was gone."""
    mine = f"-{out.run_id}.parquet"
    for part in out.parts():
        if part not in before and not part.endswith(mine):
            storage.delete_file(part)
            console.print(f"  removed {redact(part)}: written late by an interrupted run",
                          highlight=False)


def arguments(opts) -> dict:
    """The job's options for its summary, credentials redacted."""
    def clean(v):
        return [clean(x) for x in v] if isinstance(v, list) else (
            redact(v) if isinstance(v, str) else v)

    return {k: clean(v) for k, v in dataclasses.asdict(opts).items()}


def make_summary(job: BulkJob, done: Written, parts: dict[str, dict], elapsed: float
                 ) -> dict:
    """summary.json: the rows of this run and of earlier interrupted runs of the same job.
    Rates cover this run's rows and time, Ray's start included."""
    from kiln.models import __version__  # torch, which the model loaded already

    written = sum(p["rows"] for p in parts.values())
    errors = job.done_errors(done)
    for p in parts.values():
        errors.update(p["errors"])
    common = {
        "job": job.name,
        "model": job.loaded.id,
        "rows_in": written + done.rows,
        "rows_written": written,
        "rows_resumed": done.rows,
        "errors": dict(sorted(errors.items())),
        "error_rows": sum(errors.values()),
        "elapsed_s": round(elapsed, 3),
        "rows_per_s": round(written / elapsed, 1) if elapsed > 0 else 0.0,
        "parts": len(parts),
        "arguments": arguments(job.opts),
        "kiln_version": __version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return {**common, **job.summary(done, parts, common)}
