"""The review loop, measured: `kiln label` -> `kiln review` -> `kiln train --init`, with a scripted
reviewer that answers with the true labels through the HTTP API the page uses.

Digits (scikit-learn's, 28x28): a pool of 80% to label and review, a test set of 20% that
nothing trains on. Round 0 reviews 10% of the pool at random (the labels a user starts with)
and trains a model on them. Each later round labels the pool with the last model (the same
output, --overwrite: its reviews stay), reviews K more rows, either the first K that the page
shows (kiln's order: the least certain first) or K at random, and fine-tunes the last model on
every reviewed row (--init). Each model is scored on the test set (kiln eval). Reference: a
model trained on every pool label with the same steps.

Label errors: the pool with 10% of its labels flipped at random trains a model, kiln eval scores
that model on the same flipped pool (its `truth`: the given labels), and the page's order of
that output is read through the API: the share of flipped rows among the first 20% it shows.

    .venv/bin/python bench/review.py [--rounds 4] [--steps 200]
Writes the "## Review loop" section of BENCHMARKS.md and bench/review.png."""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sections import write_section  # noqa: E402
from kiln import embedded  # noqa: E402
from kiln.models import CNNSpec, build_model, model_to_bytes  # noqa: E402
from kiln.pipelines import storage  # noqa: E402


def kiln(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "kiln", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"kiln {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, BytesIO(data))
    return path


class Reviewer:
    """`kiln review` in its own process, answered through its HTTP API."""

    def __init__(self, labels: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "kiln", "review", "--labels",
                                      str(labels), "--port", "0", "--reviewer", "script"],
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line.startswith("review: "):
            raise SystemExit(f"kiln review did not start: {line}")
        self.url = line.split()[1].rstrip("/")

    def unreviewed(self) -> list[dict]:
        """Every row not yet reviewed, in the page's order."""
        rows, offset = [], 0
        while True:
            with urllib.request.urlopen(f"{self.url}/api/rows?limit=200&offset={offset}") as r:
                page = json.loads(r.read())
            rows += page["rows"]
            offset += len(page["rows"])
            if not page["rows"] or offset >= page["total"]:
                return rows

    def answer(self, row: dict, truth: str) -> None:
        action = "accept" if row["label"] == truth else "correct"
        body = json.dumps({"i": row["i"], "action": action, "label": truth}).encode()
        req = urllib.request.Request(f"{self.url}/api/decide", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            r.read()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def accuracy(model: Path, test: Path, out: Path) -> float:
    kiln("eval", "--model", model, "--data", test, "--output", out)
    return json.loads((out / "eval.json").read_text())["accuracy"]


def review_round(labels: Path, truth: dict, k: int, order: str, rng: random.Random) -> int:
    rev = Reviewer(labels)
    try:
        rows = rev.unreviewed()
        picked = rows[:k] if order == "kiln" else rng.sample(rows, min(k, len(rows)))
        for row in picked:
            rev.answer(row, truth[row["path"]])
    finally:
        rev.close()
    return len(picked)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    train_args = ["--max-steps", args.steps, "--batch-size", 64, "--workers", 1]

    pngs, classes = embedded.digits(28)
    order = list(range(len(pngs)))
    random.Random(args.seed).shuffle(order)
    cut = int(0.8 * len(order))
    pool, test = order[:cut], order[cut:]
    truth = {f"p/{i:04d}.png": classes[i] for i in pool}
    k = len(pool) // 10
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kiln-review-bench-") as tmp:
        d = Path(tmp)
        pool_tar = write_tar(d / "pool.tar", {f"p/{i:04d}.png": pngs[i] for i in pool})
        test_tar = write_tar(d / "test.tar", {f"{classes[i]}/{i:04d}.png": pngs[i]
                                              for i in test})
        every = write_tar(d / "every.tar", {f"{classes[i]}/{i:04d}.png": pngs[i] for i in pool})
        kiln("train", "cnn", "--data", every, "--out", d / "every", *train_args)
        full = accuracy(d / "every", test_tar, d / "ev-every")
        print(f"every label ({len(pool)}): test accuracy {full:.4f}", flush=True)

        # Round 0, shared: a random tenth of the pool reviewed, a model trained on it. Its
        # label output is copied for each order, reviews and all.
        seed_model = d / "m-untrained"  # only to label round 0: its labels are noise
        spec = CNNSpec("mnist_cnn", sorted(set(classes)))
        storage.save_model(str(seed_model / "model"),
                           model_to_bytes(build_model("cnn", spec), "cnn", spec))
        base = d / "labels-base"
        kiln("label", "--model", seed_model, "--input", pool_tar, "--output", base)
        review_round(base, truth, k, "random", random.Random(args.seed))
        kiln("train", "cnn", "--data", base, "--out", d / "m0", *train_args)
        start = accuracy(d / "m0", test_tar, d / "ev-m0")
        print(f"round 0: {k} random rows reviewed, test accuracy {start:.4f}", flush=True)
        curves = {}
        for strategy in ("kiln", "random"):
            labels = d / f"labels-{strategy}"
            shutil.copytree(base, labels)
            model, rng = d / "m0", random.Random(args.seed + 1)
            points = [(k / len(pool), start)]
            for r in range(1, args.rounds + 1):
                kiln("label", "--model", model, "--input", pool_tar, "--output", labels,
                     "--overwrite")
                review_round(labels, truth, k, strategy, rng)
                nxt = d / f"m-{strategy}-{r}"
                kiln("train", "cnn", "--data", labels, "--out", nxt, "--init", model,
                     *train_args)
                model = nxt
                acc = accuracy(model, test_tar, d / f"ev-{strategy}-{r}")
                points.append(((r + 1) * k / len(pool), acc))
                print(f"{strategy} round {r}: {(r + 1) * k} reviewed, test accuracy "
                      f"{acc:.4f}", flush=True)
            curves[strategy] = points

        # Label errors: a tenth of the pool's labels flipped; the page's order of kiln eval's
        # output of the model trained on them.
        rng = random.Random(args.seed + 2)
        flipped = set(rng.sample(pool, len(pool) // 10))
        given = {i: (rng.choice([c for c in sorted(set(classes)) if c != classes[i]])
                     if i in flipped else classes[i]) for i in pool}
        noisy = write_tar(d / "noisy.tar", {f"{given[i]}/{i:04d}.png": pngs[i] for i in pool})
        kiln("train", "cnn", "--data", noisy, "--out", d / "m-noisy", *train_args)
        kiln("eval", "--model", d / "m-noisy", "--data", noisy, "--output", d / "ev-noisy")
        rev = Reviewer(d / "ev-noisy")
        try:
            shown = rev.unreviewed()
        finally:
            rev.close()
        first = shown[: len(shown) // 5]
        caught = sum(int(r["path"].split("/")[1][:4]) in flipped for r in first)
        share = caught / len(flipped)
        print(f"label errors: {caught} of {len(flipped)} flipped rows among the first "
              f"{len(first)} shown ({share:.0%})", flush=True)
    elapsed = time.monotonic() - t0
    report(curves, full, len(pool), k, share, caught, len(flipped), len(first), args, elapsed)


def reached(points: list, target: float) -> float | None:
    return next((f for f, acc in points if acc >= target), None)


def report(curves, full, pool, k, share, caught, flipped, first, args, elapsed) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, points in curves.items():
        ax.plot([100 * f for f, _ in points], [100 * a for _, a in points], marker="o",
                label="kiln's order (least certain first)" if name == "kiln" else "random rows")
    ax.axhline(100 * full, color="gray", ls="--", label=f"every label ({pool})")
    ax.set_xlabel("pool reviewed (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(ROOT / "bench" / "review.png", dpi=110)
    rows = "\n".join(
        f"| {100 * f:.0f}% | {100 * curves['kiln'][n][1]:.1f}% | "
        f"{100 * curves['random'][n][1]:.1f}% |" for n, (f, _) in enumerate(curves["kiln"]))
    near = full - 0.01
    body = f"""Digits (28x28), a pool of {pool} images to review and {1797 - pool} test images
that nothing trains on; a scripted reviewer answers with the true labels through kiln
review's HTTP API. Round 0 reviews {k} random rows (10%) and trains mnist_cnn on them; each
round then relabels the pool with the last model, reviews {k} more rows and fine-tunes on
every reviewed row (`--init`, {args.steps} steps of 64). Reference: every pool label, the same
steps. `python bench/review.py --rounds {args.rounds} --steps {args.steps}` ({elapsed / 60:.0f}
min).

| pool reviewed | kiln's order | random rows |
| --- | --- | --- |
{rows}
| every label | {100 * full:.1f}% | |

Within a point of every label's accuracy ({100 * near:.1f}%): kiln's order at
{_pct(reached(curves['kiln'], near))}, random rows at {_pct(reached(curves['random'], near))}
of the pool reviewed (goal: at most 40%).

Label errors: with {flipped} of the pool's labels flipped at random, a model trained on them
and scored by kiln eval on the same rows, {caught} of the {flipped} flipped rows
({100 * share:.0f}%) are among the first {first} (20%) rows the page shows (goal: 80%). These
predictions are in-sample (the model trained on the flipped labels); cross-validated ones are
not built yet.

![accuracy against the share of the pool reviewed](bench/review.png)
"""
    write_section("Review loop", body)
    print(body)


def _pct(f: float | None) -> str:
    return "not within the rounds run" if f is None else f"{100 * f:.0f}%"


if __name__ == "__main__":
    main()
