"""A training worker's side: the WorkerConfig the driver fills, the optimizer and its parameter
groups (--init's backbone and head), training mode with a frozen backbone's batch norms held,
and each model family's task object, which the one per-worker loop (jobs/train/loop.py)
drives: which batches a worker reads (jobs/train/batches.py holds them), batch -> loss,
validation sums -> metrics. The driver's side of a family is its family object
(kiln.train.families).

Batches are global: --batch-size B means B images (or B text streams) per optimizer step
whatever the number of workers; each of W workers takes B / W of them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kiln.models import CNNSpec, RNNSpec
from kiln.models.rnn import nll_sum
from kiln.pipelines.transforms import ImagePreset, augment_batch, scale_shift
from kiln.train.batches import ImageBatches, TextStreams, ValBatches, per_worker

LN2 = math.log(2)

# Every batch norm class of torch's.
BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
               torch.nn.SyncBatchNorm, torch.nn.LazyBatchNorm1d, torch.nn.LazyBatchNorm2d,
               torch.nn.LazyBatchNorm3d)


@dataclass(frozen=True)
class Schedule:
    """How long a run is and how its learning rate moves (jobs/train/schedule.py)."""

    batch: int  # global batch: images or text streams per step, all workers together
    lr: float  # peak learning rate
    optimizer: str  # "sgd" | "adamw"
    cooldown: float  # the last share of the run over which the rate decays to zero
    epochs: int | None  # None: the time limit alone ends the run
    max_steps: int | None  # from --epochs or --max-steps, whichever is smaller
    time_limit_s: float | None
    warmup: tuple = (20, 0.02)  # warm-up steps at most, and at most this share of the run


@dataclass(frozen=True)
class Feed:
    """What each worker reads, and how it gets it."""

    whole_train: bool = True  # every worker holds the whole training set (else a split)
    train_rows: int = 0
    cache_val: bool = True  # the validation shard is read once and kept
    held: dict | None = None  # {"train", "val"}: pipelines.train_data.HeldShard, where the
    # data is handed over as object refs (else Ray Train's dataset shards)


@dataclass(frozen=True)
class Start:
    """Where the weights start: --init's tensors, or nothing (random weights)."""

    init: dict | None = None  # the tensors to start from (models/init.py InitFit)
    head: list | None = None  # the head's tensor names
    freeze_backbone: bool = False
    backbone_lr_scale: float = 1.0


@dataclass
class WorkerConfig:
    """Everything a training worker is told; the driver fills it (jobs/train/fit.py)."""

    kind: str  # the model family (kiln.train.families)
    spec: CNNSpec | RNNSpec
    out: str  # the run folder URI
    data: str  # the training data URI (for the model card)
    schedule: Schedule
    feed: Feed = Feed()
    start: Start = Start()
    seed: int = 0
    threads: int = 1  # torch threads per worker
    augment: str = "none"  # CNN: shift | flip | none
    label_smoothing: float = 0.0  # CNN: the target's share spread over every class
    seq_len: int = 100  # RNN: characters per chunk (truncated BPTT length)
    settings: dict = field(default_factory=dict)  # the user's options, for the model card
    lines: object = None  # a ray.util.queue.Queue: rank 0 puts each metrics record for the
    # driver's epoch line


def param_groups(model, cfg: WorkerConfig) -> list[dict]:
    """One group, or with --init the loaded backbone at its share of the rate (`lr_scale`)
    and the head at the whole rate; --freeze-backbone leaves the backbone out (and fixed)."""
    if cfg.start.head is None:
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    head = set(cfg.start.head)
    named = list(model.named_parameters())
    backbone = [p for n, p in named if n not in head]
    top = {"params": [p for n, p in named if n in head], "lr_scale": 1.0}
    if cfg.start.freeze_backbone:
        for p in backbone:
            p.requires_grad_(False)
        return [top]
    return [{"params": backbone, "lr_scale": cfg.start.backbone_lr_scale}, top]


def make_optimizer(model, cfg: WorkerConfig, weight_decay: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.schedule.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.schedule.lr, momentum=0.9, nesterov=True,
                               weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.schedule.lr, weight_decay=weight_decay)


def train_mode(model, frozen: bool) -> None:
    """Training mode, but for the batch norms of a frozen backbone: their statistics stay
    the loaded ones."""
    model.train()
    for m in model.modules() if frozen else ():
        if isinstance(m, BATCH_NORMS) and not any(
                p.requires_grad for p in m.parameters()):
            m.eval()


class CNNTask:
    """A CNN training worker's side: batches -> loss, validation -> metrics."""

    # bf16 autocast on CUDA and channels-last everywhere: faster than the fp32 NCHW step for
    # resnet20 and resnet18 at 224 on an H200, and for resnet20, resnet8 and mnist_cnn on a
    # CPU (measured: BENCHMARKS.md, GPU and Photo recipe sections).
    clip, bf16, channels_last = None, True, True
    weight_decay = {"sgd": 5e-4, "adamw": 1e-4}  # the ResNet recipe's; Keras' MNIST net's

    def __init__(self, spec, cfg: WorkerConfig):
        self.index = {c: i for i, c in enumerate(spec.classes)}
        self.scale, self.shift = scale_shift(ImagePreset.from_spec(spec))
        self.augment, self.smoothing = cfg.augment, cfg.label_smoothing

    def collate(self, batch: dict) -> dict:
        """numpy rows -> tensors (x stays uint8); class names -> indices (-1: a class
        training never saw)."""
        return {"x": torch.from_numpy(batch["x"].copy()),  # Ray's arrays are read-only
                "y": torch.tensor([self.index.get(c, -1) for c in batch["label"]])}

    def to_device(self, batch: dict, device, layout) -> dict:
        """Moves a batch and normalizes it there, as labeling does: x * scale + shift."""
        if self.scale.device != device:  # once: the worker's device is known only here
            self.scale, self.shift = self.scale.to(device), self.shift.to(device)
        x = batch["x"].to(device, non_blocking=True).float()  # (B, C, S, S)
        x = x * self.scale + self.shift
        if layout is torch.channels_last:
            x = x.contiguous(memory_format=layout)
        return {"x": x, "y": batch["y"].to(device, non_blocking=True)}

    def loaders(self, shards: dict, cfg: WorkerConfig, rank: int, workers: int):
        train = ImageBatches(shards["train"], self, cfg, rank, workers)
        val_bs = max(256, 2 * per_worker(cfg.schedule.batch, workers))
        val = ValBatches(lambda: shards["val"].iter_torch_batches(
            batch_size=val_bs, collate_fn=self.collate), cfg.feed.cache_val)
        return train, val

    def begin_epoch(self) -> None:
        pass

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        x = batch["x"]  # (B, C, S, S), in the worker's memory format
        fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
               else torch.contiguous_format)
        x = augment_batch(x, self.augment).contiguous(memory_format=fmt)  # its gathers: NCHW
        return F.cross_entropy(model(x), batch["y"], label_smoothing=self.smoothing), len(x)

    def val_sums(self, model, val, device, layout, autocast) -> torch.Tensor:
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for batch in val.batches():
            batch = self.to_device(batch, device, layout)
            with autocast:
                logits = model(batch["x"])  # (B, classes)
            y = batch["y"]
            loss = F.cross_entropy(logits.float(), y, reduction="sum", ignore_index=-1)
            correct = (logits.argmax(1) == y).sum()
            sums += torch.stack([loss.double(), correct.double(),
                                 torch.tensor(float(len(y)), device=device).double()])
        return sums  # [loss sum, correct, images]; read once, after the last batch

    def metrics(self, sums: list[float]) -> dict:
        loss, correct, n = sums
        return {"val_loss": loss / max(n, 1), "val_accuracy": correct / max(n, 1),
                "val_images": int(n)}


def detach(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


class RNNTask:
    """A char-RNN training worker's side: text streams -> loss (truncated BPTT, the state
    carried), the whole validation text -> nats and bits per character."""

    # char-rnn clips gradients at 5. No bf16 autocast: cuDNN's LSTM ran slower under it than
    # in fp32 (measured: BENCHMARKS.md, GPU section).
    clip, bf16, channels_last = 5.0, False, False
    weight_decay = {"sgd": 5e-4, "adamw": 0.0}  # char-rnn trains without

    VAL_CHUNK = 1000  # characters per forward pass in validation (the state carried)

    def __init__(self, spec, cfg: WorkerConfig):
        self.state = None  # carried from chunk to chunk (truncated BPTT)

    def to_device(self, batch: dict, device, layout) -> dict:
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def loaders(self, shards: dict, cfg: WorkerConfig, rank: int, workers: int):
        train = TextStreams(shards["train"], cfg.seq_len, rank, workers, cfg.seed)
        val = TextStreams(shards["val"], self.VAL_CHUNK, rank, workers, cfg.seed)
        return train, val

    def begin_epoch(self) -> None:
        self.state = None

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        ids = batch["ids"]  # (b, T + 1)
        if batch.get("first"):
            self.state = None
        logits, state = model(ids[:, :-1], self.state)  # (b, T, V)
        self.state = detach(state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               ids[:, 1:].reshape(-1))
        return loss, ids[:, 1:].numel()

    def val_sums(self, model, val, device, layout, autocast) -> torch.Tensor:
        """The whole validation text with the state carried, as char-rnn evaluates: each of
        this worker's streams from its first character to its last."""
        val.load()
        ids = val.ids.to(device)  # (b, L + 1)
        loss, _ = nll_sum(model, ids, self.VAL_CHUNK)
        return torch.stack([loss, loss.new_tensor(float(ids[:, 1:].numel()))])

    def metrics(self, sums: list[float]) -> dict:
        nats = sums[0] / max(sums[1], 1)
        return {"val_loss": nats, "bits_per_char": nats / LN2}
