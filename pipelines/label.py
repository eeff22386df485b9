"""Bulk labeling on Ray Data: one small item per source Unit goes through an actor pool; each
actor loads the model once, reads its unit's records itself (image bytes never travel through
the object store), decodes the next batch in background threads while the model runs on the
current one, writes the labels of each part straight to the output as Parquet, and hands back
only a small stats row per part for the driver's progress and summary.

A part's file name depends on its unit and its place in the unit, so a task that Ray retries
overwrites its own parts; a later run skips every unit whose last part is written, and every
(source, path) already written of the others (pipelines.sink.Written)."""

from __future__ import annotations

import hashlib
import queue
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from . import names, sink, storage
from .bulk import BulkActor, short_switch_interval
from .sources import Record, Unit, read_unit
from .thumbnails import Thumbs
from .transforms import (
    ImageError,
    ImagePreset,
    decode_jpegs_on,
    decode_uint8,
    device_jpeg,
    scale_shift,
)
from .units import unit_id

SCHEMA = pa.schema([
    ("source", pa.string()),
    ("path", pa.string()),
    ("label", pa.string()),
    ("confidence", pa.float32()),
    ("top_labels", pa.list_(pa.string())),
    ("top_scores", pa.list_(pa.float32())),
    ("error", pa.string()),
    ("model", pa.string()),
])
EVAL_SCHEMA = SCHEMA.append(pa.field("truth", pa.string()))  # kiln eval: the true class


@dataclass(frozen=True)
class LabelSettings:
    """What every actor needs; the driver fills it from the job's options."""

    model: str  # model URI (run folder or model/ folder)
    output: str  # output folder URI
    run_id: str  # this run's part-name suffix (sink.OutputDir.run_id)
    top_k: int = 5
    batch_size: int = 128
    gpu: bool = False
    threads: int = 1  # torch intra-op threads per actor (CPU)
    decode_threads: int = 1  # background decode threads per actor
    part_rows: int = 1000  # rows per Parquet part at most
    thumbs: int = 0  # least-confident thumbnails returned per part, for the report
    truth: bool = False  # kiln eval: each row's true class (its folder, or Parquet `label`)
    tta: bool = False  # each image's scores averaged with its mirror image's (flip_tta)


TTA = ("auto", "flip", "none")


def flip_tta(tta: str, config: dict) -> bool:
    """Whether labeling averages each image's scores with its mirror image's: `flip`, or
    `auto` where the model trained on mirrored images (a photo and its mirror are the same
    class; a digit and its mirror are not)."""
    if tta not in TTA:
        raise ValueError(f"unknown --tta {tta!r}; choose one of {', '.join(TTA)}")
    if tta == "auto":
        return (config.get("train") or {}).get("augment") == "flip"
    return tta == "flip"


def error_kind(error: str) -> str:
    return error.split(":", 1)[0]


def part_name(unit: Unit, index: int) -> str:
    key = unit.key.encode("utf-8", "surrogateescape")
    return f"{hashlib.sha1(key).hexdigest()[:16]}-{index:05d}"


class LabelPredictor(BulkActor):
    """The actor (of a Ray Data pool, or in the command's own threads: pipelines.bulk): loads
    the model once, then labels a whole unit per task."""

    def __init__(self, settings: LabelSettings, loaded=None):
        """`loaded`: the model's LoadedModel when the caller has it already (in-process)."""
        import torch

        from kiln.models.runtime import keep_freed_memory

        self.torch, self.s = torch, settings
        torch.set_num_threads(max(1, settings.threads))
        keep_freed_memory()
        loaded = loaded or storage.load_model(settings.model, expect_kind="cnn")
        self.device = torch.device("cuda" if settings.gpu else "cpu")
        # On a GPU, JPEG batches decode there (nvJPEG); on a CPU, file by file in threads.
        self.decode_device = self.device if settings.gpu else None
        # Channels-last runs this family's convolutions and pooling faster on CPU (oneDNN
        # picks blocked NHWC kernels; NCHW max-pooling alone took much of the time).
        self.model = loaded.model.to(self.device, memory_format=torch.channels_last).eval()
        self.model_id, self.preset = loaded.id, ImagePreset.from_spec(loaded.spec)
        self.classes = np.asarray(loaded.spec.classes, dtype=object)
        self.k = min(settings.top_k, len(self.classes))
        # (x / 255 - mean) / std as one multiply-add on the whole uint8 batch, as in training.
        self.scale, self.shift = scale_shift(self.preset, self.device)
        self.parts = sink.Parts(settings.output, settings.run_id)
        self.pool = ThreadPoolExecutor(max(1, settings.decode_threads), "kiln-decode")

    def run_task(self, task: tuple[Unit, frozenset[str]]) -> Iterator[dict]:
        with short_switch_interval():  # the decode threads and the model's share the GIL
            yield from self.label_unit(*task)

    def label_unit(self, unit: Unit, skip: frozenset[str]) -> Iterator[dict]:
        """Labels one unit; yields the stats of each part once it is written."""
        part: list[Batch] = []
        rows = index = 0
        thumbs = Thumbs(self.s.thumbs)
        uid = unit_id(unit)
        records = read_unit(unit, skip, with_labels=self.s.truth)
        for batch in self._predicted(self._decoded(records)):
            if rows >= self.s.part_rows:  # a full part, and a batch after it: not the last
                yield self._write_part(part_name(unit, index), part, thumbs, uid, last=False)
                part, rows, index, thumbs = [], 0, index + 1, Thumbs(self.s.thumbs)
            part.append(batch)
            rows += len(batch.records)
            thumbs.offer(batch)  # and drops the image bytes of every other record
        if part:  # the unit's last part: once it is written, every row of the unit is
            yield self._write_part(part_name(unit, index), part, thumbs, uid, last=True)

    def _decoded(self, records: Iterator[Record]) -> Iterator[tuple[list, np.ndarray, list]]:
        """(records, uint8 (G, C, S, S) of the G good ones, their positions) a batch at a
        time, read and decoded ahead of the model by background threads."""
        return prefetch(_batches(records, self.s.batch_size), self.pool,
                        lambda recs: decode_batch(recs, self.preset, self.decode_device),
                        depth=self.s.decode_threads + 1)

    def _predicted(self, decoded) -> Iterator[Batch]:
        for records, images, good in decoded:
            if good:
                idx, scores = self.predict(images)
            else:
                idx = np.zeros((0, self.k), np.int64)
                scores = np.zeros((0, self.k), np.float32)
            yield Batch(records, np.asarray(good, np.int64), idx, scores)

    def predict(self, images) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, C, S, S), NumPy or a tensor on the device -> top-k class indices (B, k)
        and probabilities (B, k)."""
        torch = self.torch
        with torch.inference_mode():
            x = images if torch.is_tensor(images) else torch.from_numpy(images)
            x = x.to(self.device, non_blocking=True).float()
            x = (x * self.scale + self.shift).contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.s.gpu):
                logits = self.model(x)  # (B, classes)
                if self.s.tta:  # the mirror image's too: (B, classes)
                    mirrored = self.model(x.flip(3))
            probs = torch.softmax(logits.float(), dim=1)
            if self.s.tta:  # the mean of the two probabilities: still one row an image
                probs = (probs + torch.softmax(mirrored.float(), dim=1)) / 2
            scores, idx = probs.topk(self.k, dim=1)  # (B, k) each
        return idx.cpu().numpy(), scores.cpu().numpy()

    def _write_part(self, name: str, part: list[Batch], thumbs: Thumbs, unit: str,
                    last: bool) -> dict:
        table = label_table(part, self.classes, self.model_id, self.s.truth)
        errors = Counter(error_kind(r.error) for b in part for r in b.records if r.error)
        top1 = np.concatenate([b.idx[:, 0] for b in part])
        counts = np.bincount(top1, minlength=len(self.classes))
        stats = {"part": name, "rows": table.num_rows, "errors": dict(errors),
                 "labels": {self.classes[i]: int(c) for i, c in enumerate(counts) if c}}
        self.parts.write(name, table, {"unit": unit, "last": last, "stats": stats})
        if self.s.thumbs:
            stats["thumbs"] = thumbs.render(self.classes)
        return stats


@dataclass
class Batch:
    """A batch of records and the predictions for those of them that decoded."""

    records: list[Record]
    good: np.ndarray  # (G,) positions in records of the labeled ones
    idx: np.ndarray  # (G, k) class indices, best first
    scores: np.ndarray  # (G, k) their probabilities


# The encoded bytes a batch holds at most (one member alone may hold more, up to
# archives.MAX_MEMBER_BYTES): an archive of large or inflating members (a zip of zeros) is
# cut into small batches, not read a whole --batch-size at a time. An actor (a thread, here)
# holds at most decode_threads + 3 batches: queued, decoding, and the model's.
BATCH_BYTES = 64 * 1024 * 1024


def _batches(records: Iterable[Record], size: int, max_bytes: int = BATCH_BYTES
             ) -> Iterator[list[Record]]:
    batch: list[Record] = []
    held = 0
    for rec in records:
        n = len(rec.data or b"")
        if batch and held + n > max_bytes:
            yield batch
            batch, held = [], 0
        batch.append(rec)
        held += n
        if len(batch) >= size:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def decode_batch(records: list[Record], preset: ImagePreset, device=None
                 ) -> tuple[list, np.ndarray, list]:
    """Decodes a batch; a record that fails gets its error set and stays in place. With a
    `device` (a GPU actor's), the JPEGs that device_jpeg() admits are decoded there in one
    batched call, the rest on the CPU, and the images come back as one uint8 tensor on the
    device, in the records' order."""
    on_device = [i for i, rec in enumerate(records) if not rec.error and
                 device_jpeg(rec.data, preset)] if device is not None else []
    done = decode_jpegs_on(device, [records[i].data for i in on_device], preset) \
        if on_device else None
    if done is None:  # none, or the batched call failed: each file on the CPU (Pillow's errors)
        on_device = []
    images, good, from_device = [], [], set(on_device)
    for i, rec in enumerate(records):
        if i in from_device:
            good.append(i)
            continue
        if rec.error:
            continue
        try:
            images.append((i, decode_uint8(rec.data, preset, fast=True)))
            good.append(i)
        except ImageError as e:
            rec.error = str(e)
    shape = (0, preset.channels, preset.image_size, preset.image_size)
    cpu = np.stack([a for _, a in images]) if images else np.zeros(shape, np.uint8)
    if device is None:
        return records, cpu, good
    import torch

    batch = torch.empty((len(good), *shape[1:]), dtype=torch.uint8, device=device)
    place = {i: p for p, i in enumerate(good)}
    if on_device:
        batch[torch.tensor([place[i] for i in on_device], device=device)] = done
    if images:
        batch[torch.tensor([place[i] for i, _ in images], device=device)] = \
            torch.from_numpy(cpu).to(device)
    return records, batch, good


def prefetch(items: Iterator, pool: ThreadPoolExecutor, fn, depth: int) -> Iterator:
    """fn(item) for every item, in order, computed up to `depth` ahead in `pool`; the items
    themselves are pulled (read) by a feeder thread so reading overlaps too. A consumer that
    stops early (an error downstream) stops the feeder at its next item."""
    futures: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                futures.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def feed() -> None:
        try:
            for item in items:
                if not put(pool.submit(fn, item)):
                    return
        except BaseException as e:  # reading failed: the consumer raises it
            failed: Future = Future()
            failed.set_exception(e)
            put(failed)
            return
        put(end)

    feeder = threading.Thread(target=feed, name="kiln-read", daemon=True)
    feeder.start()
    try:
        while (fut := futures.get()) is not end:
            yield fut.result()
    finally:
        stop.set()
        feeder.join(timeout=5)


def label_table(part: list[Batch], classes: np.ndarray, model_id: str, truth: bool = False
                ) -> pa.Table:
    """The DESIGN.md output table of a part: built column-wise from the prediction arrays,
    with nulls for the rows whose error is set; with `truth`, each record's true class too."""
    records = [r for b in part for r in b.records]
    n = len(records)
    offsets = np.cumsum([0] + [len(b.records) for b in part[:-1]])
    good = np.concatenate([b.good + o for b, o in zip(part, offsets, strict=True)])
    idx = np.concatenate([b.idx for b in part])  # (G, k)
    scores = np.concatenate([b.scores for b in part]).astype(np.float32)  # (G, k)
    k = idx.shape[1]
    labeled = np.zeros(n, bool)
    labeled[good] = True
    top1 = np.zeros(n, np.int64)
    top1[good] = idx[:, 0]
    conf = np.zeros(n, np.float32)
    conf[good] = scores[:, 0]
    class_names = pa.array(classes.tolist(), pa.string())
    missing = pa.array(~labeled)
    list_offsets = pa.array(np.concatenate([[0], np.cumsum(np.where(labeled, k, 0))]),
                            pa.int32())
    return pa.Table.from_arrays([
        pa.array([names.text(r.source) for r in records], pa.string()),
        pa.array([r.path for r in records], pa.string()),
        class_names.take(pa.array(top1, mask=~labeled)),
        pa.array(conf, pa.float32(), mask=~labeled),
        pa.ListArray.from_arrays(list_offsets, class_names.take(pa.array(idx.ravel())),
                                 mask=missing),
        pa.ListArray.from_arrays(list_offsets, pa.array(scores.ravel(), pa.float32()),
                                 mask=missing),
        pa.array([r.error and clean_text(r.error) for r in records], pa.string()),
        pa.array([model_id] * n, pa.string()),
    ] + ([pa.array([truth_of(r) for r in records], pa.string())] if truth else []),
        schema=EVAL_SCHEMA if truth else SCHEMA)


def clean_text(s: str) -> str:
    """Text for a string column: a name's odd bytes that reached a message as \\udcNN."""
    return s if names.is_text(s) else s.encode("utf-8", "backslashreplace").decode("utf-8")


def truth_of(rec: Record) -> str | None:
    """A record's true class as training reads it (a Parquet label of any type, as text);
    none where it has none."""
    return None if rec.label is None or str(rec.label) == "" else str(rec.label)


