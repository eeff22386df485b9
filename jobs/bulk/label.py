"""`kiln label`: label every image of the inputs with a trained CNN.

The inputs are planned into units (pipelines.sources), a task each; the shared bulk driver
(jobs/bulk/run.py) skips what an earlier, interrupted run of the same job wrote, runs the rest
with pipelines.label's LabelPredictor in this process or on a Ray Data actor pool, and ends
with summary.json, a totals line and, with --report, report.html."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from rich.console import Console

from kiln.bulk.run import BulkJob, Plan, check_options, prepare_process, run_bulk
from kiln.cluster import connect
from kiln.cluster.placement import Placement
from kiln.options import LabelOptions
from kiln.pipelines import sources, storage
from kiln.pipelines.fence import check_output
from kiln.pipelines.label import LabelPredictor, LabelSettings, flip_tta
from kiln.pipelines.resume import make_tasks, resume_plan
from kiln.pipelines.sink import Written
from kiln.pipelines.sources import count_known, estimated_rows
from kiln.redact import redact

# How many 28x28 digits one core labels a second with the MNIST net (bench/label.py;
# BENCHMARKS.md, Labeling section); a job whose size is unknown before reading (Parquet,
# compressed tars) counts as big, a sharded set of tars as its estimate
# (sources.estimated_rows).
IMAGES_PER_CPU_S = 1300


class LabelJob(BulkJob):
    name, verb, done_word = "label", "labeling", "labeled"
    key_columns = ["source", "path", "label", "error"]
    rate_per_cpu = IMAGES_PER_CPU_S
    decodes = True
    actor = LabelPredictor

    def __init__(self, opts: LabelOptions, loaded, units: list, where=None):
        super().__init__(opts, loaded, where)
        self.units = units
        self.earlier: tuple[Counter, Counter] = Counter(), Counter()  # plan() counts them
        self.tta = flip_tta(opts.tta, loaded.config)

    def identity(self) -> dict:
        # tta only where it is on: an output of a kiln before --tta still resumes.
        return {"model": self.loaded.id, "inputs": list(self.opts.inputs),
                "top_k": self.opts.top_k, **({"tta": True} if self.tta else {})}

    def plan(self, written: Written) -> Plan:
        # Units whose last part is written are skipped whole; the keys of the other parts
        # (the units in flight when an earlier run stopped) are read, and skipped row by row.
        whole, done, legacy = resume_plan(written, self.units)
        errors, labels = Counter(), Counter()
        for p in written.parts:
            if p.stats is not None:
                errors.update(p.stats.get("errors", {}))
                labels.update(p.stats.get("labels", {}))
        for _, _, label, error in legacy:  # an earlier kiln's parts: their rows tell
            if error:
                errors[error.split(":", 1)[0]] += 1
            if label is not None:
                labels[label] += 1
        self.earlier = errors, labels
        tasks = make_tasks(self.units, done, whole)
        known = count_known(self.units)
        rows = None if known is None else max(0, known - written.rows)
        work = rows if rows is not None else max(0.0, estimated_rows(self.units) - written.rows)
        return Plan(tasks, rows, work)

    def settings(self, out, layout) -> LabelSettings:
        o = self.opts
        return LabelSettings(o.model, out.uri, out.run_id, o.top_k, o.batch_size, o.gpu,
                             threads=layout.threads, decode_threads=layout.decode_threads,
                             thumbs=16 if o.report else 0, tta=self.tta)

    def done_errors(self, written: Written) -> Counter:
        return Counter(self.earlier[0])

    def summary(self, written: Written, parts: dict[str, dict], common: dict) -> dict:
        labels = Counter(self.earlier[1])
        for p in parts.values():
            labels.update(p["labels"])
        return {"rows_labeled": common["rows_in"] - common["error_rows"],
                "labels": dict(sorted(labels.items(), key=lambda kv: -kv[1]))}

    def finish(self, out, summary: dict, parts: dict[str, dict], console: Console) -> None:
        if self.opts.report:
            from kiln.reports.label import write_report

            summary["report"] = write_report(out, summary, parts, console)

    def totals(self, summary: dict) -> str:
        errors = ", ".join(f"{k} {v:,}" for k, v in summary["errors"].items()) or "none"
        resumed = summary["rows_resumed"]
        resumed = f" ({resumed:,} from an earlier run)" if resumed else ""
        return (f"[bold]done:[/] {summary['rows_in']:,} rows{resumed}, "
                f"{summary['rows_labeled']:,} labeled, {summary['error_rows']:,} errors "
                f"({errors}); {summary['rows_written']:,} written in "
                f"{summary['elapsed_s']:.1f} s ({summary['rows_per_s']:,.0f} rows/s) -> "
                f"{redact(self.opts.output)}")


def check_label_options(opts: LabelOptions) -> Placement:
    where = check_options(opts)
    if opts.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {opts.top_k}")
    flip_tta(opts.tta, {})  # a known value, before anything is read
    if not opts.inputs:
        raise ValueError("give at least one --input")
    return where


def run_label(opts: LabelOptions, console: Console | None = None) -> dict:
    """Runs the job; returns the summary that it also writes to OUTPUT/summary.json."""
    console = console or connect.console()
    where = check_label_options(opts)
    opts = replace(opts, output=check_output(opts.output, [*opts.inputs, opts.model]),
                   inputs=[storage.absolute(i) for i in opts.inputs])  # the job's identity
    prepare_process(where)
    units = sources.plan(opts.inputs)  # a missing input fails here, before torch loads
    if not units:
        raise ValueError(f"nothing to label: {', '.join(opts.inputs)} holds no files")
    loaded = storage.load_model(opts.model, expect_kind="cnn")  # and a wrong model, before Ray
    return run_bulk(LabelJob(opts, loaded, units, where), console)
