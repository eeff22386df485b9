"""Ray Train: CNNs learn real digits from a tar and from Parquet, a char-RNN learns real text,
a killed run resumes, and a killed worker is replaced."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import torch

from jobs import embedded
from jobs.options import TrainOptions
from jobs.train import run_train
from jobs.train_loop import lr_at
from pipelines import storage
from pipelines.train_data import read_text
from pipelines.transforms import ImagePreset, augment_batch, decode

pytestmark = pytest.mark.slow


def held_out_accuracy(run: str, images: list[bytes], labels: list[str]) -> float:
    loaded = storage.load_model(run, expect_kind="cnn")
    preset = ImagePreset.from_spec(loaded.spec)
    x = torch.from_numpy(np.stack([decode(b, preset) for b in images]))
    with torch.no_grad():
        pred = loaded.model(x).argmax(1).tolist()
    return float(np.mean([loaded.spec.classes[p] == y for p, y in zip(pred, labels,
                                                                        strict=True)]))


def metrics(run) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl")).read().splitlines()]


def train_workers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]


def test_cnn_learns_digits_from_a_tar_and_survives_a_killed_worker(ray_local, digits_files,
                                                                   tmp_path):
    run = str(tmp_path / "run")
    opts = TrainOptions("cnn", str(digits_files["tar"]), run, epochs=8, batch_size=32,
                        workers=2)
    box = {}
    thread = threading.Thread(target=lambda: box.update(out=run_train(opts)))
    thread.start()
    killed = None
    while thread.is_alive() and killed is None:  # kill a worker once an epoch is checkpointed
        time.sleep(0.5)
        if os.path.exists(os.path.join(run, "metrics.jsonl")) and train_workers():
            killed = train_workers()[-1]
            killed.send_signal(signal.SIGKILL)
    thread.join()
    assert killed is not None, "the run ended before a worker could be killed"
    assert "out" in box, "training did not finish after losing a worker"
    epochs = [m["epoch"] for m in metrics(run)]
    assert epochs == list(range(1, 9))  # resumed from the checkpoint, no epoch lost or repeated
    for key in ("train_loss", "val_loss", "val_accuracy", "samples_per_s", "elapsed_s"):
        assert key in metrics(run)[-1]
    assert os.path.getsize(os.path.join(run, "curves.png")) > 1000
    acc = held_out_accuracy(run, digits_files["test_images"], digits_files["test_labels"])
    assert acc >= 0.95, f"held-out accuracy {acc:.3f}"


def test_cnn_learns_digits_from_parquet(ray_local, digits_files, tmp_path):
    run = str(tmp_path / "run")
    t0 = time.monotonic()
    run_train(TrainOptions("cnn", str(digits_files["parquet"]), run, epochs=8, batch_size=32,
                           workers=2))
    wall = time.monotonic() - t0
    rows = metrics(run)
    # elapsed_s is training time so far: it grows by at least each epoch's training time and
    # never passes the run's wall time.
    for a, b in zip(rows, rows[1:], strict=False):
        assert b["elapsed_s"] - a["elapsed_s"] >= 0.9 * b["train_s"]
    assert rows[-1]["elapsed_s"] < wall
    acc = held_out_accuracy(run, digits_files["test_images"], digits_files["test_labels"])
    assert acc >= 0.95, f"held-out accuracy {acc:.3f}"
    cfg = storage.load_model(run).config
    assert cfg["spec"]["classes"] == [str(i) for i in range(10)]
    assert cfg["metrics"]["val_accuracy"] == max(m["val_accuracy"] for m in metrics(run))


def test_rnn_learns_python_source(ray_local, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(embedded.stdlib_corpus(300_000))
    run = str(tmp_path / "run")
    run_train(TrainOptions("rnn", str(corpus), run, max_steps=150, batch_size=32, workers=2,
                           hidden=128, layers=2, seq_len=64, lr=4e-3))
    loaded = storage.load_model(run, expect_kind="rnn")
    uniform = np.log(len(loaded.vocab))
    last = metrics(run)[-1]
    assert last["step"] == 150
    assert last["val_loss"] < 0.6 * uniform, f"{last['val_loss']:.3f} vs uniform {uniform:.3f}"
    assert last["bits_per_char"] == pytest.approx(last["val_loss"] / np.log(2))


def kiln(*args):
    return [sys.executable, "-m", "jobs", *args]


def test_resume_continues_a_killed_run(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(embedded.stdlib_corpus(100_000))
    run = str(tmp_path / "run")
    args = ["train", "rnn", "--data", str(corpus), "--out", run, "--epochs", "40",
            "--hidden", "32", "--layers", "1", "--seq-len", "32", "--batch-size", "16"]
    proc = subprocess.Popen(kiln(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if os.path.exists(os.path.join(run, "metrics.jsonl")) and len(metrics(run)) >= 2:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(metrics(run))
    assert 2 <= done_before < 40, "the run must be killed part-way"

    refused = subprocess.run(kiln(*args), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = subprocess.run(kiln(*args[:-10], "--epochs", "6", *args[-8:], "--resume"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = metrics(run)
    assert [m["epoch"] for m in history] == list(range(1, len(history) + 1))
    assert len(history) == max(6, done_before)
    steps = [m["step"] for m in history]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert "epoch   1 " not in resumed.stderr  # it did not start over


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 1000, 1.0) for s in range(1000)]
    assert lrs[0] < lrs[19] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in
                                                          zip(lrs[20:], lrs[21:], strict=False))
    # A time-limited run with a huge step budget: warm-up stays short, the rate near the peak.
    assert lr_at(19, 10**7, 1.0) == pytest.approx(1.0)
    assert lr_at(5000, 10**7, 1.0) > 0.99


def test_augment_shifts_but_keeps_shape():
    x = torch.arange(2 * 1 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    y = augment_batch(x)
    assert y.shape == x.shape
    assert set(y.flatten().tolist()) <= set(x.flatten().tolist())


def test_non_utf8_text_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nstill fine\nbro\xffken\n")
    with pytest.raises(ValueError, match=r"bad.txt: not UTF-8 text \(line 3"):
        read_text(str(bad))
