"""`kiln train cnn|rnn`: prepares the data on Ray Data, runs the per-worker loop under
TorchTrainer (DDP, checkpoints every epoch, failures retried from the last checkpoint), and
finishes the run folder: model/ (best epoch), metrics.jsonl, curves.png."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import replace

import ray
from rich.console import Console

from jobs.connect import RayOptions, ray_session
from jobs.options import TrainOptions
from models import CharVocab, CNNSpec, RNNSpec
from pipelines import storage
from pipelines.train_data import image_dataset, read_text, text_windows
from pipelines.transforms import ImagePreset

console = Console(stderr=True, highlight=False, soft_wrap=True)
CHECKPOINTS = "checkpoints"


def run_train(opts: TrainOptions) -> dict:
    validate(opts)
    # Workers write the run folder from their own working directories.
    opts = replace(opts, out=storage.absolute(opts.out), data=storage.absolute(opts.data),
                   val=storage.absolute(opts.val) if opts.val else None)
    storage.check_reachable(opts.out)
    ckpt_dir = storage.join(opts.out, CHECKPOINTS)
    if storage.exists(ckpt_dir) and not opts.resume:
        raise ValueError(f"{opts.out} already holds a training run; pass --resume to continue "
                         "it, or choose another --out")
    # No dashboard for a training job's own local Ray: on 2 CPUs its processes cost the DDP
    # workers ~5% of their steps (a 2x256 LSTM: 12,200 vs 11,600 chars/s).
    ray_opts = RayOptions(address=opts.address, include_dashboard=False)
    with ray_session(ray_opts):
        t0 = time.monotonic()
        data = prepare(opts)
        console.print(f"data ready in {time.monotonic() - t0:.1f}s: {data['summary']}")
        result = fit(opts, data)
    history = read_metrics(opts.out)
    if history:
        storage.write_bytes(storage.join(opts.out, "curves.png"), curves_png(history, opts.kind))
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    best = storage.load_model(opts.out).config.get("metrics", {})
    console.print(f"[bold green]done[/]: best {summary_line(best)} -> {opts.out}/model")
    return {"best": best, "epochs": len(history), "out": opts.out}


def validate(opts: TrainOptions) -> None:
    if opts.kind not in ("cnn", "rnn"):
        raise ValueError("kind must be cnn or rnn")
    if opts.workers < 1 or opts.batch_size < 1 or opts.epochs < 1:
        raise ValueError("--workers, --batch-size and --epochs must be >= 1")
    if not 0 < opts.val_fraction < 1 and opts.val is None:
        raise ValueError("--val-fraction must be between 0 and 1")
    if opts.kind == "cnn" and opts.channels not in (1, 3):
        raise ValueError("--channels must be 1 or 3")


def prepare(opts: TrainOptions) -> dict:
    """Datasets, the model spec and a one-line description, per model kind."""
    if opts.kind == "cnn":
        preset = ImagePreset(opts.image_size, opts.channels, (0.5,) * opts.channels,
                             (0.5,) * opts.channels)
        data = image_dataset(opts.data, preset, 0.0 if opts.val else opts.val_fraction,
                             seed=opts.seed)
        for bad in data.skipped[:5]:
            console.print(f"[yellow]skipped[/] {bad}")
        train_ds, val = data.train, data.val
        if opts.val:
            val = image_dataset(opts.val, preset).train
        spec = CNNSpec(opts.arch, data.classes, opts.channels, opts.image_size,
                       list(preset.mean), list(preset.std))
        summary = (f"{train_ds.count():,} train / {val.count():,} val images, "
                   f"{len(data.classes)} classes, {len(data.skipped)} skipped")
    else:
        text = read_text(opts.data)
        if opts.val:
            train_text, val_text = text, read_text(opts.val)
        else:
            cut = int(len(text) * (1 - opts.val_fraction))
            train_text, val_text = text[:cut], text[cut:]
        vocab = CharVocab.build(train_text, min_count=2 if len(train_text) > 100_000 else 1)
        train_ds = text_windows(train_text, vocab, opts.seq_len, seed=opts.seed).materialize()
        val = text_windows(val_text, vocab, opts.seq_len).materialize()
        spec = RNNSpec(vocab.chars, opts.cell, opts.embed, opts.hidden, opts.layers, opts.dropout)
        summary = (f"{len(train_text):,} train / {len(val_text):,} val characters, "
                   f"vocabulary {len(vocab)}")
    return {"train": train_ds, "val": val, "spec": spec, "summary": summary}


def fit(opts: TrainOptions, data: dict):
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from jobs.train_loop import train_loop_per_worker

    cpus = ray.cluster_resources().get("CPU", 1)
    per_worker = 1.0 if opts.gpu else max(0.5, min(1.0, (cpus - 0.25) / opts.workers))
    steps_per_epoch = max(1, data["train"].count() // (opts.batch_size * opts.workers))
    max_steps = opts.max_steps or steps_per_epoch * opts.epochs
    epochs = math.ceil(max_steps / steps_per_epoch) if opts.max_steps else opts.epochs
    settings = {k: getattr(opts, k) for k in ("epochs", "max_steps", "batch_size", "lr",
                                               "workers", "seed", "time_limit")}
    cfg = {
        "kind": opts.kind, "spec": data["spec"].__dict__, "out": opts.out, "data": opts.data,
        "epochs": epochs, "max_steps": max_steps, "total_steps": max_steps,
        "batch_size": opts.batch_size, "lr": opts.lr, "seed": opts.seed,
        "weight_decay": 0.0 if opts.kind == "rnn" else 1e-4,
        # A lone worker on a small machine takes every core as torch threads; Ray's own
        # reservation stays below the CPUs so that Ray Data's tasks always find room.
        "threads": 1 if opts.gpu else max(1, int(cpus // opts.workers)),
        "shuffle_buffer": 2000,
        "train_bytes": data["train"].size_bytes(),
        "val_bytes": data["val"].size_bytes(),
        "time_limit_s": opts.time_limit * 60 if opts.time_limit else None,
        "train_settings": settings,
    }
    fs, path = storage.filesystem(opts.out)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=opts.workers, use_gpu=opts.gpu,
                                     resources_per_worker={"CPU": per_worker}),
        run_config=RunConfig(
            name=CHECKPOINTS, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=3),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": data["train"], "val": data["val"]},
    )
    return with_epoch_lines(trainer.fit, opts)


def with_epoch_lines(fit_fn, opts: TrainOptions):
    """Runs fit() and prints each epoch's line as rank 0 appends it to metrics.jsonl."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=fit_fn()), daemon=True)
    thread.start()
    shown = len(read_metrics(opts.out)) if opts.resume else 0
    while thread.is_alive():
        thread.join(1.0)
        history = read_metrics(opts.out)
        for rec in history[shown:]:
            console.print(f"epoch {rec['epoch']:>3}  train_loss {rec['train_loss']:.4f}  "
                          f"{summary_line(rec)}  {rec['samples_per_s']:,.0f} samples/s  "
                          f"{rec['elapsed_s']:.0f}s")
        shown = max(shown, len(history))
    if "result" not in box:
        raise RuntimeError("training stopped without a result (see the Ray logs above)")
    return box["result"]


def summary_line(rec: dict) -> str:
    if "val_accuracy" in rec:
        return f"val_loss {rec['val_loss']:.4f}  val_accuracy {rec['val_accuracy']:.4f}"
    return f"val_loss {rec.get('val_loss', float('nan')):.4f} nats/char  " \
           f"{rec.get('bits_per_char', float('nan')):.4f} bits/char"


def read_metrics(out: str) -> list[dict]:
    uri = storage.join(out, "metrics.jsonl")
    try:
        text = storage.read_bytes(uri).decode()
    except storage.StorageError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def curves_png(history: list[dict], kind: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    a.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    a.set(xlabel="epoch", ylabel="loss (nats)", title="loss")
    a.legend()
    key = "val_accuracy" if kind == "cnn" else "bits_per_char"
    b.plot(epochs, [r[key] for r in history], "o-", color="C2")
    b.set(xlabel="epoch", ylabel=key.replace("_", " "), title=key.replace("_", " "))
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
