"""`kiln train cnn|rnn`: prepares the data on Ray Data, runs the per-worker loop under
TorchTrainer (DDP, checkpoints every epoch, failures retried from the last checkpoint), and
finishes the run folder: model/ (best epoch), metrics.jsonl, curves.png."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, replace

import numpy as np
import ray
from rich.console import Console

from jobs.connect import RayOptions, ray_session
from jobs.options import TrainOptions
from jobs.train_tasks import WorkerConfig, image_steps, text_steps
from models import CELLS, CNN_ARCHS, CharVocab, CNNSpec, RNNSpec
from pipelines import storage
from pipelines.train_data import image_dataset, read_text, text_streams
from pipelines.transforms import ImagePreset, choose_augment

console = Console(stderr=True, highlight=False, soft_wrap=True)
CHECKPOINTS = "checkpoints"


def run_train(opts: TrainOptions) -> dict:
    opts = resolve(opts)
    validate(opts)
    # Workers write the run folder from their own working directories.
    opts = replace(opts, out=storage.absolute(opts.out), data=storage.absolute(opts.data),
                   val=storage.absolute(opts.val) if opts.val else None)
    storage.check_reachable(opts.data, must_exist=True)
    if opts.val:
        storage.check_reachable(opts.val, must_exist=True)
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


def resolve(opts: TrainOptions) -> TrainOptions:
    """Fills the defaults that depend on the model kind and architecture. --batch-size is
    global (all workers together). ResNets and torchvision networks train with SGD + Nesterov
    at lr 0.1 per 128 images, decayed linearly to zero (the standard recipe); the Keras MNIST
    net with AdamW at 2e-3 and char-RNNs at 4e-3, held for 70% of the run, then decayed (at
    480 s of a 2x256 LSTM, 0.768 nats/char against char-rnn's constant 2e-3's 0.819).
    Without --epochs, --max-steps or --time-limit a run is 10 epochs."""
    batch = opts.batch_size or (128 if opts.kind == "cnn" else 64)
    optimizer = opts.optimizer
    if optimizer == "auto":
        optimizer = "sgd" if opts.kind == "cnn" and opts.arch != "mnist_cnn" else "adamw"
    lr = opts.lr or (0.1 * batch / 128 if optimizer == "sgd" else
                     4e-3 if opts.kind == "rnn" else 2e-3)
    epochs = opts.epochs
    if epochs is None and opts.max_steps is None and opts.time_limit is None:
        epochs = 10
    return replace(opts, batch_size=batch, optimizer=optimizer, lr=lr, epochs=epochs)


def validate(opts: TrainOptions) -> None:
    """Every option checked before Ray starts, naming what would do."""
    if opts.kind not in ("cnn", "rnn"):
        raise ValueError("kind must be cnn or rnn")
    for name, value in (("--workers", opts.workers), ("--batch-size", opts.batch_size),
                        ("--epochs", opts.epochs), ("--max-steps", opts.max_steps)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if opts.batch_size < opts.workers:
        raise ValueError(f"--batch-size ({opts.batch_size}) is global: it must be at least "
                         f"--workers ({opts.workers})")
    if opts.time_limit is not None and opts.time_limit <= 0:
        raise ValueError(f"--time-limit must be a positive number of minutes, got "
                         f"{opts.time_limit}")
    if not opts.lr > 0:
        raise ValueError(f"--lr must be positive, got {opts.lr}")
    if opts.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown --optimizer {opts.optimizer!r}; choose one of auto, "
                         f"{', '.join(OPTIMIZERS)}")
    if not 0 < opts.val_fraction < 1 and opts.val is None:
        raise ValueError("--val-fraction must be between 0 and 1")
    if opts.kind == "cnn":
        if opts.arch not in CNN_ARCHS:
            raise ValueError(f"unknown --arch {opts.arch!r}; choose one of "
                             f"{', '.join(sorted(CNN_ARCHS))}")
        if opts.channels not in (1, 3):
            raise ValueError("--channels must be 1 or 3")
        if opts.image_size < 8:
            raise ValueError(f"--image-size must be at least 8, got {opts.image_size}")
        choose_augment(opts.augment, opts.channels)
    else:
        if opts.cell not in CELLS:
            raise ValueError(f"unknown --cell {opts.cell!r}; choose one of "
                             f"{', '.join(sorted(CELLS))}")
        for name, value in (("--layers", opts.layers), ("--hidden", opts.hidden),
                            ("--embed", opts.embed), ("--seq-len", opts.seq_len)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0 <= opts.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {opts.dropout}")


OPTIMIZERS = ("sgd", "adamw")
ADAM_COOLDOWN = 0.3  # AdamW holds its peak rate for 70% of the run (jobs/schedule.py)
VAL_STREAMS_PER_WORKER = 4


def prepare(opts: TrainOptions) -> dict:
    """Datasets, the model spec and a one-line description, per model kind."""
    if opts.kind == "cnn":
        return prepare_images(opts)
    text = read_text(opts.data)
    if opts.val:
        train_text, val_text = text, read_text(opts.val)
    else:
        cut = int(len(text) * (1 - opts.val_fraction))
        train_text, val_text = text[:cut], text[cut:]
    vocab = CharVocab.build(train_text, min_count=2 if len(train_text) > 100_000 else 1)
    ids = np.asarray(vocab.encode(train_text), dtype=np.int64)
    # One stream per sequence of the global batch, unless the text is too short for each
    # to hold two chunks.
    streams = max(opts.workers, min(opts.batch_size, (len(ids) - 1) // (2 * opts.seq_len)))
    if (len(ids) - 1) // streams < 2 * opts.seq_len - 1:
        raise ValueError(f"the training text ({len(ids):,} characters) is too short for "
                         f"--seq-len {opts.seq_len} on {opts.workers} workers")
    val_ids = np.asarray(vocab.encode(val_text), dtype=np.int64)
    val_streams = min(opts.workers * VAL_STREAMS_PER_WORKER, len(val_ids) - 1)
    if val_streams < opts.workers:
        raise ValueError(f"the validation text ({len(val_ids):,} characters) is too short")
    val_streams -= val_streams % opts.workers
    spec = RNNSpec(vocab.chars, opts.cell, opts.embed, opts.hidden, opts.layers, opts.dropout)
    length = (len(ids) - 1) // streams
    note = f" ({streams} streams: the text is short)" if streams < opts.batch_size else ""
    return {"train": text_streams(ids, streams).materialize(),
            "val": text_streams(val_ids, val_streams).materialize(), "spec": spec,
            "train_rows": streams, "steps_per_epoch": text_steps(length, opts.seq_len),
            "summary": f"{len(train_text):,} train / {len(val_text):,} val characters, "
                       f"vocabulary {len(vocab)}{note}"}


def prepare_images(opts: TrainOptions) -> dict:
    # Decoded to uint8; normalized by the workers with the training set's own mean and std.
    preset = ImagePreset(opts.image_size, opts.channels)
    data = image_dataset(opts.data, preset, opts.val_fraction, seed=opts.seed,
                         shuffle_above=TRAIN_CACHE_BYTES, val_uri=opts.val)
    for bad in data.skipped[:5]:
        console.print(f"[yellow]skipped[/] {bad}")
    train_ds, val = data.train, data.val
    spec = CNNSpec(opts.arch, data.classes, opts.channels, opts.image_size, data.mean, data.std)
    rows = train_ds.count()
    whole = train_ds.size_bytes() <= TRAIN_CACHE_BYTES
    per_epoch = image_steps(rows, opts.batch_size, opts.workers, whole)
    if per_epoch < 1:
        raise ValueError(f"{rows} training images are less than one batch of "
                         f"{opts.batch_size}: lower --batch-size")
    return {"train": train_ds, "val": val, "spec": spec, "train_rows": rows,
            "steps_per_epoch": per_epoch, "whole_train": whole,
            "summary": f"{rows:,} train / {val.count():,} val images, {len(data.classes)} "
                       f"classes, {len(data.skipped)} skipped"}


TRAIN_CACHE_BYTES = 512 * 1024 * 1024  # a training set up to this size is held by each worker
VAL_CACHE_BYTES = 256 * 1024 * 1024


def worker_config(opts: TrainOptions, data: dict, cpus: float) -> WorkerConfig:
    per_epoch = data["steps_per_epoch"]
    max_steps = opts.max_steps
    if opts.epochs is not None:
        max_steps = min(max_steps or per_epoch * opts.epochs, per_epoch * opts.epochs)
    settings = {k: getattr(opts, k) for k in (
        "epochs", "max_steps", "time_limit", "batch_size", "lr", "optimizer", "workers",
        "seed", "augment" if opts.kind == "cnn" else "seq_len")}
    augment = choose_augment(opts.augment, opts.channels) if opts.kind == "cnn" else "none"
    if opts.kind == "cnn":
        settings["augment"] = augment
    return WorkerConfig(
        kind=opts.kind, spec=data["spec"].__dict__, out=opts.out, data=opts.data,
        batch=opts.batch_size, lr=opts.lr, optimizer=opts.optimizer,
        weight_decay=5e-4 if opts.optimizer == "sgd" else (1e-4 if opts.kind == "cnn" else 0.0),
        cooldown=1.0 if opts.optimizer == "sgd" else ADAM_COOLDOWN,
        epochs=opts.epochs, max_steps=max_steps,
        time_limit_s=opts.time_limit * 60 if opts.time_limit else None, seed=opts.seed,
        # A lone worker on a small machine takes every core as torch threads; Ray's own
        # reservation stays below the CPUs so that Ray Data's tasks always find room.
        threads=1 if opts.gpu else max(1, int(cpus // opts.workers)),
        augment=augment, seq_len=opts.seq_len, whole_train=data.get("whole_train", True),
        train_rows=data["train_rows"],
        cache_val=data["val"].size_bytes() / opts.workers <= VAL_CACHE_BYTES,
        settings=settings)


def fit(opts: TrainOptions, data: dict):
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from jobs.train_loop import train_loop_per_worker

    cpus = ray.cluster_resources().get("CPU", 1)
    per_worker = 1.0 if opts.gpu else max(0.5, min(1.0, (cpus - 0.25) / opts.workers))
    cfg = worker_config(opts, data, cpus)
    # Text streams are never split (each worker picks its own by number); images are split
    # only when the training set is too large for every worker to hold it.
    split = [] if opts.kind == "rnn" else ["val"] + ([] if cfg.whole_train else ["train"])
    fs, path = storage.filesystem(opts.out)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(cfg),
        scaling_config=ScalingConfig(num_workers=opts.workers, use_gpu=opts.gpu,
                                     resources_per_worker={"CPU": per_worker}),
        run_config=RunConfig(
            name=CHECKPOINTS, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=3),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": data["train"], "val": data["val"]},
        dataset_config=DataConfig(datasets_to_split=split),
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
            console.print(f"epoch {rec['epoch']:>5}  train_loss {rec['train_loss']:.4f}  "
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
