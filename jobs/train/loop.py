"""The per-worker training function, one loop for every model family. What differs between a
CNN and a char-RNN lives in the family's objects (jobs/train/cnn.py, jobs/train/rnn.py); how
long the run is, its learning rate and when it validates, in jobs/train/schedule.py."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from kiln import compat
from kiln.models import build_model
from kiln.models.checkpoint import (
    OPTIMIZER_FILE,
    STATE_FILE,
    model_to_bytes,
    training_state_from_bytes,
    training_state_to_bytes,
)
from kiln.pipelines import storage
from kiln.train.families import family
from kiln.train.schedule import Budget, lr_at, warmup_steps
from kiln.train.tasks import BATCH_NORMS, WorkerConfig, make_optimizer, train_mode


@dataclass
class Progress:
    """What resume restores besides the weights and the optimizer."""

    epoch: int = 0  # whole epochs completed
    step: int = 0  # optimizer steps completed
    elapsed_s: float = 0.0  # training time before this attempt
    history: list = field(default_factory=list)
    best: list | None = None  # the best record's family.rank(), as a list (JSON)
    ended: list | None = None  # [max_steps, time_limit_s] of the budget the run completed


def _all_reduce(values: torch.Tensor, op=None) -> torch.Tensor:
    """All-reduce across the workers, on the device the process group's backend takes (NCCL
    refuses CPU tensors); a single process returns the values as they are."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if (
        dist.get_backend() == "nccl") else torch.device("cpu")
    values = values.to(device)
    dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
    return values.cpu()


def all_sum(values: torch.Tensor) -> list[float]:
    return _all_reduce(values.double()).tolist()


def better(fam, record: dict, best) -> bool:
    """Whether a validation record beats the best so far, by the family's rank (higher is
    better). A best saved as a bare metric by an earlier kiln ranks as that metric alone."""
    if best is None:
        return True
    if not isinstance(best, list):
        best = [best if fam.mode == "max" else -best, -math.inf][:len(fam.rank(record))]
    return tuple(fam.rank(record)) > tuple(best)


def quiet_train_logs() -> None:
    """The driver prints one line a validation; Train V2's per-report INFO line comes from a
    logger named by its module's file path."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger(compat.train_report_logger()).setLevel(logging.WARNING)


@dataclass
class Worker:
    """One worker's model and where it runs: `model` is the DDP wrapper that trains, `raw`
    the module inside it that validates and is saved."""

    cfg: WorkerConfig
    family: object  # the model family's object (kiln.train.families): its metric's rank
    task: object  # the family's worker side
    spec: object
    model: torch.nn.Module
    raw: torch.nn.Module
    opt: torch.optim.Optimizer
    device: torch.device
    layout: torch.memory_format
    autocast: object
    rank: int
    workers: int


def node_cpus() -> float:
    """The CPUs of the Ray node this process runs on (a cluster's CPUs are not one node's)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    return next((n["Resources"].get("CPU", math.inf) for n in ray.nodes()
                 if n["NodeID"] == node), math.inf)  # not found: no cap


def worker_threads(share: int, cpus: float, on_node: int) -> int:
    """A worker's torch threads: its share of the run's CPUs as the driver counted them
    (`share`), and no more than this node's `cpus` over the run's workers on it."""
    return max(1, min(share, int(cpus // max(1, on_node))))


def train_loop_per_worker(config: dict) -> None:
    """`config`: {"worker": WorkerConfig}, as jobs/train/fit.py hands it to Ray Train."""
    import ray.train
    import ray.train.torch

    quiet_train_logs()
    cfg: WorkerConfig = config["worker"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(worker_threads(cfg.threads, node_cpus(), ctx.get_local_world_size()))
    torch.manual_seed(cfg.seed + rank)
    spec = cfg.spec
    fam = family(cfg.kind)
    task = fam.task(spec, cfg)
    model = build_model(cfg.kind, spec)
    checkpoint = ray.train.get_checkpoint()
    if cfg.start.init is not None and not checkpoint:  # --init; the head's fresh tensors stay
        model.load_state_dict(cfg.start.init, strict=False)
    opt = make_optimizer(model, cfg, task.weight_decay[cfg.schedule.optimizer])
    train_mode(model, cfg.start.freeze_backbone)
    prog = Progress()
    if checkpoint:  # resume, or a worker group restarted after a failure
        with checkpoint.as_directory() as d:
            model.load_state_dict(storage.load_model(d).model.state_dict())
            state = storage.read_files(d, (OPTIMIZER_FILE, STATE_FILE))
            prog = Progress(**training_state_from_bytes(state, opt, d))
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    # Channels-last convolutions run faster on GPUs (tensor cores) and on CPUs (oneDNN's
    # NHWC kernels) alike, as labeling takes them (BENCHMARKS.md, Photo recipe section).
    layout = torch.channels_last if task.channels_last else torch.preserve_format
    if layout is torch.channels_last:
        model = model.to(memory_format=layout)
    model = ray.train.torch.prepare_model(model)
    raw = model.module if hasattr(model, "module") else model
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=on_gpu and task.bf16)
    w = Worker(cfg, fam, task, spec, model, raw, opt, device, layout, autocast, rank,
               ctx.get_world_size())
    shards = ({n: h.for_worker(rank, w.workers) for n, h in cfg.feed.held.items()} if cfg.feed.held
              else {n: ray.train.get_dataset_shard(n) for n in ("train", "val")})
    train, val = task.loaders(shards, cfg, rank, w.workers)
    # Data that fits is read into memory before the clock starts, as a plain loop loads its
    # tensors before it trains: --time-limit counts training and validation, not loading.
    train.load()
    val.load()
    run(w, train, val, prog)


@dataclass
class Round:
    """Training since the last validation: what its metrics line reports."""

    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    samples: int = 0
    train_s: float = 0.0


def run(w: Worker, train, val, prog: Progress) -> None:
    """Steps until the budget ends (jobs/train/schedule.py), validating at each epoch's end, or
    under a time limit alone at the budget's milestones, and once more at the end."""
    sched, task = w.cfg.schedule, w.task
    budget = Budget(sched.max_steps, sched.time_limit_s, prog.step)
    per_epoch = train.steps_per_epoch
    if per_epoch < 1:
        raise ValueError("the training data holds less than one batch: lower --batch-size")
    start, before, train_s = time.monotonic(), prog.elapsed_s, 0.0
    rnd, batches, done = Round(), None, 0  # done: steps into the current epoch
    # The warm-up's length is fixed once the run's length is first known (every worker
    # agrees on it): one that followed each new estimate would jump the rate, or fall back.
    warm = None
    if complete(sched, prog):  # restored from the last checkpoint of a run that has ended
        return
    while True:
        if batches is None:
            task.begin_epoch()
            batches, done = iter(train.epoch(prog.epoch)), 0
        t0 = time.monotonic()
        batch = next(batches, None)
        if batch is None:  # the end of an epoch
            if done < per_epoch:  # its last step did not count it already
                prog.epoch += 1
            batches = None
            finished = sched.epochs is not None and prog.epoch >= sched.epochs
            if finished:
                prog.ended = [sched.max_steps, sched.time_limit_s]
            if finished or not budget.by_time:
                validate(w, val, prog, rnd, budget, prog.epoch, before + time.monotonic() - start,
                         train if finished else None)
                rnd = Round()
            if finished:
                return
            continue
        if warm is None and math.isfinite(budget.total):
            warm = warmup_steps(budget.total, *sched.warmup)
        lr = lr_at(prog.step, budget.total, sched.lr, warm or sched.warmup[0], sched.cooldown)
        for group in w.opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss, n = train_step(task, w.model, w.opt, task.to_device(batch, w.device, w.layout),
                             w.autocast)
        prog.step, done = prog.step + 1, done + 1
        if done == per_epoch:  # the epoch's last step: a checkpoint from here on counts it
            prog.epoch += 1
        rnd.loss_sum = rnd.loss_sum.to(loss.device) + loss.detach().double() * n
        rnd.samples += n
        step_s = time.monotonic() - t0
        train_s, rnd.train_s = train_s + step_s, rnd.train_s + step_s
        last = settle(budget, prog.step, train_s, before + time.monotonic() - start, sched)
        if last:
            prog.ended = [sched.max_steps, sched.time_limit_s]
        if last or budget.eval_due(prog.step):
            validate(w, val, prog, rnd, budget, prog.epoch + done % per_epoch / per_epoch,
                     before + time.monotonic() - start, train if last else None)
            # The validation moved the clock: the next step's rate must already see it.
            if settle(budget, prog.step, train_s, before + time.monotonic() - start, sched) \
                    and not last:  # and it spent the budget: the final validation follows
                prog.ended, last = [sched.max_steps, sched.time_limit_s], True
                validate(w, val, prog, rnd, budget, prog.epoch + done % per_epoch / per_epoch,
                         before + time.monotonic() - start, train)
            rnd = Round()
        if last:
            return


def complete(sched, prog: Progress) -> bool:
    """Whether the budget of a restored run is spent (its steps, which --epochs sets too, or
    its time), or is the one the run already completed: a run killed after its last
    checkpoint, or resumed again once done, trains no further and adds no line (a larger
    budget continues it)."""
    return (prog.ended == [sched.max_steps, sched.time_limit_s]
            or (sched.max_steps is not None and prog.step >= sched.max_steps)
            or (sched.time_limit_s is not None and prog.elapsed_s >= sched.time_limit_s))


def settle(budget: Budget, step: int, train_s: float, elapsed: float, sched) -> bool:
    """Agrees the run's total steps with the other workers; True when the run is over."""
    budget.total, late = agree(budget.estimate(step, train_s, elapsed),
                               sched.time_limit_s is not None and elapsed > sched.time_limit_s)
    return step >= budget.total or late


def agree(total: float, late: bool) -> tuple[float, bool]:
    """Every worker must take the same steps at the same learning rate, or one would wait
    forever in the next collective (and the replicas would drift): the smallest estimate of
    the total and any worker's lateness win."""
    both = _all_reduce(torch.tensor([-total, 1.0 if late else 0.0], dtype=torch.float64),
                       dist.ReduceOp.MAX)
    return -float(both[0]), bool(both[1] > 0)


PRECISE_BN_IMAGES = 4096  # over every worker: 32 batches of 64 on each of 2 workers
PRECISE_BN_MIN_S = 2.0  # ... and at most a validation's time, or this where that is shorter


def norms(model) -> list:
    return [m for m in model.modules()
            if isinstance(m, BATCH_NORMS) and m.training
            and m.track_running_stats]


def precise_bn(w: Worker, train, seconds: float) -> None:
    """Batch norm's running statistics recomputed before the final validation, as the mean
    over PRECISE_BN_IMAGES training images of the final weights, every worker's averaged.
    Training leaves them an exponential average of rank 0's last ~10 batches of 64 (DDP
    broadcasts rank 0's buffers), taken while the weights still moved: noisy enough that
    two validations 7 steps apart differed noticeably on 2,000 photos. A frozen
    backbone's norms keep the loaded statistics (they are in eval mode). A worker stops
    after `seconds` (a big network on a CPU), with what it has seen; the batch norms run
    locally, and only the averaging at the end is collective."""
    layers = norms(w.raw)
    unaugmented = getattr(train, "unaugmented", None)
    batches = unaugmented(PRECISE_BN_IMAGES) if layers and unaugmented else None
    # Every worker must agree to take part, or one would wait in the all-reduce below.
    if _all_reduce(torch.tensor([0.0 if batches else 1.0]), dist.ReduceOp.MAX)[0] > 0:
        return
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative mean over the batches below, not an EMA
    t0 = time.monotonic()
    with torch.no_grad():
        for batch in batches:
            with w.autocast:
                w.raw(w.task.to_device(batch, w.device, w.layout)["x"])  # (b, C, S, S)
            if time.monotonic() - t0 > seconds:
                break
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum
    # Every norm's mean and variance in one all-reduce, not two a layer.
    stats = [s for m in layers for s in (m.running_mean, m.running_var)]
    mean = _all_reduce(torch.cat([s.detach().flatten().float() for s in stats])) / w.workers
    for s, part in zip(stats, mean.split([s.numel() for s in stats]), strict=True):
        s.copy_(part.view_as(s))


def validate(w: Worker, val, prog: Progress, rnd: Round, budget: Budget, epoch: float,
             elapsed: float, train=None) -> None:
    """Validation sums all-reduced into metrics, the round's line, a checkpoint. At the
    run's end (`train` given) batch norm's statistics are made precise first."""
    t0 = time.monotonic()
    if train is not None:
        precise_bn(w, train, max(PRECISE_BN_MIN_S, budget.val_s or 0.0))
    w.raw.eval()
    with torch.no_grad():
        metrics = w.task.metrics(all_sum(w.task.val_sums(w.raw, val, w.device, w.layout,
                                                         w.autocast)))
    train_mode(w.raw, w.cfg.start.freeze_backbone)
    val_s = time.monotonic() - t0
    total = all_sum(torch.tensor([rnd.loss_sum.item(), rnd.samples, rnd.train_s]))
    mean_s = total[2] / w.workers  # total = [loss sum, samples, seconds]
    whole = abs(epoch - round(epoch)) < 1e-9
    record = {"epoch": int(round(epoch)) if whole else round(epoch, 3), "step": prog.step,
              "train_loss": total[0] / max(total[1], 1), **metrics,
              "samples_per_s": total[1] / max(mean_s, 1e-9), "train_s": round(mean_s, 3),
              "val_s": round(val_s, 3), "elapsed_s": elapsed + val_s,
              "lr": w.opt.param_groups[-1]["lr"]}  # the head's, with --init
    prog.history.append(record)
    is_best = better(w.family, record, prog.best)
    # The final weights where they are as good as the best within noise; only at the end:
    # a resumed run that trains on also holds an `ended` from its first budget.
    keep = is_best or (train is not None and within_noise(w.family, record, prog.history))
    if is_best:
        prog.best = list(w.family.rank(record))
    report(w, prog, record, keep)
    # What a validation costs, checkpoint included, plans the later ones and is kept out of
    # the training steps' share of a time budget: every worker needs the same figure.
    spent = torch.tensor([time.monotonic() - t0])
    budget.record_eval(float(_all_reduce(spent, dist.ReduceOp.MAX)[0]), prog.step)


NOISE_ERRORS = 2.0


def within_noise(fam, record: dict, history: list[dict]) -> bool:
    """Whether the run's last validation is as good as its best within the validation's
    noise (NOISE_ERRORS standard errors): then model/ keeps the final weights, which a
    schedule that anneals to zero trained to its end, and an earlier validation only where it
    is better beyond noise (an overfitting run). On 2% of 50,000 images one standard error
    of accuracy is 1.3 points: the best of eight validations is often the luckiest."""
    best = max(history, key=fam.rank)
    return fam.rank(record)[0] >= fam.rank(best)[0] - NOISE_ERRORS * fam.noise(best, record)


def train_step(task, model, opt, batch: dict, autocast) -> tuple[torch.Tensor, int]:
    """One optimizer step: the task's loss under autocast, backward, clipping, update."""
    with autocast:
        loss, n = task.loss(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if task.clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), task.clip)
    opt.step()
    return loss, n


def report(w: Worker, prog: Progress, record: dict, keep: bool) -> None:
    """Checkpoint every validation through Ray Train; rank 0 also keeps the run folder
    current: metrics.jsonl, and model/ whenever validation improves, and at the end where
    the final weights are as good within noise (within_noise)."""
    import json

    import ray
    import ray.train

    cfg = w.cfg
    prog.elapsed_s = record["elapsed_s"]
    extra = {"metrics": record, "trained_on": cfg.data, "train": cfg.settings}
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if w.rank == 0:
            files = model_to_bytes(w.raw, cfg.kind, w.spec, extra)
            storage.save_model(d, files)
            storage.write_files(d, training_state_to_bytes(w.opt, prog.__dict__))
            lines = "".join(json.dumps(r) + "\n" for r in prog.history)
            storage.write_bytes(storage.join(cfg.out, "metrics.jsonl"), lines.encode())
            if keep:
                storage.save_model(storage.join(cfg.out, "model"), files)
            if cfg.lines is not None:  # the driver's epoch line, if its queue still answers
                with contextlib.suppress(Exception):
                    cfg.lines.put(record, timeout=5)
            ckpt = ray.train.Checkpoint.from_directory(d)
        # Ray Train hands rank 0's metrics on (to kiln tune): where it runs, with them (its
        # node, and its process, which names its log files).
        where = {"node": ray.get_runtime_context().get_node_id(), "worker_pid": os.getpid()}
        ray.train.report({**record, **where}, checkpoint=ckpt,
                         checkpoint_dir_name=f"eval-{len(prog.history):04d}")
