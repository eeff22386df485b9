"""`kiln train cnn|rnn`: checks every option and the data before Ray starts, prepares the data
on Ray Data (the model family's object, kiln.train.families, knows how), runs the per-worker
loop under TorchTrainer (jobs/train/fit.py: DDP, a checkpoint every validation, lost workers
retried from it), and finishes the run folder: model/ (best epoch), metrics.jsonl, curves.png."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace

from rich.console import Console

from kiln.cluster import connect
from kiln.cluster.connect import RayOptions, ray_session
from kiln.cluster.placement import Placement, place
from kiln.options import BACKBONE_LR_SCALE, TrainOptions, one_of
from kiln.pipelines import storage
from kiln.pipelines.fence import check_run_folder, mark_run_folder
from kiln.pipelines.lease import Lease
from kiln.train.families import family
from kiln.train.fit import CHECKPOINTS, check_fits_here, fit
from kiln.train.init import check_init, resumed_init


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
    fam = family(opts.kind)
    early = fam.check_data(opts)  # the data's mistakes fail here, before Ray starts
    # No dashboard for a training job's own local Ray: on 2 CPUs its processes take CPU time
    # from the DDP workers' steps.
    with Lease(opts.out, "train", uuid.uuid4().hex[:8]), \
            ray_session(RayOptions(address=opts.address, log_to_driver=opts.debug,
                                   forward_credentials=opts.forward_credentials)):
        # The lease: one run writes a run folder at a time.
        mark_run_folder(opts.out, "train")
        t0 = time.monotonic()
        data = fam.prepare(opts, early)
        if prior:
            data = replace(data, resumed_init=prior)
        console.print(f"data ready in {time.monotonic() - t0:.1f}s: {data.summary}")
        try:
            fit(opts, data, fam, console)
        finally:  # a failed run keeps the curves of the epochs it did
            history = read_metrics(opts.out)
            if history:
                storage.write_bytes(storage.join(opts.out, "curves.png"),
                                    curves_png(history, fam.metric_key))
    best = storage.read_model_config(opts.out).get("metrics", {})
    console.print(f"[bold green]done[/]: best {fam.summary_line(best)} -> {opts.out}/model")
    return {"best": best, "epochs": len(history), "out": opts.out}


def resolve(opts: TrainOptions) -> TrainOptions:
    """Fills the defaults that depend on the model family and architecture (the family's
    batch_size, adamw_lr and `auto`). --batch-size is global (all workers together); SGD's
    rate is 0.1 per 128 samples (the standard recipe). Without --epochs, --max-steps or
    --time-limit a run is 10 epochs."""
    fam = family(opts.kind)
    auto = fam.auto(opts)
    batch = opts.batch_size if opts.batch_size is not None else fam.batch_size  # 0 stays 0
    optimizer = auto["optimizer"] if opts.optimizer == "auto" else opts.optimizer
    lr = opts.lr if opts.lr is not None else (
        0.1 * batch / 128 if optimizer == "sgd" else fam.adamw_lr)
    smoothing = (opts.label_smoothing if opts.label_smoothing is not None
                 else auto["label_smoothing"])
    epochs = opts.epochs
    if epochs is None and opts.max_steps is None and opts.time_limit is None:
        epochs = 10
    return replace(opts, epochs=epochs, batch_size=batch, optimizer=optimizer, lr=lr,
                   label_smoothing=smoothing)


def validate(opts: TrainOptions, where: Placement | None = None) -> None:
    """Every option checked before Ray starts, naming what would do; `where` the command's
    placement where the caller decided it already (kiln tune, for every trial)."""
    fam = family(opts.kind)
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
    one_of("--optimizer", opts.optimizer, ("auto", *OPTIMIZERS))  # resolve() chose for auto
    if not 0 < opts.val_fraction < 1 and opts.val is None:
        raise ValueError("--val-fraction must be between 0 and 1")
    where = where or place(opts)
    if not where.cluster:
        check_fits_here(opts, where.cpus)
    fam.check_options(opts)
    check_init(opts)  # last: it reads the source, and builds the model the options describe


OPTIMIZERS = ("sgd", "adamw")


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
