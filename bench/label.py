"""Labeling benchmark: `kiln label` against the plain single-process loop a user would write
(open the tar, PIL-decode, batch, predict, write Parquet), side by side in one run on the same
tar of digit PNGs with the same model, plus the fixed start-up of `kiln label` on 100 images
and the model alone as a fraction of the machine's fp32 matmul peak. Writes the "## Labeling"
section of BENCHMARKS.md.

    .venv/bin/python bench/label.py [--images 40000] [--rounds 3] [--actors N]

Rounds alternate plain, kiln on N images and kiln on 100 images, so that a neighbour's load
hits all three alike; figures are medians over rounds. kiln's end-to-end rate leaves out its
fixed start-up: (N - 100) / (T_N - T_100), both whole `python -m jobs label` commands."""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH, TOP_K = 128, 5


def make_data(work: Path, n: int) -> tuple[Path, Path, Path]:
    """A tar of n digit PNGs (the 1,797 digits over and over), one of 100, and an untrained
    mnist_cnn (throughput does not depend on the weights)."""
    import torch

    from jobs import embedded
    from models import CNNSpec, build_cnn, save_folder

    pngs, labels = embedded.digits(28)
    names = [f"{labels[i % len(pngs)]}/{i:06d}.png" for i in range(n)]
    big = embedded.write_flat_archive(work / f"digits-{n}.tar",
                                      [pngs[i % len(pngs)] for i in range(n)], names)
    small = embedded.write_flat_archive(work / "digits-100.tar", pngs[:100], names[:100])
    torch.manual_seed(0)
    model = work / "model"
    save_folder(model, build_cnn("mnist_cnn", 10, 1, 28).eval(), "cnn",
                CNNSpec("mnist_cnn", [str(i) for i in range(10)]))
    return big, small, model


def plain_loop(tar: str, model_dir: str, out: str) -> dict:
    """What a user writes without kiln: one process, decode then predict, batch by batch."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from models import load_folder

    start = time.perf_counter()
    loaded = load_folder(model_dir, expect_kind="cnn")
    model, classes = loaded.model.eval(), np.asarray(loaded.spec.classes)
    cols = {"path": [], "label": [], "confidence": [], "top_labels": [], "top_scores": []}

    def predict(names, images):
        x = torch.from_numpy(np.stack(images)).float().div_(255).sub_(0.5).div_(0.5)
        with torch.inference_mode():
            scores, idx = torch.softmax(model(x), 1).topk(TOP_K, 1)
        scores, idx = scores.numpy(), idx.numpy()
        cols["path"] += names
        cols["label"] += classes[idx[:, 0]].tolist()
        cols["confidence"] += scores[:, 0].tolist()
        cols["top_labels"] += classes[idx].tolist()
        cols["top_scores"] += scores.tolist()

    names, images = [], []
    with tarfile.open(tar) as tf:
        for member in tf:
            if not member.isfile():
                continue
            img = Image.open(io.BytesIO(tf.extractfile(member).read())).convert("L")
            names.append(member.name)
            images.append(np.asarray(img)[None])  # (1, 28, 28) uint8
            if len(images) == BATCH:
                predict(names, images)
                names, images = [], []
    if images:
        predict(names, images)
    pq.write_table(pa.table(cols), out)
    seconds = time.perf_counter() - start
    return {"images": len(cols["path"]), "seconds": seconds}


def run_plain(tar: Path, model: Path, out: Path) -> dict:
    """The plain loop in a fresh process, like a user's script (imports not timed)."""
    cmd = [sys.executable, __file__, "--plain", str(tar), str(model), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_kiln(tar: Path, model: Path, out: Path, actors: int | None) -> dict:
    """A whole `python -m jobs label` command, timed from launch to exit."""
    cmd = [sys.executable, "-m", "jobs", "label", "--model", str(model), "--input", str(tar),
           "--output", str(out), "--overwrite", "--batch-size", str(BATCH)]
    if actors:
        cmd += ["--actors", str(actors)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    for _attempt in range(3):  # a local Ray may time out starting on a very busy machine
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if "timed out during startup" not in res.stderr:
            break
        start = time.perf_counter()
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"kiln label failed:\n{res.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"images": summary["rows_written"], "seconds": seconds, "summary": summary}


def matmul_peak(threads: int) -> float:
    """fp32 GFLOP/s of a 2048^3 matmul, best of several."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = 0.0
    for _ in range(6):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048**3 / (time.perf_counter() - t) / 1e9)
    return best


def model_only(threads: int, channels_last: bool) -> tuple[float, float]:
    """(images/s, MFLOP an image) of mnist_cnn on pre-decoded batches of BATCH, best of 5."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models import build_cnn

    torch.set_num_threads(threads)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_cnn("mnist_cnn", 10, 1, 28).eval().to(memory_format=fmt)
    x = torch.randn(BATCH, 1, 28, 28).contiguous(memory_format=fmt)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            model(x)
        best = 0.0
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(8):
                model(x)
            best = max(best, 8 * BATCH / (time.perf_counter() - t))
    return best, counter.get_total_flops() / BATCH / 1e6


def measure(args, work: Path) -> dict:
    big, small, model = make_data(work, args.images)
    rounds = []
    for r in range(args.rounds):
        pool = args.actors or os.cpu_count() or 1  # the default pool's size
        row = {"plain": run_plain(big, model, work / "plain.parquet"),
               "kiln": run_kiln(big, model, work / "kiln-out", args.actors),
               # 100 images are one unit: kiln runs them in its own process...
               "start": run_kiln(small, model, work / "kiln-100", None),
               # ... and --actors makes it start Ray as for the big job: its fixed cost.
               "start_ray": run_kiln(small, model, work / "kiln-100-ray", pool)}
        print(f"round {r + 1}: plain {rate(row['plain']):,.0f} img/s, kiln "
              f"{row['kiln']['seconds']:.1f} s for {args.images:,}, 100 images "
              f"{row['start']['seconds']:.1f} s (on Ray {row['start_ray']['seconds']:.1f} s)",
              flush=True)
        rounds.append(row)
    cpus = os.cpu_count() or 1
    peak = {t: matmul_peak(t) for t in sorted({1, cpus})}
    eager, mflop = model_only(cpus, channels_last=False)
    actor_model, _ = model_only(1, channels_last=True)
    return {"rounds": rounds, "peak": peak, "model_eager": eager, "model_actor": actor_model,
            "mflop": mflop, "cpus": cpus}


def rate(run: dict) -> float:
    return run["images"] / run["seconds"]


def report(res: dict, args) -> str:
    n = args.images
    plain = statistics.median(rate(r["plain"]) for r in res["rounds"])
    t_n = statistics.median(r["kiln"]["seconds"] for r in res["rounds"])
    t_100 = statistics.median(r["start"]["seconds"] for r in res["rounds"])
    t_100_ray = statistics.median(r["start_ray"]["seconds"] for r in res["rounds"])
    kiln_marginal = (n - 100) / (t_n - t_100_ray)
    summary = res["rounds"][-1]["kiln"]["summary"]
    actors = args.actors or res["cpus"]
    cpus, peak, mflop = res["cpus"], res["peak"], res["mflop"]
    eager_frac = res["model_eager"] * mflop / 1e3 / peak[cpus]
    actor_frac = res["model_actor"] * mflop / 1e3 / peak[1]
    per_round = "; ".join(f"{rate(r['plain']):,.0f}, {r['kiln']['seconds']:.1f} s, "
                          f"{r['start']['seconds']:.1f} s, {r['start_ray']['seconds']:.1f} s"
                          for r in res["rounds"])
    machine = f"{cpus} CPUs, {platform.machine()}"
    lines = [
        "## Labeling",
        "",
        f"`kiln label` against the plain single-process loop (open the tar, PIL decode, batch "
        f"{BATCH}, predict, write Parquet with the same top-{TOP_K} columns), side by side in "
        f"one run on one tar of {n:,} 28x28 digit PNGs with the same untrained `mnist_cnn`; "
        f"{machine}; {len(res['rounds'])} alternating rounds, medians. The machine is shared "
        "with other work: compare the figures of one run with each other, not across runs.",
        "",
        "| | images/s | vs plain |",
        "| --- | ---: | ---: |",
        f"| plain loop (1 process, torch's default {cpus} threads) | {plain:,.0f} | 1.00x |",
        f"| **kiln label, end to end without its fixed start-up**, (N - 100) / (T_N - T_100,Ray) "
        f"| **{kiln_marginal:,.0f}** | **{kiln_marginal / plain:.2f}x** |",
        f"| kiln label, whole command including start-up, N / T_N | {n / t_n:,.0f} "
        f"| {n / t_n / plain:.2f}x |",
        "",
        f"- Start-up, `kiln label` on 100 images, the whole command: **{t_100:.1f} s** "
        "(target <= 15 s). 100 images are one unit of work, which kiln labels in its own "
        "process with the actor's code (imports, model, decode, predict, Parquet, summary).",
        f"- Ray's fixed cost, the same 100 images with `--actors {actors}` (which makes kiln "
        f"start a local Ray as for the big job: Ray's start, {actors} actor(s) importing torch "
        f"and loading the model, Ray's shutdown): T_100,Ray = {t_100_ray:.1f} s. "
        f"T_N = {t_n:.1f} s for {n:,} images.",
        f"- Per actor: {kiln_marginal / actors:,.0f} images/s ({actors} actor(s), each 0.9 CPU "
        "a core it holds, 1 torch thread + 1 read/decode thread).",
        f"- Model alone on pre-decoded batches of {BATCH} ({mflop:.1f} MFLOP an image): the "
        f"plain loop's eager NCHW model on {cpus} threads runs {res['model_eager']:,.0f} "
        f"images/s = {res['model_eager'] * mflop / 1e3:.0f} GFLOP/s = **{eager_frac:.0%} of "
        f"the fp32 matmul peak** ({peak[cpus]:.0f} GFLOP/s on {cpus} threads, measured here); "
        f"kiln's actor model (channels-last, 1 thread) runs {res['model_actor']:,.0f} images/s "
        f"= **{actor_frac:.0%} of the 1-thread peak** ({peak[1]:.0f} GFLOP/s).",
        f"- Rounds (plain images/s, kiln T_N, T_100, T_100,Ray): {per_round}.",
        f"- kiln's last summary: {summary['rows_written']:,} rows, {summary['error_rows']} "
        f"errors, {summary['parts']} parts.",
        "",
        f"Command: `.venv/bin/python bench/label.py --images {n} --rounds "
        f"{len(res['rounds'])}" + (f" --actors {args.actors}" if args.actors else "") + "`",
        "",
    ]
    return "\n".join(lines)


def write_section(md: Path, section: str) -> None:
    """Replaces (or appends) the "## Labeling" section; other sections stay as they are."""
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    start = text.find("\n## Labeling")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        tail = text[end:] if end >= 0 else ""
        text = text[: start + 1] + section + tail
    md.write_text(text)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--plain":
        print(json.dumps(plain_loop(*sys.argv[2:])))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=40_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--actors", type=int, default=None, help="passed to kiln label --actors")
    p.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md alone")
    args = p.parse_args()
    if args.images < 20_000:
        print("note: the benchmark's figures are meant for >= 20,000 images", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-label-") as tmp:
        res = measure(args, Path(tmp))
    section = report(res, args)
    print(section)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", section)


if __name__ == "__main__":
    main()
