"""A training worker's batches: its share of each global batch of images (held in memory
or streamed), validation batches, and its text streams; and the steps an epoch takes.
Batches are global: --batch-size B means B images (or B text streams) per optimizer step,
each of W workers taking B / W of them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # the config is built in jobs/train/tasks.py, which imports this module
    from kiln.train.tasks import WorkerConfig


def per_worker(batch: int, workers: int) -> int:
    return max(1, batch // workers)


def image_steps(rows: int, batch: int, workers: int, whole: bool) -> int:
    """Steps an epoch of images: every worker takes its share of each global batch of the
    whole set (`whole`), or full batches of its own equal split."""
    b = per_worker(batch, workers)
    return rows // (b * workers) if whole else (rows // workers) // b


def text_steps(length: int, seq_len: int) -> int:
    """Chunks an epoch of streams of `length` + 1 ids, whatever the epoch's offset."""
    return max(0, (length + 1 - seq_len) // seq_len)


class ImageBatches:
    """A worker's training batches. With `whole` the shard is the whole training set, read
    once into memory: each epoch draws one permutation shared by every worker (the same seed)
    and worker r takes its slice of each global batch, which is a plain single-process loop's
    sampling split W ways. Otherwise the shard is this worker's split, streamed every epoch
    through a local shuffle buffer (data sets too large to hold)."""

    def __init__(self, shard, task, cfg: WorkerConfig, rank: int, workers: int):
        self.shard, self.task, self.rank, self.workers = shard, task, rank, workers
        self.b, self.cfg, self.rows = per_worker(cfg.schedule.batch, workers), cfg, None

    def load(self) -> None:
        if self.cfg.feed.whole_train and self.rows is None:
            parts = list(self.shard.iter_torch_batches(batch_size=4096,
                                                       collate_fn=self.task.collate))
            self.rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    @property
    def steps_per_epoch(self) -> int:
        return image_steps(self.cfg.feed.train_rows, self.cfg.schedule.batch, self.workers,
                           self.cfg.feed.whole_train)

    def unaugmented(self, images: int):
        """Up to `images` (over every worker) of this worker's training images, in batches
        of its size as they are (not augmented), read one at a time: the same images on
        every call (precise_bn). None where the set is streamed rather than held."""
        if not self.cfg.feed.whole_train or self.rows is None:
            return None
        n = len(self.rows["y"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed))
        mine = order[self.rank::self.workers][:max(self.b, images // self.workers)]
        if len(mine) < self.b:
            return None
        return ({k: v[mine[i:i + self.b]] for k, v in self.rows.items()}
                for i in range(0, len(mine) - self.b + 1, self.b))

    def epoch(self, epoch: int):
        if not self.cfg.feed.whole_train:
            yield from self.shard.iter_torch_batches(
                batch_size=self.b, collate_fn=self.task.collate, drop_last=True,
                local_shuffle_buffer_size=max(2000, 4 * self.b),
                local_shuffle_seed=self.cfg.seed * 100_003 + epoch * 101 + self.rank)
            return
        self.load()
        n = len(self.rows["y"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            self.cfg.seed * 100_003 + epoch))
        step = self.b * self.workers
        for i in range(0, n - step + 1, step):
            idx = order[i + self.rank * self.b : i + (self.rank + 1) * self.b]
            yield {k: v[idx] for k, v in self.rows.items()}


class ValBatches:
    """Validation batches: read once and kept when they fit (`cache`), else streamed."""

    def __init__(self, source, cache: bool):
        self.source, self.cache, self.kept = source, cache, None

    def load(self) -> None:
        if self.cache and self.kept is None:
            self.kept = list(self.source())

    def batches(self):
        return self.kept if self.kept is not None else self.source()


class TextStreams:
    """A worker's text streams: the rows whose stream number falls to it (stream % W == r),
    read once into a (streams, L + 1) tensor. An epoch reads them left to right in chunks
    of T characters (inputs [o + jT, o + jT + T), targets one further), all streams side by
    side; the offset o in [0, T) changes each epoch so that chunk boundaries move, and every
    worker takes the same number of chunks, since every stream has the same length."""

    def __init__(self, shard, seq_len: int, rank: int, workers: int, seed: int):
        self.shard, self.t, self.rank, self.workers, self.seed = shard, seq_len, rank, \
            workers, seed
        self.ids: torch.Tensor | None = None

    def load(self) -> None:
        if self.ids is None:
            mine = []
            for b in self.shard.iter_batches(batch_size=None, batch_format="numpy"):
                keep = b["stream"] % self.workers == self.rank
                mine.append(torch.from_numpy(np.ascontiguousarray(b["ids"][keep])))
            self.ids = torch.cat(mine)  # (b, L + 1)

    @property
    def steps_per_epoch(self) -> int:
        return text_steps(self.ids.shape[1] - 1, self.t)

    def epoch(self, epoch: int):
        self.load()
        offset = int(torch.randint(0, self.t, (1,), generator=torch.Generator().manual_seed(
            self.seed * 100_003 + epoch)))
        for j in range(self.steps_per_epoch):
            a = offset + j * self.t
            yield {"ids": self.ids[:, a : a + self.t + 1], "first": j == 0}
