"""The Ray Train run of `kiln train`: TorchTrainer over the per-worker loop (DDP, a checkpoint
every validation), each epoch's line printed as rank 0 reports it, lost workers and nodes
retried from the last checkpoint and every other failure raised at once as one line."""

from __future__ import annotations

import queue
import threading
from dataclasses import replace

from rich.console import Console

from kiln import compat
from kiln.cluster.connect import logs_dir
from kiln.cluster.placement import local_gpus
from kiln.options import TrainOptions
from kiln.pipelines import storage
from kiln.pipelines.train_data import HeldShard
from kiln.train.families import family
from kiln.train.family import Prepared
from kiln.train.schedule import SGD_WARMUP, WARMUP_SHARE, WARMUP_STEPS
from kiln.train.tasks import Feed, Schedule, Start, WorkerConfig

CHECKPOINTS = "checkpoints"
ADAM_COOLDOWN = 0.3  # AdamW holds its peak rate for 70% of the run (jobs/train/schedule.py)
VAL_CACHE_BYTES = 256 * 1024 * 1024
MAX_FAILURES = 3  # lost workers or nodes a run survives


class TrainingError(ValueError):
    """A training worker raised: its exception's type and message, for one line."""


def worker_config(opts: TrainOptions, data: Prepared, cpus: float, lines=None) -> WorkerConfig:
    per_epoch = data.steps_per_epoch
    max_steps = opts.max_steps
    if opts.epochs is not None:
        max_steps = min(max_steps or per_epoch * opts.epochs, per_epoch * opts.epochs)
    own = family(opts.kind).worker_options(opts)  # the family's options, as workers take them
    settings = {**{k: getattr(opts, k) for k in (
        "epochs", "max_steps", "time_limit", "batch_size", "lr", "optimizer", "workers",
        "seed")}, **own}
    spec, init, head = data.spec, None, None
    freeze, scale = opts.freeze_backbone, opts.backbone_lr_scale
    if data.resumed_init:  # its checkpoint holds the weights; its start, the layout
        from kiln.train.init import resumed_layout

        spec, head, freeze, scale = resumed_layout(spec, data.resumed_init)
        settings["init"] = data.resumed_init["card"]
    elif opts.init:
        from kiln.train.init import card, fit_for_run

        spec, fit, source = fit_for_run(opts, spec, data.init_source)
        init, head = fit.state, fit.head
        settings["init"] = card(opts, fit, source)
    schedule = Schedule(
        batch=opts.batch_size, lr=opts.lr, optimizer=opts.optimizer,
        cooldown=1.0 if opts.optimizer == "sgd" else ADAM_COOLDOWN,
        warmup=SGD_WARMUP if opts.optimizer == "sgd" else (WARMUP_STEPS, WARMUP_SHARE),
        epochs=opts.epochs, max_steps=max_steps,
        time_limit_s=opts.time_limit * 60 if opts.time_limit else None)
    feed = Feed(whole_train=data.whole_train, train_rows=data.train_rows,
                cache_val=data.val.size_bytes() / opts.workers <= VAL_CACHE_BYTES)
    return WorkerConfig(
        kind=opts.kind, spec=spec, out=opts.out, data=opts.data, schedule=schedule, feed=feed,
        start=Start(init=init, head=head, freeze_backbone=freeze, backbone_lr_scale=scale),
        seed=opts.seed, settings=settings, lines=lines, **own,
        # A lone worker on a small machine takes every core as torch threads; Ray's own
        # reservation stays below the CPUs so that Ray Data's tasks always find room.
        threads=1 if opts.gpu else max(1, int(cpus // opts.workers)))


def cpus_per_worker(opts: TrainOptions, cpus: float) -> float:
    """A worker's CPU reservation: a whole CPU while they fit, down to half of one, always
    leaving a quarter of a CPU for Ray Data's tasks."""
    return 1.0 if opts.gpu else max(0.5, min(1.0, (cpus - 0.25) / opts.workers))


def check_fits_here(opts: TrainOptions, cpus: int) -> None:
    """On a local Ray the workers must fit this machine, or Ray Train would wait for them
    forever."""
    if opts.gpu:
        gpus = local_gpus()
        if opts.workers > gpus:
            raise ValueError(f"--workers {opts.workers} --gpu needs {opts.workers} GPUs; this "
                             f"machine has {gpus}: lower --workers, or point --address at a "
                             "Ray cluster")
    elif opts.workers * cpus_per_worker(opts, cpus) > cpus:
        raise ValueError(f"--workers {opts.workers} does not fit this machine's {cpus} CPUs "
                         f"(at most {2 * cpus} workers here): lower --workers, or point "
                         "--address at a Ray cluster")


def lost(error: BaseException) -> bool:
    """A failure a retry can cure: a worker or node lost (killed, out of memory, preempted,
    hung) or a connection dropped. Ray Train V2 reports a dead worker as a failed health
    check that holds the actor's error. Anything else (a ValueError, a bug, a missing file)
    fails the same way again, so it is raised at once."""
    import ray.exceptions as rex

    failed, timed_out = compat.worker_health_errors()
    if isinstance(error, timed_out):
        return True
    if isinstance(error, failed):
        error = error.health_check_failure
    return isinstance(error, (rex.RayActorError, rex.NodeDiedError, rex.WorkerCrashedError,
                              rex.ObjectLostError, rex.OutOfMemoryError, ConnectionError,
                              TimeoutError))


def trainer_class():
    """TorchTrainer whose failure policy retries lost workers only, and which starts no
    dataset manager actor for a run whose data goes to the workers as object refs (no
    `datasets`; a process start, seconds on a small machine). Ray Train V2 takes its policy
    from FailureConfig alone, which retries every error, and adds its datasets callback to
    every run; both are internal (kiln.compat)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.exceptions import WorkerGroupError

    datasets_callback = compat.datasets_callback()
    DefaultFailurePolicy, FailureDecision = compat.failure_policy()  # noqa: N806

    class LostWorkersOnly(DefaultFailurePolicy):
        def make_decision(self, training_failed_error):
            failures = getattr(training_failed_error, "worker_failures", None)
            if isinstance(training_failed_error, WorkerGroupError) and failures and not any(
                    lost(e) for e in failures.values()):
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    class Trainer(TorchTrainer):  # the private methods named in compat.RUN_CONTROLLER, ...
        def _initialize_and_run_controller(self, **kwargs):
            policy = LostWorkersOnly(self.run_config.failure_config)
            kwargs[compat.FAILURE_POLICY_ARG] = policy
            return super()._initialize_and_run_controller(**kwargs)

        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, datasets_callback)]

    return Trainer


def fit(opts: TrainOptions, data: Prepared, fam, console: Console) -> None:
    import ray
    from ray.util.queue import Queue

    cpus = ray.cluster_resources().get("CPU", 1)
    lines = Queue(actor_options={"num_cpus": 0})
    try:
        run_fit(opts, data, fam, console, cpus, lines)
    except TrainingError as e:
        where = logs_dir()
        raise TrainingError(f"{e} (all of the workers' output: {where})" if where else str(e)
                            ) from None
    finally:
        lines.shutdown()


def run_fit(opts: TrainOptions, data: Prepared, fam, console: Console, cpus: float, lines
            ) -> None:
    trainer = make_trainer(opts, data, cpus, cpus_per_worker(opts, cpus), lines)
    with_epoch_lines(trainer.fit, lines, fam, console)


def make_trainer(opts: TrainOptions, data: Prepared, cpus: float, per_worker: float, lines=None,
                 callbacks: tuple = ()):
    """The TorchTrainer of one run: `cpus` are the run's to use (its workers' torch threads),
    `per_worker` each worker's reservation; `callbacks` Ray Train's (kiln tune's report to
    Tune)."""
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )

    from kiln.train.loop import train_loop_per_worker

    cfg = worker_config(opts, data, cpus, lines)
    # Data that every worker holds whole goes to them as object refs (HeldShard), the rest
    # through Ray Train's streaming ingest; the family says which, and what is split.
    held, split = family(opts.kind).held(cfg)
    datasets = {"train": data.train, "val": data.val}
    if held:
        cfg = replace(cfg, feed=replace(cfg.feed, held={n: HeldShard.of(d, split=n in split)
                                                        for n, d in datasets.items()}))
        datasets = {}
    fs, path = storage.filesystem(opts.out)
    return trainer_class()(
        train_loop_per_worker,
        train_loop_config={"worker": cfg},
        scaling_config=ScalingConfig(num_workers=opts.workers, use_gpu=opts.gpu,
                                     resources_per_worker={"CPU": per_worker}),
        run_config=RunConfig(
            name=CHECKPOINTS, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
        ),
        datasets=datasets or None,
        dataset_config=DataConfig(datasets_to_split=split) if datasets else None,
    )


def epoch_line(rec: dict, fam) -> str:
    """A validation record as the console shows it (kiln train's lines, kiln tune's)."""
    return (f"epoch {rec['epoch']:>5}  train_loss {rec['train_loss']:.4f}  "
            f"{fam.summary_line(rec)}  {rec['samples_per_s']:,.0f} samples/s  "
            f"{rec['elapsed_s']:.0f}s")


def with_epoch_lines(fit_fn, lines, fam, console: Console) -> None:
    """Runs fit() in a thread and prints each record that rank 0 reports as an epoch line;
    a worker's exception comes back as a TrainingError naming its type and message."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fit_fn()
        except BaseException as e:  # raised below, in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name="kiln-fit", daemon=True)
    thread.start()
    while True:
        alive = thread.is_alive()
        try:
            rec = lines.get(timeout=1.0) if alive else lines.get_nowait()
        except queue.Empty:  # ray.util.queue.Empty is one
            if not alive:
                break
            continue
        except Exception:  # the queue is gone: the run goes on without its epoch lines
            thread.join()
            break
        console.print(epoch_line(rec, fam), highlight=False)
    thread.join()
    if "error" in box:
        raise worker_error(box["error"]) from None
    if box["result"].error:
        raise worker_error(box["result"].error) from None


def collateral(error: BaseException) -> bool:
    """A torch.distributed error: what the other workers raise when one of them fails."""
    import torch.distributed as dist

    text = str(error).lower()
    return isinstance(error, getattr(dist, "DistError", ())) or any(
        w in text for w in ("gloo", "nccl", "connection closed by peer", "connection reset"))


def worker_error(error: BaseException) -> Exception:
    """The first worker's exception as a TrainingError: 'TypeName: message'."""
    failures = getattr(error, "worker_failures", None)
    if failures:  # the cause, not a peer's broken collective
        rank, first = min(failures.items(), key=lambda kv: (collateral(kv[1]), kv[0]))
        first = getattr(first, "health_check_failure", first)  # a lost worker's own error
        message = (str(first).strip().splitlines() or [""])[0]
        return TrainingError(f"training failed: worker {rank} raised {type(first).__name__}: "
                             f"{message}")
    if isinstance(error, KeyboardInterrupt):
        return error
    text = str(error).strip().splitlines()
    return TrainingError(f"training failed: {type(error).__name__}: {text[-1] if text else ''}")
