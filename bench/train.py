"""Training benchmark: `kiln train` (Ray Train, 2 workers, as a user runs it) side by side with
independent plain PyTorch scripts (bench/plain/, which import nothing from kiln), in one run,
on this machine, at the same training-time budget.

1. The Keras MNIST network on scikit-learn's digits: held-out accuracy (bench/plain/mnist.py,
   Keras's own recipe: Adam 1e-3, batch 128, no augmentation).
2. ResNet-20 on a 10-class colour photo set cut from photos bundled with scikit-image and
   scikit-learn (kiln.embedded.photos; test crops come from parts of each photo that no
   training crop shows): test accuracy (bench/plain/resnet.py, the standard CIFAR recipe:
   SGD + Nesterov 0.9, lr 0.1 at batch 128, 200 warm-up steps, then decayed linearly to 0
   over the budget, weight decay 5e-4, 4-pixel reflect pad-and-crop + flips, the final
   weights); kiln's figure is `kiln eval` of its `model/` on the test set, as a user scores
   a model.
3. A 2x256 char-LSTM on the Python docs' English prose (pydoc_data/topics.py): validation
   nats/char over the whole validation text with the state carried (bench/plain/charrnn.py,
   karpathy/char-rnn's recipe: 64 streams in 100-character chunks, state carried, Adam 2e-3
   constant, clip 5).

kiln's figure is its last validation (its final weights, as the plain scripts'), on the same
held-out data; its budget (--time-limit) counts its own validations, the plain scripts' does
not count their final evaluation. kiln's fixed start-up (wall time minus training) is
reported with a breakdown, apart from the ratios.

    .venv/bin/python bench/train.py [--digits-s 60] [--photos-s 300] [--lstm-s 480] [--only ...]
Writes the "## Training" section of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sections import write_section  # noqa: E402
from kiln import embedded  # noqa: E402


def kiln_train(*args: str) -> dict:
    """Runs `kiln train ...` as a user would; returns its metrics and a start-up breakdown
    read off the times its console lines appear."""
    out = args[args.index("--out") + 1]
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "kiln", "train", *args], text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    seen: list[tuple[float, str]] = []
    for line in proc.stderr:
        seen.append((time.monotonic() - t0, line))
    if proc.wait() != 0:
        raise RuntimeError("kiln train failed:\n" + "".join(x for _, x in seen[-20:]))
    wall = time.monotonic() - t0
    rows = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    ready = next((t, x) for t, x in seen if x.startswith("data ready in"))
    data_s = float(re.search(r"data ready in ([\d.]+)s", ready[1]).group(1))
    first = next(t for t, x in seen if x.startswith("epoch"))
    last = [t for t, x in seen if x.startswith("epoch")][-1]
    return {"rows": rows, "wall": wall, "last": rows[-1], "train_s": rows[-1]["elapsed_s"],
            "startup": {"ray + imports": ready[0] - data_s, "data preparation": data_s,
                        "trainer start": max(0.0, first - ready[0] - rows[0]["elapsed_s"]),
                        "after training": wall - last}}


def plain(script: str, *args: str) -> dict:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "plain" / script), *args],
                         check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    res["wall"] = time.monotonic() - t0
    return res


def archive(path: Path, images: list[bytes], labels: list[str], ext: str) -> Path:
    return embedded.write_flat_archive(path, images, [f"{c}/{i:06d}.{ext}"
                                                      for i, c in enumerate(labels)])


def startup_text(k: dict) -> str:
    parts = ", ".join(f"{name} {s:.1f}" for name, s in k["startup"].items())
    return f"{k['wall'] - k['train_s']:.1f} s ({parts})"


def digits(tmp: Path, budget: float) -> tuple[list[str], list[str]]:
    pngs, labels = embedded.digits(28)
    tr, te = embedded.split(len(pngs), 0.2, seed=1)
    train = archive(tmp / "digits.tar", [pngs[i] for i in tr], [labels[i] for i in tr], "png")
    test = archive(tmp / "digits-test.tar", [pngs[i] for i in te], [labels[i] for i in te],
                   "png")
    k = kiln_train("cnn", "--data", str(train), "--val", str(test), "--out",
                   str(tmp / "digits-run"), "--time-limit", str(budget / 60), "--workers", "2")
    p = plain("mnist.py", "--train", str(train), "--test", str(test), "--budget", str(budget))
    acc, ref = k["last"]["val_accuracy"], p["test_accuracy"]
    return [f"| MNIST net, digits ({len(tr):,} train / {len(te)} test), held-out accuracy at "
            f"{budget:.0f} s | {acc:.4f} | {ref:.4f} (Keras recipe) | {acc - ref:+.4f} |"], \
        [f"digits: kiln {startup_text(k)}; plain loading {p['load_s']:.1f} s"]


def photos(tmp: Path, budget: float, per_class: int, seeds: list[int],
           one_worker: bool) -> tuple[list[str], list[str]]:
    """Each seed: kiln (2 workers; with `one_worker` also 1 worker of 2 threads, the first
    seed only), then the plain recipe, one after the other (A B A B). Runs of one seed
    differ by a point or two on these test crops (a shifted test set: parts of each photo no
    training crop shows), so the headline is the mean over the seeds."""
    t0 = time.monotonic()
    tr_img, tr_lab = embedded.photos(per_class, 32, seed=0)
    te_img, te_lab = embedded.photos(max(100, per_class // 10), 32, seed=0, part="test")
    gen_s = time.monotonic() - t0
    train = archive(tmp / "photos.tar", tr_img, tr_lab, "jpg")
    test = archive(tmp / "photos-test.tar", te_img, te_lab, "jpg")

    def kiln(seed: int, workers: int) -> dict:
        run = tmp / f"photos-run-{seed}-{workers}"
        k = kiln_train("cnn", "--data", str(train), "--val", str(test), "--out", str(run),
                       "--arch", "resnet20", "--channels", "3", "--image-size", "32",
                       "--time-limit", str(budget / 60), "--workers", str(workers),
                       "--seed", str(seed))
        k["eval"], k["eval_s"] = {}, {}
        for tta in ("none", "flip"):
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "kiln", "eval", "--model", str(run),
                            "--data", str(test), "--output", str(run) + f"-eval-{tta}",
                            "--tta", tta], check=True, cwd=ROOT, capture_output=True)
            k["eval_s"][tta] = time.monotonic() - t0
            k["eval"][tta] = json.loads(Path(str(run) + f"-eval-{tta}", "eval.json")
                                        .read_text())["accuracy"]
        return k

    ks, ps, one = [], [], None
    for seed in seeds:
        ks.append(kiln(seed, 2))
        if one_worker and seed == seeds[0]:
            one = kiln(seed, 1)
        ps.append(plain("resnet.py", "--train", str(train), "--test", str(test), "--budget",
                        str(budget), "--seed", str(seed)))
        print(f"seed {seed}: kiln {ks[-1]['eval']['none']:.4f} (flip "
              f"{ks[-1]['eval']['flip']:.4f}), plain {ps[-1]['test_accuracy']:.4f}", flush=True)

    def cell(values: list[float]) -> str:
        each = " / ".join(f"{v:.4f}" for v in values)
        return f"{statistics.mean(values):.4f} ({each})" if len(values) > 1 else each

    acc = [k["eval"]["none"] for k in ks]
    flip = [k["eval"]["flip"] for k in ks]
    ref = [p["test_accuracy"] for p in ps]
    mean_ref = statistics.mean(ref)
    what = (f"ResNet-20, colour photos ({len(tr_img):,} train / {len(te_img):,} test JPEGs, 10 "
            f"classes), test accuracy at {budget:.0f} s, mean over seeds "
            f"{', '.join(map(str, seeds))} (kiln: `kiln eval` of its `model/`)")
    rows = [f"| {what} | {cell(acc)} | {cell(ref)} (standard recipe: reflect padding, 200 "
            f"warm-up steps, final weights) | {statistics.mean(acc) - mean_ref:+.4f} |",
            f"| the same, `kiln eval --tta flip` (each image's scores averaged with its "
            f"mirror's) | {cell(flip)} | | {statistics.mean(flip) - mean_ref:+.4f} |"]
    if one is not None:
        rows.append(f"| the same, kiln with 1 worker of 2 threads (seed {seeds[0]}: batch "
                    f"norm over the whole batch) | {one['eval']['none']:.4f} | {ref[0]:.4f} | "
                    f"{one['eval']['none'] - ref[0]:+.4f} |")
    speed = [k["last"]["samples_per_s"] for k in ks]
    plain_speed = [p["samples_per_s"] for p in ps]
    rows.append(f"| ResNet-20 training throughput, images/s | {statistics.mean(speed):,.0f} | "
                f"{statistics.mean(plain_speed):,.0f} | "
                f"{statistics.mean(speed) / statistics.mean(plain_speed):.2f}x |")
    k = ks[0]
    return rows, [f"photos (generated in {gen_s:.1f} s): kiln {startup_text(k)}, `kiln eval` "
                  f"{k['eval_s']['none']:.1f} s ({k['eval_s']['flip']:.1f} s with --tta flip); "
                  f"plain decoding the tar {ps[0]['load_s']:.1f} s"]


def lstm(tmp: Path, budget: float) -> tuple[list[str], list[str]]:
    topics = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    text = topics.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    train, val = tmp / "prose-train.txt", tmp / "prose-val.txt"
    train.write_text(text[:cut], encoding="utf-8")
    val.write_text(text[cut:], encoding="utf-8")
    k = kiln_train("rnn", "--data", str(train), "--val", str(val), "--out", str(tmp / "lm"),
                   "--time-limit", str(budget / 60), "--workers", "2")
    p = plain("charrnn.py", "--train", str(train), "--val", str(val), "--budget", str(budget))
    nats, ref = k["last"]["val_loss"], p["val_nats_per_char"]
    kb = (cut / 1e3, (len(text) - cut) / 1e3)
    return [f"| 2x256 LSTM, English prose ({kb[0]:,.0f} kB train / {kb[1]:,.0f} kB val), "
            f"validation nats/char at {budget:.0f} s | {nats:.3f} | {ref:.3f} "
            f"(char-rnn recipe) | {nats / ref:.3f}x |",
            f"| char-LSTM training throughput, chars/s | {k['last']['samples_per_s']:,.0f} | "
            f"{p['chars_per_s']:,.0f} | {k['last']['samples_per_s'] / p['chars_per_s']:.2f}x |"], \
        [f"LSTM: kiln {startup_text(k)}; best kiln validation "
         f"{min(r['val_loss'] for r in k['rows']):.3f}, plain best "
         f"{p.get('best_val_nats_per_char', ref):.3f}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--digits-s", type=float, default=60)
    ap.add_argument("--photos-s", type=float, default=300)
    ap.add_argument("--lstm-s", type=float, default=480)
    ap.add_argument("--photos-per-class", type=int, default=2000)
    ap.add_argument("--photos-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--one-worker", action="store_true",
                    help="photos: also kiln with 1 worker of 2 threads, first seed")
    ap.add_argument("--only", default="digits,photos,lstm")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    rows, notes = [], []
    for name in a.only.split(","):
        r, n = {"digits": lambda: digits(tmp, a.digits_s),
                "photos": lambda: photos(tmp, a.photos_s, a.photos_per_class, a.photos_seeds,
                                          a.one_worker),
                "lstm": lambda: lstm(tmp, a.lstm_s)}[name]()
        rows += r
        notes += n
        print("\n".join(r + n), flush=True)
    body = "\n".join([
        "| measure | kiln (2 workers) | plain PyTorch, 1 process | difference |",
        "|---|---|---|---|", *rows, "",
        "Same data, same network, same training-time budget; each side's final weights on the "
        "same held-out data. Accuracy: higher is better; nats/char: lower is better (a ratio "
        "below 1.00x is kiln ahead). kiln's budget includes its own validations.", "",
        "kiln's fixed start-up (wall time minus training), not counted in the budget:", "",
        *[f"- {n}" for n in notes], "",
        "Command: `.venv/bin/python bench/train.py " + " ".join(sys.argv[1:]) + "`"])
    write_section("Training", body)
    print(body)


if __name__ == "__main__":
    main()
