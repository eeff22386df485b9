"""Training data on Ray Data. Images: the same Units and decode() that labeling uses, so
training and inference see identical pixels; rows {"x": (C, S, S) float32, "label": str}.
Text: UTF-8 files or Parquet `text`, encoded with the run's vocabulary and cut into
(seq_len + 1)-character windows; rows {"ids": (seq_len + 1,) int64}."""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import ray.data
from ray.data.expressions import col

from models import CharVocab

from . import sources, storage
from .transforms import ImageError, ImagePreset, decode


def _decode_units(batch: dict, units: list, preset: ImagePreset, val_fraction: float) -> dict:
    """Units (rows of the plan) -> their decoded, labelled images. An image that cannot be
    used stays as a row with `error` set (and a blank x) so the driver can report it. `val`
    marks a stable, random-looking share of the images (by a hash of their path) for
    validation, so no shuffle is needed to hold them out."""
    c, s = preset.channels, preset.image_size
    xs, labels, errors, val = [], [], [], []
    for i in batch["unit"]:
        for rec in sources.read_unit(units[i], with_labels=True):
            x, error = None, rec.error or (None if rec.label else "no class folder")
            if error is None:
                try:
                    x = decode(rec.data, preset)
                except ImageError as e:
                    error = str(e)
            xs.append(x if x is not None else np.zeros((c, s, s), np.float32))
            labels.append(str(rec.label or ""))
            errors.append(f"{rec.source}:{rec.path}: {error}" if error else "")
            h = zlib.crc32(f"{rec.source}:{rec.path}".encode()) / 2**32
            val.append(h < val_fraction)
    return {"x": np.stack(xs) if xs else np.zeros((0, c, s, s), np.float32),
            "label": np.array(labels, dtype=object), "error": np.array(errors, dtype=object),
            "val": np.array(val, dtype=bool)}


@dataclass
class ImageData:
    train: ray.data.Dataset  # rows {"x": (C, S, S) float32, "label": str}
    val: ray.data.Dataset | None  # the held-out share, when val_fraction > 0
    classes: list[str]
    skipped: list[str]  # "source:path: why" of every image left out


SHUFFLE_BYTES = 2 * 1024**3  # a decoded training set up to this size is shuffled in full


def image_dataset(uri: str, preset: ImagePreset, val_fraction: float = 0.0,
                  chunk: int = 500, seed: int | None = None) -> ImageData:
    """The decoded images of a source. With a seed, the training rows are shuffled once (in
    full up to SHUFFLE_BYTES, else by block): a class-per-folder archive lists its classes
    one after another, and the workers' local shuffle buffers only mix nearby rows, so
    without it a batch would hold one or two classes."""
    units = sources.plan([uri], chunk=chunk)
    if not units:
        raise ValueError(f"{uri}: no images found")
    ds = ray.data.from_items([{"unit": i} for i in range(len(units))],
                             override_num_blocks=len(units))
    ds = ds.map_batches(_decode_units, batch_size=1, fn_kwargs={
        "units": units, "preset": preset, "val_fraction": val_fraction}).materialize()
    # One pass over the small columns gives the skipped images and the classes (Dataset.unique
    # is an all-to-all aggregation: seconds even for a few thousand rows).
    skipped, labels = [], set()
    for batch in ds.select_columns(["label", "error"]).iter_batches(batch_size=None,
                                                                     batch_format="pyarrow"):
        errors = batch.column("error").to_pylist()
        skipped.extend(e for e in errors if e)
        labels.update(lab for lab, e in zip(batch.column("label").to_pylist(), errors,
                                            strict=True) if not e)
    good = ds.filter(expr=col("error") == "").drop_columns(["error"]) if skipped else \
        ds.drop_columns(["error"])
    classes = sorted(labels)
    if not classes:
        raise ValueError(f"{uri}: no decodable, labelled images (layout: CLASS_NAME/file.png, "
                         "or Parquet with image and label columns)")
    held_out = col("val") == True  # noqa: E712 (an expression, not a comparison)
    train = good.filter(expr=~held_out).drop_columns(["val"])
    val = good.filter(expr=held_out).drop_columns(["val"]) if val_fraction > 0 else None
    train = train.materialize()
    if seed is not None:
        train = (train.random_shuffle(seed=seed) if train.size_bytes() <= SHUFFLE_BYTES
                 else train.randomize_block_order(seed=seed)).materialize()
    return ImageData(train, val.materialize() if val else None, classes, skipped)


def read_text(uri: str) -> str:
    """Every text file under a URI (or a Parquet `text` column), as one string; a file that is
    not UTF-8 is a clear error naming it and the byte where it fails."""
    parts = []
    for u in storage.expand(uri):
        files = ([storage.to_uri(u, i.path) for i in storage.list_files(u)]
                 if storage.is_dir(u) else [u])
        for f in files:
            data = storage.read_bytes(f)
            if f.lower().endswith((".parquet", ".pq")):
                table = pq.read_table(io.BytesIO(data))
                if "text" not in table.column_names:
                    raise ValueError(f"{f}: Parquet text data needs a 'text' column")
                parts.extend(t for t in table.column("text").to_pylist() if t)
                continue
            try:
                parts.append(data.decode("utf-8"))
            except UnicodeDecodeError as e:
                line = data[: e.start].count(b"\n") + 1
                raise ValueError(f"{f}: not UTF-8 text (line {line}, byte {e.start})") from None
    text = "\n".join(parts)
    if len(text) < 2:
        raise ValueError(f"{uri}: no text found")
    return text


def text_windows(text: str, vocab: CharVocab, seq_len: int,
                 seed: int | None = None) -> ray.data.Dataset:
    """Non-overlapping windows of seq_len + 1 ids (input = [:-1], target = [1:]); with a
    seed, in a random order: in text order a worker's local shuffle buffer would fill each
    batch with windows of one stretch of one file (0.16 nats/char worse after 90 s of a
    2x256 LSTM on the stdlib corpus)."""
    ids = np.asarray(vocab.encode(text), dtype=np.int64)
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"the text ({len(ids)} characters) is shorter than --seq-len + 1")
    starts = np.arange(n) * seq_len
    if seed is not None:
        starts = np.random.default_rng(seed).permutation(starts)
    windows = np.stack([ids[s : s + seq_len + 1] for s in starts])  # (n, seq_len + 1)
    return ray.data.from_numpy(windows).rename_columns({"data": "ids"})
