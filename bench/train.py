"""Training benchmark: `kiln train` (Ray Train, 2 workers) side by side with the plain
single-process PyTorch loop a user would write instead, in one run, on this machine.

1. Throughput: the MNIST network on the digits (x4, 28x28), same global batch and epochs;
   samples/s of the training epochs, plus kiln's fixed start-up (wall time minus training).
2. Quality at an equal training-time budget: the MNIST network's held-out accuracy on the
   digits, and a 2x256 LSTM's validation loss (nats/char) on ~1 MB of the standard library.

    .venv/bin/python bench/train.py [--quick]
Writes the "## Training" section of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sections import write_section  # noqa: E402
from jobs import embedded  # noqa: E402
from models import CharRNN, CharVocab, build_cnn  # noqa: E402
from pipelines.transforms import ImagePreset, augment_batch, decode  # noqa: E402


def kiln_train(*args: str) -> tuple[float, list[dict]]:
    """Runs `kiln train ...` as a user would; returns (wall seconds, metrics.jsonl rows)."""
    out = args[args.index("--out") + 1]
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "jobs", "train", *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    rows = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    return wall, rows


def plain_cnn(x, y, epochs=None, budget_s=None, batch=128, lr=2e-3, epoch_rates=None):
    """The plain loop: Adam(W), the same augmentation, cosine schedule by time or epochs."""
    torch.manual_seed(0)
    net = build_cnn("mnist_cnn", 10, 1, 28)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    start, epoch = time.monotonic(), 0
    while (epochs and epoch < epochs) or (budget_s and time.monotonic() - start < budget_s):
        net.train()
        t0, perm = time.monotonic(), torch.randperm(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(net(augment_batch(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if budget_s and time.monotonic() - start > budget_s:
                break
        if epoch_rates is not None:
            epoch_rates.append((len(x) // batch) * batch / (time.monotonic() - t0))
        epoch += 1
    return net.eval()


def accuracy(net, x, y) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def digits_tensors(pngs, labels):
    preset = ImagePreset()
    x = torch.from_numpy(np.stack([decode(p, preset) for p in pngs]))
    return x, torch.tensor([int(v) for v in labels])


def windows(ids: np.ndarray, seq_len: int) -> torch.Tensor:
    n = (len(ids) - 1) // seq_len
    return torch.from_numpy(np.stack([ids[i * seq_len : i * seq_len + seq_len + 1]
                                      for i in range(n)]))


def plain_lstm(train_w, val_w, vocab_size, budget_s, batch=64, lr=2e-3):
    torch.manual_seed(0)
    net = CharRNN(vocab_size, "lstm", 64, 256, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    start = time.monotonic()
    while time.monotonic() - start < budget_s:
        perm = torch.randperm(len(train_w))
        for i in range(0, len(train_w) - batch + 1, batch):
            w = train_w[perm[i : i + batch]]
            logits, _ = net(w[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, vocab_size), w[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            if time.monotonic() - start > budget_s:
                break
    net.eval()
    with torch.no_grad():
        total = n = 0.0
        for i in range(0, len(val_w), 256):
            w = val_w[i : i + 256]
            logits, _ = net(w[:, :-1])
            total += float(F.cross_entropy(logits.reshape(-1, vocab_size), w[:, 1:].reshape(-1),
                                           reduction="sum"))
            n += w[:, 1:].numel()
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller budgets, for a smoke run")
    a = ap.parse_args()
    cnn_budget, lstm_budget = (20, 30) if a.quick else (60, 240)
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    pngs, labels = embedded.digits(28)
    train_idx, test_idx = embedded.split(len(pngs), 0.2, seed=1)
    tr_p, tr_l = [pngs[i] for i in train_idx], [labels[i] for i in train_idx]
    te_x, te_y = digits_tensors([pngs[i] for i in test_idx], [labels[i] for i in test_idx])
    lines = []

    # 1. Throughput on the digits x4.
    big = embedded.write_class_tar(tmp / "digits4.tar", tr_p * 4, tr_l * 4)
    x4, y4 = digits_tensors(tr_p * 4, tr_l * 4)
    wall, rows = kiln_train("cnn", "--data", str(big), "--out", str(tmp / "tp"), "--epochs", "3",
                            "--batch-size", "64", "--workers", "2", "--val-fraction", "0.05")
    kiln_rate = float(np.mean([r["samples_per_s"] for r in rows[1:]]))
    startup = wall - rows[-1]["elapsed_s"]
    rates: list[float] = []
    plain_cnn(x4[: int(len(x4) * 0.95)], y4[: int(len(x4) * 0.95)], epochs=3, epoch_rates=rates)
    plain_rate = float(np.mean(rates[1:]))
    lines += [
        "| measure | kiln (2 workers) | plain PyTorch | ratio |", "|---|---|---|---|",
        f"| CNN training, samples/s (epochs 2-3, {len(x4):,} digits) | {kiln_rate:,.0f} | "
        f"{plain_rate:,.0f} | **{kiln_rate / plain_rate:.2f}x** |",
        f"| kiln fixed start-up (wall - training), s | {startup:.1f} | - | - |",
    ]

    # 2a. CNN quality at equal training time. Both train on the same 1,437 images; kiln
    # validates on the held-out 360 (--val) and its last epoch (the final weights, as the
    # plain loop's) is compared, not the best one, which would be chosen on the same images.
    tar = embedded.write_class_tar(tmp / "digits.tar", tr_p, tr_l)
    test_tar = embedded.write_class_tar(tmp / "digits-test.tar", [pngs[i] for i in test_idx],
                                        [labels[i] for i in test_idx])
    _, rows = kiln_train("cnn", "--data", str(tar), "--val", str(test_tar), "--out",
                         str(tmp / "q"), "--epochs", "1000", "--batch-size", "64",
                         "--time-limit", str(cnn_budget / 60))
    kiln_acc = rows[-1]["val_accuracy"]
    trx, try_ = digits_tensors(tr_p, tr_l)
    plain_acc = accuracy(plain_cnn(trx, try_, budget_s=cnn_budget), te_x, te_y)
    lines.append(f"| MNIST net, held-out accuracy on digits ({cnn_budget} s training) | "
                 f"{kiln_acc:.4f} | {plain_acc:.4f} | {kiln_acc - plain_acc:+.4f} |")

    # 2b. LSTM quality at equal training time.
    text = embedded.stdlib_corpus(1_000_000)
    corpus = tmp / "corpus.txt"
    corpus.write_text(text)
    _, rows = kiln_train("rnn", "--data", str(corpus), "--out", str(tmp / "lm"), "--epochs",
                         "1000", "--batch-size", "32", "--time-limit", str(lstm_budget / 60))
    kiln_loss = rows[-1]["val_loss"]  # the final weights, as the plain loop's
    cut = int(len(text) * 0.9)
    vocab = CharVocab.build(text[:cut], min_count=2)
    ids = lambda s: np.asarray(vocab.encode(s), dtype=np.int64)  # noqa: E731
    plain_loss = plain_lstm(windows(ids(text[:cut]), 128), windows(ids(text[cut:]), 128),
                            len(vocab), lstm_budget)
    lines.append(f"| 2x256 LSTM, validation nats/char on 1 MB stdlib ({lstm_budget} s) | "
                 f"{kiln_loss:.3f} | {plain_loss:.3f} | {kiln_loss / plain_loss:.3f}x |")
    body = "\n".join(lines) + (
        "\n\nRatios above 1.0x mean kiln is faster (throughput) or worse (loss). Quality rows: "
        "same model, the same training data, the same training-time budget (kiln's start-up is "
        "not counted against it; its per-epoch validation is); each side's final weights. "
        "Uniform baseline for the LSTM: "
        f"ln({len(vocab)}) = {math.log(len(vocab)):.3f} nats/char.\n\n"
        "Command: `.venv/bin/python bench/train.py`" + (" --quick" if a.quick else ""))
    write_section("Training", body)
    print(body)


if __name__ == "__main__":
    main()
