"""`kiln eval`: measure a trained model on labeled data.

A CNN scores a labeled image set (any training format: a class-per-folder directory or
archive, or Parquet with image and label) through the same bulk driver, actors and decode as
`kiln label` (so the same error rows, parts, resume and in-process rule for small jobs), each
row also holding its true class; once every row is written the figures go to
OUTPUT/eval.json and OUTPUT/eval.html (jobs/reports/eval.py). A char-RNN reads text and
reports nats and bits per character over the whole of it, its state carried from the first
character to the last, as char-rnn evaluates."""

from __future__ import annotations

import heapq
import io
import json
import math
import time
from dataclasses import replace

import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from kiln.bulk.label import LabelJob
from kiln.bulk.run import check_options, prepare_process, run_bulk
from kiln.cluster import connect
from kiln.cluster.placement import Placement
from kiln.options import EvalOptions
from kiln.pipelines import storage
from kiln.pipelines.fence import check_output
from kiln.pipelines.label import LabelSettings, flip_tta
from kiln.pipelines.sink import OutputDir
from kiln.redact import redact
from kiln.train.families import family

EVAL_FILE, PAGE_FILE = "eval.json", "eval.html"
COLUMNS = ["source", "path", "label", "confidence", "top_labels", "error", "truth"]
STREAM_CHARS = 10_000  # a char-RNN reads the text as streams of at least this many characters
MAX_STREAMS = 64


class EvalJob(LabelJob):
    name, verb, done_word = "eval", "scoring", "scored"

    def identity(self) -> dict:
        return {"model": self.loaded.id, "data": self.opts.data,
                **({"tta": True} if self.tta else {})}

    def settings(self, out, layout) -> LabelSettings:
        o = self.opts
        return LabelSettings(o.model, out.uri, out.run_id, 5, o.batch_size, o.gpu,
                             threads=layout.threads, decode_threads=layout.decode_threads,
                             truth=True, tta=self.tta)

    def finish(self, out: OutputDir, summary: dict, parts: dict, console: Console) -> None:
        from kiln.pipelines.thumbnails import fetch_thumbnails
        from kiln.reports.eval import image_metrics, render

        scored = read_scored(out)
        if not scored["truth"]:
            raise ValueError(f"nothing to score: every row of {redact(self.opts.data)} is an "
                             f"error row ({summary['error_rows']:,}) or has no class "
                             f"({scored['unlabeled']:,}); the rows are in "
                             f"{redact(self.opts.output)}")
        figures = image_metrics(scored["truth"], scored["pred"], scored["conf"],
                                scored["top5"], list(self.loaded.spec.classes))
        figures["unlabeled_rows"] = scored["unlabeled"]
        sheet = [dict(zip(("confidence", "source", "path", "label", "truth"), m, strict=True))
                 for m in sorted(scored["mistakes"], reverse=True)]
        thumbs = fetch_thumbnails([(r["source"], r["path"]) for r in sheet]) if sheet else {}
        for r in sheet:
            r["image"] = thumbs.get((r["source"], r["path"]))
        record = {"kind": "cnn", "model": self.loaded.id, "data": redact(self.opts.data),
                  "tta": "flip" if self.tta else "none", "error_rows": summary["error_rows"],
                  **figures}
        storage.write_bytes(storage.join(out.uri, EVAL_FILE), json.dumps(record, indent=1).encode())
        storage.write_bytes(storage.join(out.uri, PAGE_FILE),
                            render(summary, figures, sheet).encode())
        summary["eval"] = {k: figures[k] for k in ("images", "accuracy", "top5_accuracy", "ece")}
        summary["eval"]["macro_f1"] = figures["macro"]["f1"]
        console.print(class_table(figures))

    def totals(self, summary: dict) -> str:
        f = summary["eval"]
        errors = ", ".join(f"{k} {v:,}" for k, v in summary["errors"].items()) or "none"
        return (f"[bold]done:[/] {f['images']:,} images scored, {summary['error_rows']:,} "
                f"error rows ({errors}): accuracy {f['accuracy']:.4f}, top-5 "
                f"{f['top5_accuracy']:.4f}, macro F1 {f['macro_f1']:.4f}, ECE {f['ece']:.4f} "
                f"in {summary['elapsed_s']:.1f} s -> {redact(self.opts.output)}/{EVAL_FILE}")


def read_scored(out: OutputDir) -> dict:
    """The scored rows, a part at a time (an eval set of millions is not held as rows):
    true and predicted classes, confidences, top-5 hits, the rows without a class, and the
    SHEET most confident mistakes as (confidence, source, path, label, truth)."""
    from kiln.reports.eval import SHEET, TOP

    got: dict = {"truth": [], "pred": [], "conf": [], "top5": [], "unlabeled": 0,
                 "mistakes": []}
    for part in out.parts():
        t = pq.read_table(io.BytesIO(storage.read_bytes(part)), columns=COLUMNS)
        t = t.filter(pc.is_null(t["error"]))
        got["unlabeled"] += t.num_rows - t["truth"].drop_null().length()
        t = t.filter(pc.is_valid(t["truth"]))
        truth, pred = t["truth"].to_pylist(), t["label"].to_pylist()
        conf = t["confidence"].to_pylist()
        tops = t["top_labels"].to_pylist()
        got["truth"] += truth
        got["pred"] += pred
        got["conf"] += conf
        got["top5"] += [y in k[:TOP] for y, k in zip(truth, tops, strict=True)]
        wrong = [(c, s, p, yhat, y) for c, s, p, yhat, y in zip(
            conf, t["source"].to_pylist(), t["path"].to_pylist(), pred, truth, strict=True)
            if yhat != y]
        got["mistakes"] = heapq.nlargest(SHEET, got["mistakes"] + wrong)
    return got


def class_table(figures: dict) -> Table:
    table = Table(title="per class", title_justify="left")
    for name in ("class", "precision", "recall", "F1", "support"):
        table.add_column(name, justify="left" if name == "class" else "right")
    for r in figures["per_class"]:
        name = r["class"] + ("" if r["seen_in_training"] else " (not a class of the model)")
        table.add_row(name, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}",
                      f"{r['support']:,}")
    return table


def run_eval(opts: EvalOptions, console: Console | None = None) -> dict:
    """Runs the evaluation; returns its summary (OUTPUT/summary.json; the figures are in
    OUTPUT/eval.json)."""
    console = console or connect.console()
    where = check_options(opts)
    flip_tta(opts.tta, {})  # a known value, before anything is read
    opts = replace(opts, data=storage.absolute(opts.data),  # actors read it from elsewhere
                   output=check_output(opts.output, [opts.data, opts.model]))
    fam = family(storage.read_model_config(opts.model)["kind"])
    if fam.evaluates == "text":
        if opts.tta == "flip":
            raise ValueError("--tta flip averages an image with its mirror image: a text "
                             "model has none (leave --tta out)")
        if opts.actors is not None:
            raise ValueError("kiln eval of a char-RNN is one pass over the text in this "
                             "process: --actors does not apply (leave it out)")
        if opts.gpu and where.cluster:  # place() counts a cluster's GPUs; this runs here
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--gpu was given but this machine has no CUDA GPU (a "
                                 "char-RNN's evaluation runs in this process); drop --gpu")
        if where.cluster:  # often RAY_ADDRESS, which Ray Jobs sets for every job's driver
            console.print("a char-RNN's evaluation is one pass over the text in this "
                          "process: it does not use the Ray cluster", highlight=False)
        return eval_text(opts, console, where)
    return eval_images(opts, console, where)


def eval_images(opts: EvalOptions, console: Console, where: Placement) -> dict:
    """Accuracy, per-class figures, confusion and calibration over labeled images, as a bulk
    job (in this process or on Ray)."""
    from kiln.pipelines.train_data import check_image_source

    prepare_process(where)
    units, _ = check_image_source(opts.data, min_classes=1)  # before torch loads
    loaded = storage.load_model(opts.model, expect_kind="cnn")
    return run_bulk(EvalJob(opts, loaded, units, where), console)


def eval_text(opts: EvalOptions, console: Console, where: Placement) -> dict:
    """nats/char and bits/char of a char-RNN over the whole text, in this process."""
    from kiln.pipelines.train_data import read_text

    start = time.monotonic()
    text = read_text(opts.data)
    loaded = storage.load_model(opts.model, expect_kind="rnn")
    out = OutputDir(opts.output, {"job": "eval", "model": loaded.id, "data": opts.data},
                    opts.overwrite)
    out.prepare([])
    try:
        return _eval_text(opts, console, out, text, loaded, start, where.cpus)
    finally:
        out.close()


def _eval_text(opts: EvalOptions, console: Console, out: OutputDir, text: str, loaded,
               start: float, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    device = torch.device("cuda" if opts.gpu else "cpu")  # in this process, Ray or not
    nats, chars, streams = text_loss(loaded.model.to(device), loaded.vocab.encode(text), device)
    record = {"kind": "rnn", "model": loaded.id, "data": redact(opts.data), "characters": chars,
              "nats_per_char": nats, "bits_per_char": nats / math.log(2),
              "unknown_chars": loaded.vocab.count_unknown(text), "streams": streams}
    storage.write_bytes(storage.join(out.uri, EVAL_FILE), json.dumps(record, indent=1).encode())
    elapsed = time.monotonic() - start
    summary = {"job": "eval", "model": loaded.id, "eval": record,
               "elapsed_s": round(elapsed, 3), "arguments": {"model": redact(opts.model),
                                                             "data": redact(opts.data)}}
    out.write_summary(summary)
    unknown = record["unknown_chars"]
    console.print(f"[bold]done:[/] {chars:,} characters: {nats:.4f} nats/char, "
                  f"{record['bits_per_char']:.4f} bits/char ({unknown:,} characters the model's "
                  f"vocabulary lacks, read as unknown) in {elapsed:.1f} s -> "
                  f"{redact(opts.output)}/{EVAL_FILE}", highlight=False)
    return summary


def text_loss(model, ids: list[int], device=None, chunk: int = 1000
              ) -> tuple[float, int, int]:
    """(mean nats per predicted character, characters predicted, streams): every character
    after the first is predicted from all before it in its stream. A long text is cut into
    up to MAX_STREAMS streams of STREAM_CHARS or more, stepped side by side; the last
    stream's state carries on through the few characters left over."""
    import torch

    from kiln.models.rnn import nll_sum

    x = torch.tensor(ids, dtype=torch.int64, device=device)
    if len(x) < 2:
        raise ValueError("the text is too short to score: it needs two characters")
    streams = max(1, min(MAX_STREAMS, (len(x) - 1) // STREAM_CHARS))
    length = (len(x) - 1) // streams
    batch = torch.stack([x[i * length : (i + 1) * length + 1] for i in range(streams)])
    model.eval()
    with torch.inference_mode():
        total, state = nll_sum(model, batch, chunk)
        tail = x[streams * length :]  # starts at the last stream's final character
        if len(tail) > 1:
            last = tuple(s[:, -1:].contiguous() for s in state) if isinstance(state, tuple) \
                else state[:, -1:].contiguous()
            total += nll_sum(model, tail[None], chunk, last)[0]
    return float(total) / (len(x) - 1), len(x) - 1, streams
