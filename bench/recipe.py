"""The photo recipe taken apart (issue #34): ResNet-20 on the team's colour photo set
(kiln.embedded.photos, 20,000 train / 2,000 test JPEGs of 10 classes), one change at a time
from kiln's recipe before this work to the strengthened plain recipe, then the pieces the
fastest CIFAR trainers add, each at the same training-time budget and over several seeds.

Every variant runs bench/plain/resnet.py (one process, 2 threads, plain PyTorch) with the
options that reproduce one piece: kiln's old recipe was zero padding, 20 warm-up steps,
batch norm over each worker's 64 images (2 workers), 2% of the images held out and the
weights that validated best on them kept (--pad zeros --warmup 20 --bn-batch 64
--val-fraction 0.02 --select best). The figure is the test accuracy of the weights kept.

    .venv/bin/python bench/recipe.py [--budget 120] [--seeds 0 1] [--only NAME ...]
    .venv/bin/python bench/recipe.py --lm [--budget 180]
Writes the "## Photo recipe" (with --lm, "## Char-RNN recipe") section of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sections import write_section  # noqa: E402
from bench.train import archive  # noqa: E402
from kiln import embedded  # noqa: E402

OLD = ["--pad", "zeros", "--warmup", "20", "--bn-batch", "64", "--val-fraction", "0.02",
       "--select", "best"]
VARIANTS = {  # name: (what it is, the options)
    "kiln before": ("kiln's recipe before this work", OLD),
    "+ reflect": ("... with reflect padding", [*OLD[2:], "--pad", "reflect"]),
    "+ warm-up 200": ("... with 200 warm-up steps", [*OLD[:2], *OLD[4:], "--warmup", "200"]),
    "+ whole-batch BN": ("... with batch norm over the whole batch of 128",
                         [*OLD[:4], *OLD[6:]]),
    "+ final weights": ("... keeping the final weights (2% still held out)",
                        [*OLD[:-2], "--select", "last"]),
    "plain": ("the strengthened plain recipe: all four, every image trained on", []),
    "plain + EMA": ("... and an EMA of the weights (0.99 a step)", ["--ema", "0.99"]),
    "plain + smoothing": ("... and label smoothing 0.1", ["--label-smoothing", "0.1"]),
    "plain + flip TTA": ("... and each test image's score averaged with its mirror's",
                         ["--tta"]),
}


# The char-RNN's recipe taken apart the same way (bench/plain/charrnn.py, a 2x256 LSTM on the
# Python docs' English prose, the last 10% held out): kiln's (AdamW at 4e-3 held for 70% of
# the run, then decayed to zero; no dropout; 100-character chunks) and one change each.
KILN_LM = ["--lr", "4e-3", "--cooldown", "0.3"]
LM_VARIANTS = {
    "kiln": ("kiln's recipe", KILN_LM),
    "+ dropout 0.1": ("... with dropout 0.1 between layers and before the output",
                      [*KILN_LM, "--dropout", "0.1"]),
    "+ dropout 0.2": ("... with dropout 0.2", [*KILN_LM, "--dropout", "0.2"]),
    "+ 200-char chunks": ("... reading 200-character chunks", [*KILN_LM, "--seq", "200"]),
    "+ last 50% decayed": ("... decaying the rate over the last half", [
        "--lr", "4e-3", "--cooldown", "0.5"]),
}


def run(train: Path, test: Path, budget: float, seed: int, options: list[str],
        script: str = "resnet.py") -> dict:
    names = ("--train", "--test") if script == "resnet.py" else ("--train", "--val")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "plain" / script),
                          names[0], str(train), names[1], str(test), "--budget", str(budget),
                          "--seed", str(seed), *options],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def ablate(variants: dict, measure, row) -> list[str]:
    """Each variant over the seeds (`measure(options)`: one result a seed), as a table row
    `row(name, what, results, base)`, printed as it comes; `base` is the first variant's
    results, which the others are read against."""
    rows, base = [], None
    for name, (what, options) in variants.items():
        res = measure(options)
        base = res if base is None else base
        rows.append(row(name, what, res, base))
        print(rows[-1], flush=True)
    return rows


def lm(budget: float, seeds: list[int]) -> None:
    import sysconfig

    text = (Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py").read_text(
        encoding="utf-8")
    cut = int(len(text) * 0.9)
    tmp = Path(tempfile.mkdtemp(prefix="kiln-recipe-lm-"))
    train, val = tmp / "train.txt", tmp / "val.txt"
    train.write_text(text[:cut], encoding="utf-8")
    val.write_text(text[cut:], encoding="utf-8")

    def row(name, what, res, base):
        last = [r["val_nats_per_char"] for r in res]
        mean = statistics.mean(last)
        ref = statistics.mean(r["val_nats_per_char"] for r in base)
        return (f"| {name} | {what} | {' / '.join(f'{x:.3f}' for x in last)} | {mean:.3f} | "
                f"{mean / ref:.3f}x | "
                f"{statistics.mean(r['best_val_nats_per_char'] for r in res):.3f} |")

    rows = ablate(LM_VARIANTS, lambda options: [
        run(train, val, budget, s, [*options, "--eval-every", str(budget / 4)], "charrnn.py")
        for s in seeds], row)
    body = "\n".join([
        f"2x256 LSTM, English prose ({cut / 1e3:,.0f} kB train / {(len(text) - cut) / 1e3:,.0f} "
        f"kB validation), {budget:.0f} s of training a run, seeds "
        f"{', '.join(map(str, seeds))}; one process, 2 threads (bench/plain/charrnn.py with "
        "the options of each piece). Lower is better.", "",
        "| variant | what changes | final validation nats/char by seed | mean | vs kiln | "
        "best validation (mean) |", "|---|---|---|---|---|---|", *rows, "",
        "Command: `.venv/bin/python bench/recipe.py --lm " + " ".join(
            a for a in sys.argv[1:] if a != "--lm") + "`"])
    write_section("Char-RNN recipe", body)
    print(body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=120)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--per-class", type=int, default=2000)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--lm", action="store_true", help="the char-RNN's recipe instead")
    a = ap.parse_args()
    if a.lm:
        lm(a.budget, a.seeds)
        return
    tmp = Path(tempfile.mkdtemp(prefix="kiln-recipe-"))
    tr_img, tr_lab = embedded.photos(a.per_class, 32, seed=0)
    te_img, te_lab = embedded.photos(max(100, a.per_class // 10), 32, seed=0, part="test")
    train = archive(tmp / "photos.tar", tr_img, tr_lab, "jpg")
    test = archive(tmp / "photos-test.tar", te_img, te_lab, "jpg")

    def row(name, what, res, base):
        accs = [r["test_accuracy"] for r in res]
        mean = statistics.mean(accs)
        ref = statistics.mean(r["test_accuracy"] for r in base)
        return (f"| {name} | {what} | {' / '.join(f'{x:.4f}' for x in accs)} | {mean:.4f} | "
                f"{100 * (mean - ref):+.2f} | {statistics.mean(r['epochs'] for r in res):.1f} |")

    chosen = {name: v for name, v in VARIANTS.items()  # "kiln before": the column's base
              if not a.only or name in a.only or name == "kiln before"}
    rows = ablate(chosen, lambda options: [run(train, test, a.budget, s, options)
                                           for s in a.seeds], row)
    body = "\n".join([
        f"ResNet-20, {len(tr_img):,} train / {len(te_img):,} test photos, {a.budget:.0f} s of "
        f"training a run, seeds {', '.join(map(str, a.seeds))}; one process, 2 threads "
        "(bench/plain/resnet.py with the options of each piece).", "",
        "| variant | what changes | test accuracy by seed | mean | vs kiln before, points | "
        "epochs |", "|---|---|---|---|---|---|", *rows, "",
        "Command: `.venv/bin/python bench/recipe.py " + " ".join(sys.argv[1:]) + "`"])
    write_section("Photo recipe", body)
    print(body)


if __name__ == "__main__":
    main()
