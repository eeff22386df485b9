"""The per-worker training function, one loop for both model kinds. What differs between a
CNN and a char-RNN lives in a small task object: a batch -> (loss, samples), and how
validation sums up into metrics."""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models import build_model
from models.checkpoint import (
    SPECS,
    load_folder,
    load_training_state,
    model_to_bytes,
    save_folder,
    save_training_state,
)
from pipelines import storage
from pipelines.transforms import augment_batch

LN2 = math.log(2)


class CNNTask:
    # bf16 autocast and channels-last on CUDA: 1.56x (resnet20) and 2.1x (resnet18 at 224)
    # the fp32 step on an H200 (BENCHMARKS.md, GPU section).
    metric, mode, clip, bf16, channels_last = "val_accuracy", "max", None, True, True

    def __init__(self, spec):
        self.index = {c: i for i, c in enumerate(spec.classes)}

    def collate(self, batch: dict) -> dict:
        """numpy rows -> tensors; class names -> indices (-1: a class training never saw)."""
        return {"x": torch.from_numpy(batch["x"].copy()),  # Ray's arrays are read-only
                "y": torch.tensor([self.index.get(c, -1) for c in batch["label"]])}

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        x = augment_batch(batch["x"])  # (B, C, S, S), randomly shifted
        return F.cross_entropy(model(x), batch["y"]), len(x)

    def eval_sums(self, model, batch) -> torch.Tensor:
        logits = model(batch["x"])  # (B, classes)
        loss = F.cross_entropy(logits.float(), batch["y"], reduction="sum", ignore_index=-1)
        correct = (logits.argmax(1) == batch["y"]).sum()
        return torch.stack([loss, correct.float(), loss.new_tensor(float(len(logits)))])

    def metrics(self, sums: list[float]) -> dict:
        loss, correct, n = sums
        return {"val_loss": loss / max(n, 1), "val_accuracy": correct / max(n, 1)}


class RNNTask:
    # char-rnn clips gradients at 5. No bf16 autocast: cuDNN's LSTM ran 7-19% slower under it
    # than in fp32 on an H200 (BENCHMARKS.md, GPU section).
    metric, mode, clip, bf16, channels_last = "val_loss", "min", 5.0, False, False

    def __init__(self, spec):
        pass

    def collate(self, batch: dict) -> dict:
        return {"ids": torch.from_numpy(batch["ids"].copy())}

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        ids = batch["ids"]  # (B, T + 1)
        logits, _ = model(ids[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               ids[:, 1:].reshape(-1))
        return loss, ids[:, 1:].numel()

    def eval_sums(self, model, batch) -> torch.Tensor:
        ids = batch["ids"]
        logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               ids[:, 1:].reshape(-1), reduction="sum")
        return torch.stack([loss, loss.new_tensor(float(ids[:, 1:].numel()))])

    def metrics(self, sums: list[float]) -> dict:
        nats = sums[0] / max(sums[1], 1)
        return {"val_loss": nats, "bits_per_char": nats / LN2}


TASKS = {"cnn": CNNTask, "rnn": RNNTask}


@dataclass
class Progress:
    """What resume restores besides the weights and the optimizer."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    elapsed_s: float = 0.0  # training time before this attempt
    history: list = field(default_factory=list)
    best: float | None = None


WARMUP_STEPS = 20


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 2% of the steps (at most 20), then cosine decay to a
    tenth of the peak over the steps the run is set to take (--epochs or --max-steps).
    --time-limit only stops a run: with a large --epochs it keeps close to the peak rate,
    which is what a short budget wants (decaying by the clock instead cost a 2x256 LSTM
    0.4 nats/char after 90 s of training on this machine)."""
    warm = max(1, min(WARMUP_STEPS, total // 50))
    if step < warm:
        return peak * (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


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


def better(task, value: float, best: float | None) -> bool:
    return best is None or (value > best if task.mode == "max" else value < best)


def train_loop_per_worker(cfg: dict) -> None:
    import ray.train
    import ray.train.torch

    # The driver prints one line an epoch; Train V2's per-report INFO line comes from a logger
    # named by its module's file path.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"] + rank)
    kind = cfg["kind"]
    spec = SPECS[kind](**cfg["spec"])
    task = TASKS[kind](spec)
    model = build_model(kind, spec)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    prog = Progress()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume, or a worker group restarted after a failure
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_folder(d).model.state_dict())
            prog = Progress(**load_training_state(d, opt))
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    layout = torch.channels_last if on_gpu and task.channels_last else torch.preserve_format
    if layout is torch.channels_last:
        model = model.to(memory_format=layout)
    model = ray.train.torch.prepare_model(model)
    raw = model.module if hasattr(model, "module") else model
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=on_gpu and task.bf16)
    shards = {n: ray.train.get_dataset_shard(n) for n in ("train", "val")}
    workers = ctx.get_world_size()
    train_data = ShardCache(shards["train"], task, cfg["batch_size"], cfg["shuffle_buffer"],
                            seed=cfg["seed"] * 7919 + rank,
                            fits=cfg["train_bytes"] / workers <= TRAIN_CACHE_BYTES)
    # Small shards are read into memory before the clock starts, as a plain loop loads its
    # tensors before it trains: --time-limit counts training and validation, not loading.
    train_data.load()
    # A validation shard that fits is kept as batches: streaming it costs seconds an epoch.
    val_cache = list(val_batches(shards["val"], task, cfg)) if (
        cfg["val_bytes"] / workers <= VAL_CACHE_BYTES) else []
    start, stop = time.monotonic(), False
    # --time-limit counts training time (start-up excluded), across resumed attempts too.
    limit = cfg["time_limit_s"]
    before = prog.elapsed_s  # training time of earlier attempts
    deadline = time.time() + limit - before if limit else None
    while prog.epoch < cfg["epochs"] and not stop:
        model.train()
        # The loss sum stays on the device: reading it every step would make a GPU wait.
        t0, loss_sum, seen = time.monotonic(), torch.zeros((), dtype=torch.float64), 0
        for batch in train_data.epoch(prog.epoch):
            batch = {k: to_device(v, device, layout) for k, v in batch.items()}
            for group in opt.param_groups:
                group["lr"] = lr_at(prog.step, cfg["total_steps"], cfg["lr"])
            loss, n = train_step(task, model, opt, batch, autocast)
            prog.step += 1
            loss_sum = loss_sum.to(loss.device) + loss.detach().double() * n
            seen += n
            stop = prog.step >= cfg["max_steps"] or (
                prog.step % 10 == 0 and past_deadline(deadline))
            if stop:
                break
        train_time = time.monotonic() - t0
        record = evaluate(task, raw, shards["val"], cfg, device, autocast, val_cache, layout)
        val_time = time.monotonic() - t0 - train_time
        total = all_sum(torch.tensor([loss_sum.item(), seen, train_time]))
        prog.epoch += 1
        mean_time = total[2] / ctx.get_world_size()  # total = [loss sum, samples, seconds]
        record = {"epoch": prog.epoch, "step": prog.step, "train_loss": total[0] / max(total[1], 1),
                  **record, "samples_per_s": total[1] / max(mean_time, 1e-9),
                  "train_s": round(mean_time, 3), "val_s": round(val_time, 3),
                  "elapsed_s": before + time.monotonic() - start}
        prog.history.append(record)
        is_best = better(task, record[task.metric], prog.best)
        if is_best:
            prog.best = record[task.metric]
        report(raw, opt, prog, record, cfg, spec, rank, is_best)
        stop = stop or past_deadline(deadline)


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


def to_device(t: torch.Tensor, device, layout=torch.preserve_format) -> torch.Tensor:
    t = t.to(device, non_blocking=True)
    return t.contiguous(memory_format=layout) if layout is torch.channels_last and t.dim() == 4 \
        else t


TRAIN_CACHE_BYTES = 512 * 1024 * 1024


class ShardCache:
    """A worker's training batches. A shard that fits in TRAIN_CACHE_BYTES is read from Ray
    Data once, in large batches, and kept as tensors; each epoch then draws batches from it by
    a fresh full permutation. A bigger shard streams every epoch through iter_torch_batches
    with a local shuffle buffer. On 2 CPUs the streaming iterator cost ~15% of a 2x256 LSTM's
    step time, and a full permutation mixes better than a shuffle buffer. Every batch holds
    `batch_size` rows (a last, smaller one is dropped) so that all workers take the same
    number of steps."""

    def __init__(self, shard, task, batch_size: int, buffer: int, seed: int, fits: bool):
        self.shard, self.task, self.bs, self.buffer = shard, task, batch_size, buffer
        self.seed, self.fits = seed, fits
        self.rows: dict[str, torch.Tensor] | None = None

    def load(self) -> None:
        """Reads a shard that fits into memory (once); a bigger one is left to stream."""
        if self.fits and self.rows is None:
            parts = list(self.shard.iter_torch_batches(batch_size=max(self.bs, 4096),
                                                       collate_fn=self.task.collate))
            self.rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}

    def epoch(self, epoch: int):
        if not self.fits:
            yield from self.shard.iter_torch_batches(
                batch_size=self.bs, collate_fn=self.task.collate, drop_last=True,
                local_shuffle_buffer_size=self.buffer, local_shuffle_seed=epoch)
            return
        self.load()
        n = len(next(iter(self.rows.values()))) if self.rows else 0
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            self.seed * 100_003 + epoch))
        for i in range(0, n - self.bs + 1, self.bs):
            idx = order[i : i + self.bs]
            yield {k: v[idx] for k, v in self.rows.items()}


def past_deadline(deadline: float | None) -> bool:
    """Every worker must agree, or one would wait forever in the next collective."""
    late = torch.tensor([1.0 if deadline and time.time() > deadline else 0.0])
    return bool(_all_reduce(late, dist.ReduceOp.MAX).item())


VAL_CACHE_BYTES = 256 * 1024 * 1024


def val_batches(shard, task, cfg):
    return shard.iter_torch_batches(batch_size=max(256, cfg["batch_size"] * 2),
                                    collate_fn=task.collate)


@torch.no_grad()
def evaluate(task, model, shard, cfg, device, autocast, cache: list,
             layout=torch.preserve_format) -> dict:
    """Validation sums over this worker's shard (`cache`, when it was loaded; else streamed),
    all-reduced into metrics."""
    model.eval()
    sums = None
    for batch in cache or val_batches(shard, task, cfg):
        batch = {k: to_device(v, device, layout) for k, v in batch.items()}
        with autocast:
            s = task.eval_sums(model, batch).double()  # read once, after the last batch
        sums = s if sums is None else sums + s
    width = 3 if isinstance(task, CNNTask) else 2
    return task.metrics(all_sum(sums if sums is not None else torch.zeros(width)))


def report(model, opt, prog: Progress, record: dict, cfg, spec, rank: int,
           is_best: bool) -> None:
    """Checkpoint every epoch through Ray Train; rank 0 also keeps the run folder current:
    metrics.jsonl, and model/ whenever validation improves."""
    import json

    import ray.train

    prog.elapsed_s = record["elapsed_s"]
    extra = {"metrics": record, "trained_on": cfg["data"], "train": cfg["train_settings"]}
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if rank == 0:
            save_folder(d, model, cfg["kind"], spec, extra)
            save_training_state(d, opt, prog.__dict__)
            lines = "".join(json.dumps(r) + "\n" for r in prog.history)
            storage.write_bytes(storage.join(cfg["out"], "metrics.jsonl"), lines.encode())
            if is_best:
                storage.save_model(storage.join(cfg["out"], "model"),
                                   model_to_bytes(model, cfg["kind"], spec, extra))
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(record, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{prog.epoch:04d}")
