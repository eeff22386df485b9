"""Fine-tuning benchmark: `kiln train --init` against training from scratch, as a user runs
them (whole commands), in one run on this machine, at the same training-time budget.

A ResNet-8 is trained on five of the ten classes of the colour photo set
(kiln.embedded.photos: crops of ten photos bundled with scikit-image and scikit-learn), then
trained on all ten classes for --target-s seconds (--time-limit) in several ways: from
scratch, and from the five-class model with its head replaced, the loaded layers at
--backbone-lr-scale 1, 0.3 and 0.1 of the learning rate, or frozen (--freeze-backbone).
Reported: each run's best test accuracy (test crops come from parts of each photo that no
training crop shows) and its gain over scratch. The scales' figures chose kiln's default
--backbone-lr-scale (1: jobs/options.py).

    .venv/bin/python bench/finetune.py [--per-class 300] [--source-s 120] [--target-s 60]
Writes the "## Fine-tuning" section of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sections import write_section  # noqa: E402
from kiln import embedded  # noqa: E402

COMMON = ["--arch", "resnet8", "--channels", "3", "--image-size", "32", "--workers", "2"]


def kiln_train(*args: str) -> dict:
    out = args[args.index("--out") + 1]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kiln", "train", "cnn", *args],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"kiln train failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    return {"best": max(r["val_accuracy"] for r in rows), "last": rows[-1]["val_accuracy"],
            "epochs": rows[-1]["epoch"], "wall": time.monotonic() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--source-s", type=float, default=120)
    ap.add_argument("--target-s", type=float, default=60)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-ft-"))
    imgs, labels = embedded.photos(a.per_class, 32, seed=0)
    test_imgs, test_labels = embedded.photos(max(50, a.per_class // 5), 32, seed=0, part="test")
    half = set(embedded.PHOTO_CLASSES[:5])
    pick = [i for i, c in enumerate(labels) if c in half]
    pick_test = [i for i, c in enumerate(test_labels) if c in half]
    src_tar = embedded.write_class_tar(tmp / "half.tar", [imgs[i] for i in pick],
                                       [labels[i] for i in pick])
    src_test = embedded.write_class_tar(tmp / "half-test.tar", [test_imgs[i] for i in pick_test],
                                        [test_labels[i] for i in pick_test])
    all_tar = embedded.write_class_tar(tmp / "all.tar", imgs, labels)
    all_test = embedded.write_class_tar(tmp / "all-test.tar", test_imgs, test_labels)
    source = tmp / "source"
    s = kiln_train("--data", str(src_tar), "--val", str(src_test), "--out", str(source),
                   "--time-limit", str(a.source_s / 60), *COMMON)
    print(f"source (5 classes): {s['best']:.4f} in {s['epochs']:.1f} epochs", flush=True)
    target = ["--data", str(all_tar), "--val", str(all_test), "--time-limit",
              str(a.target_s / 60), *COMMON]
    runs = {"from scratch": []}
    for scale in ("1", "0.3", "0.1"):
        runs[f"--init, --backbone-lr-scale {scale}"] = ["--init", str(source),
                                                       "--backbone-lr-scale", scale]
    runs["--init --freeze-backbone"] = ["--init", str(source), "--freeze-backbone"]
    got = {}
    for i, (name, extra) in enumerate(runs.items()):
        got[name] = kiln_train(*target, "--out", str(tmp / f"t{i}"), *extra)
        print(f"{name}: {got[name]['best']:.4f}", flush=True)
    base = got["from scratch"]["best"]
    rows = [f"| {name} | {r['best']:.4f} | {r['last']:.4f} | {r['epochs']:.1f} | "
            f"{(r['best'] - base) * 100:+.1f} pp |" for name, r in got.items()]
    body = "\n".join([
        f"ResNet-8 on the colour photo set at 32 px ({a.per_class} training crops a class; "
        "test crops from parts of each photo no training crop shows). The source model: "
        f"{a.source_s:.0f} s (`--time-limit`) on five classes ({', '.join(sorted(half))}), "
        f"test accuracy {s['best']:.4f} on them. Each target run: all ten classes, "
        f"{a.target_s:.0f} s of training (`--time-limit`, 2 workers), the same for every row; "
        "its wall time adds Ray's and Ray Train's start.", "",
        "| ten-class run | best test accuracy | last | epochs | gain over scratch |",
        "|---|---|---|---|---|", *rows, "",
        "Command: `.venv/bin/python bench/finetune.py " + " ".join(sys.argv[1:]) + "`"])
    write_section("Fine-tuning", body)
    print(body)


if __name__ == "__main__":
    main()
