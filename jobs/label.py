"""`kiln label`: label every image of the inputs with a trained CNN.

The driver plans the inputs into units (pipelines.sources), reads back what an earlier,
interrupted run of the same job already wrote, hands the remaining units to threads of this
process or to a Ray Data actor pool (jobs.connect.runs_here decides; pipelines.label's
LabelPredictor serves both), follows the parts as they are written, and ends with summary.json, a
totals line and, with --report, report.html."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator

from rich.console import Console

import models
from jobs.connect import RayOptions, local_cpus, may_run_here, ray_session, runs_here
from jobs.options import LabelOptions
from jobs.redact import redact
from pipelines import sources, storage
from pipelines.label import (
    LabelPredictor,
    LabelSettings,
    count_known,
    label_dataset,
    make_tasks,
)
from pipelines.sink import (
    JOB_FILE,
    SUMMARY_FILE,
    OutputDir,
    OutputError,
    Progress,
    skip_pandas_probe,
)

KEY_COLUMNS = ["source", "path", "label", "error"]  # read back from an interrupted run
# One core labels ~1,300 28x28 digits a second with the MNIST net (bench/label.py); a job
# whose size is unknown before reading (Parquet, streamed tars) counts as big.
IMAGES_PER_CPU_S = 1300


@dataclasses.dataclass
class Layout:
    """How the actor pool sits on the cluster."""

    actors: int
    num_cpus: float  # per actor; fractional so Ray Data's own tasks never starve
    num_gpus: float
    threads: int  # torch threads per actor
    decode_threads: int


def run_label(opts: LabelOptions, console: Console | None = None) -> dict:
    """Runs the job; returns the summary that it also writes to OUTPUT/summary.json."""
    console = console or Console(stderr=True, soft_wrap=True)
    check_options(opts)
    start = time.monotonic()
    if may_run_here(opts):
        skip_pandas_probe()
    loaded = storage.load_model(opts.model, expect_kind="cnn")  # fail fast, before Ray
    units = sources.plan(opts.inputs)
    out = OutputDir(opts.output, job_identity(opts, loaded.id), opts.overwrite)
    refuse_finished(out)
    held = out.prepare(KEY_COLUMNS)
    tasks = make_tasks(units, {(s, p) for s, p, _, _ in held})
    settings = LabelSettings(opts.model, out.uri, out.run_id, opts.top_k, opts.batch_size,
                             opts.gpu, thumbs=16 if opts.report else 0)
    known = count_known(units)
    progress = Progress(None if known is None else known - len(held), "labeled", console)
    parts: dict[str, dict] = {}
    if held:
        console.print(f"resuming: {len(held):,} rows already in {out.uri}", highlight=False)
    work = float("inf") if known is None else known - len(held)
    if tasks and runs_here(opts, work, IMAGES_PER_CPU_S):
        workers = min(local_cpus(), len(tasks))
        console.print(f"labeling {len(tasks):,} unit(s) in this process on {workers} "
                      f"thread(s) with {loaded.id}", highlight=False)
        parts = follow(label_here(tasks, settings, workers, loaded), progress)
    elif tasks:
        with ray_session(RayOptions(address=opts.address)), quiet_ray_data():
            layout = actor_layout(opts, len(tasks))
            console.print(f"labeling {len(tasks):,} units with {layout.actors} actor(s) of "
                          f"{loaded.id}", highlight=False)
            settings = dataclasses.replace(settings, threads=layout.threads,
                                           decode_threads=layout.decode_threads)
            ds = label_dataset(tasks, settings, layout.actors, layout.num_cpus, layout.num_gpus)
            parts = follow((json.loads(row["stats"]) for row in ds.iter_rows()), progress)
    summary = make_summary(opts, loaded.id, held, parts, time.monotonic() - start)
    if opts.report:  # before summary.json, whose presence marks the job finished
        from jobs.label_report import write_report

        summary["report"] = write_report(out, summary, parts, console)
    out.write_summary(summary)
    print_totals(console, summary, out.uri)
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


def check_options(opts: LabelOptions) -> None:
    if opts.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {opts.top_k}")
    if opts.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.actors is not None and opts.actors < 1:
        raise ValueError(f"--actors must be at least 1, got {opts.actors}")
    if not opts.inputs:
        raise ValueError("give at least one --input")


def job_identity(opts: LabelOptions, model_id: str) -> dict:
    """What decides the rows of the output: a re-run with other values is another job."""
    return {"job": "label", "model": model_id, "inputs": list(opts.inputs), "top_k": opts.top_k}


def refuse_finished(out: OutputDir) -> None:
    """A finished output is never added to: new files in an input directory would otherwise
    be appended to it silently under the old summary."""
    if out.overwrite or not storage.exists(storage.join(out.uri, SUMMARY_FILE)):
        return
    job_uri = storage.join(out.uri, JOB_FILE)
    held = json.loads(storage.read_bytes(job_uri)) if storage.exists(job_uri) else None
    if held == out.job:  # another job's output: prepare() says how they differ
        raise OutputError(f"{out.uri} holds a finished label job (it has {SUMMARY_FILE}); "
                          "pass --overwrite to label again or choose another --output")


def actor_layout(opts: LabelOptions, units: int) -> Layout:
    """CPU: an actor per CPU free now (a job's driver holds some), each asking 0.9 of a CPU so
    that Ray Data's own tasks always find room (ray#44687: a pool holding every CPU starves
    them). Each runs its model on one torch thread and reads and decodes ahead of it on
    another: decoding costs a fraction of the model, so the decode threads interleave with
    the models and every core runs a model (2 actors on 2 CPUs label ~1.8x faster than one
    actor with a core for its model and a core for its decoding, measured with bench/label.py).
    GPU: one GPU per actor; with --actors the pool may wait for an autoscaler to add GPUs."""
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
        share = max(1, min(8, node_cpus - 1, (cpus - 1) // max(1, actors)))
        return Layout(actors, share * 0.9, 1, 1, share)
    actors = min(opts.actors or cpus, units)
    cores = 0.9 if actors <= cpus else max(0.1, cpus * 0.9 / actors)
    return Layout(actors, round(cores, 3), 0, 1, 1)


def label_here(tasks: list[dict], settings: LabelSettings, workers: int,
               loaded=None) -> Iterator[dict]:
    """The actor's own code in this process, on `workers` threads with one torch thread
    each (as each actor has): the stats of each part as it is written."""
    settings = dataclasses.replace(settings, threads=1, decode_threads=workers)
    return LabelPredictor(settings, loaded).label_tasks(tasks, workers)


def follow(stats_rows: Iterable[dict], progress: Progress) -> dict[str, dict]:
    """Streams the stats of every part written, keyed by part so that a part a retried task
    wrote again counts once."""
    parts: dict[str, dict] = {}
    for stats in stats_rows:
        again = parts.get(stats["part"])
        parts[stats["part"]] = stats
        if again is None:
            progress.update(stats["rows"], sum(stats["errors"].values()))
    return parts


def make_summary(opts: LabelOptions, model_id: str, held: set[tuple], parts: dict[str, dict],
                 elapsed: float) -> dict:
    """summary.json: rows of this run and of earlier interrupted runs of the same job."""
    written = sum(p["rows"] for p in parts.values())
    errors: Counter = Counter(e.split(":", 1)[0] for _, _, _, e in held if e)
    labels: Counter = Counter(lab for _, _, lab, _ in held if lab is not None)
    for p in parts.values():
        errors.update(p["errors"])
        labels.update(p["labels"])
    rows = written + len(held)
    args = {k: v for k, v in dataclasses.asdict(opts).items()}
    args = {k: ([redact(x) for x in v] if isinstance(v, list) else
                redact(v) if isinstance(v, str) else v) for k, v in args.items()}
    return {
        "rows_in": rows,
        "rows_written": written,
        "rows_resumed": len(held),
        "rows_labeled": rows - sum(errors.values()),
        "errors": dict(sorted(errors.items())),
        "error_rows": sum(errors.values()),
        "labels": dict(sorted(labels.items(), key=lambda kv: -kv[1])),
        "elapsed_s": round(elapsed, 3),
        "rows_per_s": round(written / elapsed, 1) if elapsed > 0 else 0.0,
        "parts": len(parts),
        "model": model_id,
        "args": args,
        "kiln_version": models.__version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def print_totals(console: Console, summary: dict, where: str) -> None:
    errors = ", ".join(f"{k} {v:,}" for k, v in summary["errors"].items()) or "none"
    resumed = f" ({summary['rows_resumed']:,} from an earlier run)" if summary["rows_resumed"] \
        else ""
    console.print(
        f"[bold]done:[/] {summary['rows_in']:,} rows{resumed}, {summary['rows_labeled']:,} "
        f"labeled, {summary['error_rows']:,} errors ({errors}); {summary['rows_written']:,} "
        f"written in {summary['elapsed_s']:.1f} s ({summary['rows_per_s']:,.0f} rows/s) "
        f"-> {redact(where)}", highlight=False)
