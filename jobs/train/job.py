"""`kiln train cnn|rnn`: checks every option and the data before Ray starts, prepares the data
on Ray Data (the model kind's task object, jobs/train/tasks.py, knows how), runs the per-worker
loop under TorchTrainer (jobs/train/fit.py: DDP, a checkpoint every validation, lost workers
retried from it), and finishes the run folder: model/ (best epoch), metrics.jsonl, curves.png."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace

from rich.console import Console

from kiln.cluster import connect
from kiln.cluster.connect import RayOptions, check_gpu, has_cluster, local_cpus, ray_session
from kiln.models import CELLS, CNN_ARCHS
from kiln.models.cnn import TORCHVISION_ARCHS
from kiln.options import BACKBONE_LR_SCALE, TrainOptions
from kiln.pipelines import storage
from kiln.pipelines.fence import check_run_folder, mark_run_folder
from kiln.pipelines.lease import Lease
from kiln.pipelines.transforms import choose_augment
from kiln.train.fit import CHECKPOINTS, check_fits_here, fit
from kiln.train.init import check_init, resumed_init
from kiln.train.tasks import TASKS


def run_train(opts: TrainOptions, console: Console | None = None) -> dict:
    console = console or connect.console(highlight=False)
    # Workers write the run folder from their own working directories.
    opts = replace(opts, out=storage.absolute(opts.out), data=storage.absolute(opts.data),
                   val=storage.absolute(opts.val) if opts.val else None,
                   init=storage.absolute(opts.init) if opts.init else None)
    opts = replace(opts, out=check_run_folder(opts.out, [opts.data, opts.val, opts.init],
                                              "train", legacy=[CHECKPOINTS]))
    opts = resolve(opts)
    resuming = opts.resume and storage.exists(storage.join(opts.out, CHECKPOINTS))
    prior = resumed_init(opts) if resuming else None
    if resuming:  # the run's checkpoint holds its weights and layout: --init is not read again
        opts = replace(opts, init=None, freeze_backbone=False,
                       backbone_lr_scale=BACKBONE_LR_SCALE)
    validate(opts)
    storage.check_reachable(opts.data, must_exist=True)
    if opts.val:
        storage.check_reachable(opts.val, must_exist=True)
    storage.check_reachable(opts.out)
    if storage.exists(storage.join(opts.out, CHECKPOINTS)) and not opts.resume:
        raise ValueError(f"{opts.out} already holds a training run; pass --resume to continue "
                         "it, or choose another --out")
    task = TASKS[opts.kind]
    early = task.check_data(opts)  # the data's mistakes fail here, before Ray starts
    # No dashboard for a training job's own local Ray: on 2 CPUs its processes take CPU time
    # from the DDP workers' steps.
    with Lease(opts.out, "train", uuid.uuid4().hex[:8]), \
            ray_session(RayOptions(address=opts.address, log_to_driver=opts.debug,
                                   forward_credentials=opts.forward_credentials)):
        # The lease: one run writes a run folder at a time.
        mark_run_folder(opts.out, "train")
        t0 = time.monotonic()
        data = task.prepare(opts, early)
        if prior:
            data["resumed_init"] = prior
        console.print(f"data ready in {time.monotonic() - t0:.1f}s: {data['summary']}")
        try:
            fit(opts, data, task, console)
        finally:  # a failed run keeps the curves of the epochs it did
            history = read_metrics(opts.out)
            if history:
                storage.write_bytes(storage.join(opts.out, "curves.png"),
                                    curves_png(history, task.metric_key))
    best = storage.read_model_config(opts.out).get("metrics", {})
    console.print(f"[bold green]done[/]: best {task.summary_line(best)} -> {opts.out}/model")
    return {"best": best, "epochs": len(history), "out": opts.out}


def resolve(opts: TrainOptions) -> TrainOptions:
    """Fills the defaults that depend on the model kind and architecture. --batch-size is
    global (all workers together). ResNets and torchvision networks train with SGD + Nesterov
    at lr 0.1 per 128 images, decayed linearly to zero (the standard recipe); the Keras MNIST
    net with AdamW at 2e-3 and char-RNNs at 4e-3, held for 70% of the run, then decayed (a
    2x256 LSTM's loss ends lower than with char-rnn's constant 2e-3; measured: BENCHMARKS.md,
    Training section).
    Without --epochs, --max-steps or --time-limit a run is 10 epochs."""
    batch = opts.batch_size if opts.batch_size is not None else (
        128 if opts.kind == "cnn" else 64)  # 0 stays 0, for validate() to refuse
    optimizer = opts.optimizer
    if optimizer == "auto":
        optimizer = "sgd" if opts.kind == "cnn" and opts.arch != "mnist_cnn" else "adamw"
    lr = opts.lr if opts.lr is not None else (0.1 * batch / 128 if optimizer == "sgd" else
                                              4e-3 if opts.kind == "rnn" else 2e-3)
    epochs = opts.epochs
    if epochs is None and opts.max_steps is None and opts.time_limit is None:
        epochs = 10
    smoothing = opts.label_smoothing
    if smoothing is None:
        smoothing = LABEL_SMOOTHING if opts.kind == "cnn" and opts.arch != "mnist_cnn" else 0.0
    return replace(opts, batch_size=batch, optimizer=optimizer, lr=lr, epochs=epochs,
                   label_smoothing=smoothing)


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
    check_gpu(opts)
    if not (opts.address or has_cluster()):
        check_fits_here(opts, local_cpus())
    if opts.kind == "cnn":
        if opts.arch not in CNN_ARCHS:
            raise ValueError(f"unknown --arch {opts.arch!r}; choose one of "
                             f"{', '.join(sorted(CNN_ARCHS))}")
        if opts.channels not in (1, 3):
            raise ValueError("--channels must be 1 or 3")
        if not 8 <= opts.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"--image-size must be between 8 and {MAX_IMAGE_SIZE}, got "
                             f"{opts.image_size}")
        if opts.arch in TORCHVISION_ARCHS and opts.image_size < 32:
            raise ValueError(f"--arch {opts.arch} needs --image-size of at least 32, got "
                             f"{opts.image_size}")
        choose_augment(opts.augment, opts.channels)
        if not 0 <= opts.label_smoothing < 1:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {opts.label_smoothing}")
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
    check_init(opts)  # last: it reads the source, and builds the model the options describe


OPTIMIZERS = ("sgd", "adamw")
# The ResNets' label smoothing: far better test accuracy on the team's photos after a short
# run, both seeds, and no worse after a longer one (BENCHMARKS.md, Photo recipe section).
LABEL_SMOOTHING = 0.1
MAX_IMAGE_SIZE = 2048  # beyond it one decoded image alone would take tens of megabytes


def read_metrics(out: str) -> list[dict]:
    uri = storage.join(out, "metrics.jsonl")
    try:
        text = storage.read_bytes(uri).decode()
    except storage.StorageError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def curves_png(history: list[dict], key: str) -> bytes:
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
    b.plot(epochs, [r[key] for r in history], "o-", color="C2")
    b.set(xlabel="epoch", ylabel=key.replace("_", " "), title=key.replace("_", " "))
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
