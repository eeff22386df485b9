"""The driver that `kiln label` and `kiln generate` share: plan the job's tasks -> skip what
the output already holds -> run the tasks in this process or on a Ray Data actor pool ->
follow the parts as they are written -> summary.json -> the totals line.

What differs per job lives in a BulkJob (jobs/bulk/label.py, jobs/bulk/generate.py): what
decides the output's rows, how the input becomes tasks, the actor class that runs them, the
summary's own fields and the totals line."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from rich.console import Console

from kiln.cluster.connect import RayOptions, check_address, ray_session
from kiln.cluster.placement import Placement, place
from kiln.pipelines import storage
from kiln.pipelines.bulk import Layout, bulk_dataset, run_in_threads, stats_rows
from kiln.pipelines.sink import OutputDir, Progress, skip_pandas_probe
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

    def plan(self, done: set[tuple]) -> Plan:
        raise NotImplementedError

    def run_here(self, actor, tasks: list[dict], workers: int) -> tuple[str, Iterable[dict]]:
        """Runs the tasks without Ray on `workers` cores: how (for the log line), and the
        stats of the parts as they are written. Here on as many threads of this process,
        one torch thread each, as each actor has (the models' kernels and the decoders
        release the GIL)."""
        return (f"in this process on {workers} thread(s)",
                run_in_threads(actor.run_task, tasks, workers))

    def settings(self, out: OutputDir, layout: Layout):
        """The actor's settings for this output and layout."""
        raise NotImplementedError

    def describe(self, plan: Plan, done: set[tuple]) -> str | None:
        """A line on what the job has to do, before it starts."""
        return None

    def done_errors(self, done: set[tuple]) -> Counter:
        """Error rows by kind among the rows an earlier run wrote."""
        return Counter()

    def summary(self, done: set[tuple], parts: dict[str, dict], common: dict) -> dict:
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


def check_fits_here(where: Placement, tasks: int) -> None:
    """On a local Ray the pool must fit this machine: each of min(--actors, tasks) actors
    asks at least a tenth of a CPU (actor_layout), and a pool short of CPUs waits forever."""
    actors = min(where.actors or 0, tasks)
    if where.gpu or where.cluster or actors <= 9 * where.cpus:
        return
    raise ValueError(f"--actors {where.actors} does not fit this machine's {where.cpus} CPUs "
                     f"(at most {9 * where.cpus} actors here); lower --actors, or point "
                     "--address at a Ray cluster")


def prepare_process(where: Placement) -> None:
    """Before any Arrow array is built: a job that may run here skips pyarrow's pandas probe."""
    if where.here_only:
        skip_pandas_probe()


def run_bulk(job: BulkJob, console: Console) -> dict:
    """Runs the job; returns the summary that it also writes to OUTPUT/summary.json."""
    opts, start = job.opts, time.monotonic()
    out = OutputDir(opts.output, {"job": job.name, **job.identity()}, opts.overwrite)
    done = out.prepare(job.key_columns)  # and takes the output's lease
    try:
        return _run(job, out, done, start, console)
    finally:
        out.close()


def _run(job: BulkJob, out: OutputDir, done: set[tuple], start: float, console: Console
         ) -> dict:
    opts = job.opts
    before = set(out.parts_read)  # a part listed later but not read is late
    plan = job.plan(done)
    if done:
        console.print(f"resuming: {len(done):,} rows already in {redact(out.uri)}",
                      highlight=False)
    line = job.describe(plan, done)
    if line:
        console.print(line, highlight=False)
    progress = Progress(plan.rows, job.done_word, console)
    parts: dict[str, dict] = {}
    if plan.tasks and job.where.runs_here(plan.work, job.rate_per_cpu):
        workers = min(job.where.cpus, len(plan.tasks))
        # One torch thread each, as each actor has; labeling decodes on `workers` threads.
        actor = job.actor(job.settings(out, Layout(1, 1.0, 0, 1, workers)), job.loaded)
        how, stats = job.run_here(actor, plan.tasks, workers)
        console.print(f"{job.verb} {len(plan.tasks):,} unit(s) {how} with {job.loaded.id}",
                      highlight=False)
        parts = follow(stats, progress, out)
    elif plan.tasks:
        check_fits_here(job.where, len(plan.tasks))
        with ray_session(RayOptions(address=opts.address, log_to_driver=opts.debug,
                                    forward_credentials=opts.forward_credentials)), \
                quiet_ray_data():
            layout = actor_layout(opts, len(plan.tasks), job.decodes)
            console.print(f"{job.verb} {len(plan.tasks):,} unit(s) with {layout.actors} "
                          f"actor(s) of {job.loaded.id}", highlight=False)
            ds = bulk_dataset(job.actor, job.settings(out, layout), plan.tasks, layout)
            parts = follow(stats_rows(ds), progress, out)
    elif done:
        console.print("nothing left to do: every row is in the output (--overwrite redoes "
                      "the job)", highlight=False)
    out.confirm()  # this job still holds the output: then what it deletes is no one's
    remove_late_parts(out, before, console)
    summary = make_summary(job, done, parts, time.monotonic() - start)
    job.finish(out, summary, parts, console)
    out.confirm()
    out.write_summary(summary)
    console.print(job.totals(summary), highlight=False)
    return summary


@contextlib.contextmanager
def quiet_ray_data():
    """kiln prints its own progress; Ray Data's notes on its bars and timings would repeat it."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def actor_layout(opts, units: int, decodes: bool = True) -> Layout:
    """CPU: an actor per CPU free now (a job's driver holds some), or --actors of them
    sharing the CPUs, each asking 0.9 of its share so that Ray Data's own tasks always find
    room (ray#44687: a pool holding every CPU starves them), with a torch thread per whole
    CPU of its share. One torch thread an actor and as many actors as CPUs is fastest: the
    decode threads interleave with the models (2 actors on 2 CPUs label faster than one
    actor with a core for its model and a core for its decoding; bench/label.py).
    GPU: one GPU per actor, and (`decodes`) a share of its node's CPUs for decoding; with
    --actors the pool may wait for an autoscaler to add GPUs."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((int(r.get("CPU", 0)) for r in nodes), default=1) or 1
    cpus = max(1, int(ray.available_resources().get("CPU", ray.cluster_resources().get("CPU", 1))))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if opts.gpu:
        if gpus < 1 and not opts.actors:
            raise ValueError("--gpu was given but the Ray cluster has no GPUs now; drop --gpu, "
                             "point --address at a cluster with GPU workers, or pass --actors N "
                             "to wait for an autoscaler to add them")
        actors = min(opts.actors or gpus, units)
        if not decodes:
            return Layout(actors, 1.0, 1, 1, 1)
        share = max(1, min(8, node_cpus - 1, (cpus - 1) // max(1, actors)))
        return Layout(actors, share * 0.9, 1, 1, share)
    actors = min(opts.actors or cpus, units)
    share = cpus / actors
    threads = max(1, min(node_cpus, int(share)))
    return Layout(actors, round(max(0.1, 0.9 * share), 3), 0, threads, threads)


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


def make_summary(job: BulkJob, done: set[tuple], parts: dict[str, dict], elapsed: float
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
        "rows_in": written + len(done),
        "rows_written": written,
        "rows_resumed": len(done),
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
