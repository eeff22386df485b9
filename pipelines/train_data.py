"""Training data on Ray Data. Images: the same Units and decode that labeling uses, so
training and inference see identical pixels; rows {"x": (C, S, S) uint8, "label": str},
normalized by the worker with the data set's own mean and std (measured here, in the same
pass). Text: UTF-8 files or Parquet `text`, encoded with the run's vocabulary and cut into
contiguous streams that a char-RNN reads left to right; rows {"stream": int,
"ids": (L + 1,) int64}."""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import ray.data
from ray.data.expressions import col

from . import sources, storage
from .transforms import ImageError, ImagePreset, decode_uint8


def _decode_units(batch: dict, units: list, preset: ImagePreset, val_fraction: float) -> dict:
    """Units (rows of the plan) -> their decoded, labelled images as uint8, with each image's
    per-channel sums of pixels and of their squares (exact integers) for the data set's
    statistics. An image that cannot be used stays as a row with `error` set (and a blank x) so
    the driver can report it. `val` marks a stable, random-looking share of the images (by a
    hash of their path) for validation, so no shuffle is needed to hold them out."""
    c, s = preset.channels, preset.image_size
    xs, labels, errors, val = [], [], [], []
    blank = np.zeros((c, s, s), np.uint8)
    for i in batch["unit"]:
        for rec in sources.read_unit(units[i], with_labels=True):
            x, error = None, rec.error or (None if rec.label else "no class folder")
            if error is None:
                try:
                    x = decode_uint8(rec.data, preset)
                except ImageError as e:
                    error = str(e)
            xs.append(x if x is not None else blank)
            labels.append(str(rec.label or ""))
            errors.append(f"{rec.source}:{rec.path}: {error}" if error else "")
            h = zlib.crc32(f"{rec.source}:{rec.path}".encode()) / 2**32
            val.append(h < val_fraction)
    x = np.stack(xs) if xs else np.zeros((0, c, s, s), np.uint8)
    flat = x.reshape(len(x), c, -1).astype(np.int64)  # (N, C, S*S)
    return {"x": x, "label": np.array(labels, dtype=object),
            "error": np.array(errors, dtype=object), "val": np.array(val, dtype=bool),
            "s1": flat.sum(-1), "s2": (flat * flat).sum(-1)}


@dataclass
class ImageData:
    train: ray.data.Dataset  # rows {"x": (C, S, S) uint8, "label": str}
    val: ray.data.Dataset | None  # the held-out share, when val_fraction > 0
    classes: list[str]
    skipped: list[str]  # "source:path: why" of every image left out
    mean: list[float]  # per channel, of the training images in 0..1
    std: list[float]


SHUFFLE_BYTES = 2 * 1024**3  # a training set up to this size is shuffled in full


def image_dataset(uri: str, preset: ImagePreset, val_fraction: float = 0.0,
                  chunk: int = 500, seed: int | None = None,
                  shuffle_above: int = 0) -> ImageData:
    """The decoded images of a source. With a seed, training rows above `shuffle_above` bytes
    in all are shuffled once (in full up to SHUFFLE_BYTES, else by block): a class-per-folder
    archive lists its classes one after another, and a worker that streams its shard mixes
    only nearby rows through its shuffle buffer. A set small enough for every worker to hold
    is left in order: the workers draw a fresh permutation of it every epoch."""
    units = sources.plan([uri], chunk=chunk)
    if not units:
        raise ValueError(f"{uri}: no images found")
    ds = ray.data.from_items([{"unit": i} for i in range(len(units))],
                             override_num_blocks=len(units))
    ds = ds.map_batches(_decode_units, batch_size=1, fn_kwargs={
        "units": units, "preset": preset, "val_fraction": val_fraction}).materialize()
    # One pass over the small columns gives the skipped images, the classes and the pixel
    # statistics (Dataset.unique is an all-to-all aggregation: seconds even for a few
    # thousand rows).
    skipped, labels = [], set()
    sums = np.zeros((2, preset.channels), np.float64)
    n = 0
    for b in ds.select_columns(["label", "error", "val", "s1", "s2"]).iter_batches(
            batch_size=None, batch_format="numpy"):
        good = b["error"] == ""
        skipped.extend(e for e in b["error"][~good])
        labels.update(b["label"][good].tolist())
        use = good & ~b["val"]
        sums += np.stack([b["s1"][use].sum(0), b["s2"][use].sum(0)])
        n += int(use.sum())
    ds = ds.drop_columns(["s1", "s2"])
    good = ds.filter(expr=col("error") == "").drop_columns(["error"]) if skipped else \
        ds.drop_columns(["error"])
    classes = sorted(labels)
    if not classes:
        raise ValueError(f"{uri}: no decodable, labelled images (layout: CLASS_NAME/file.png, "
                         "or Parquet with image and label columns)")
    pixels = max(1, n) * preset.image_size ** 2 * 255.0
    mean = sums[0] / pixels
    std = np.sqrt(np.maximum(sums[1] / (pixels * 255.0) - mean**2, 0.0))
    held_out = col("val") == True  # noqa: E712 (an expression, not a comparison)
    train = good.filter(expr=~held_out).drop_columns(["val"]).materialize()
    val = good.filter(expr=held_out).drop_columns(["val"]) if val_fraction > 0 else None
    if seed is not None and train.size_bytes() > shuffle_above:
        train = (train.random_shuffle(seed=seed) if train.size_bytes() <= SHUFFLE_BYTES
                 else train.randomize_block_order(seed=seed)).materialize()
    return ImageData(train, val.materialize() if val else None, classes, skipped,
                     [round(float(m), 6) for m in mean],
                     [round(max(float(v), 1e-3), 6) for v in std])


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


def text_streams(ids: np.ndarray, streams: int) -> ray.data.Dataset:
    """Encoded text cut into `streams` contiguous stretches of equal length L, each with one
    more id for the last target (char-rnn's layout: stream i is read left to right, chunk by
    chunk, its hidden state carried from chunk to chunk); rows {"stream": i,
    "ids": (L + 1,) int64}. The few ids past streams * L + 1 are left out."""
    length = (len(ids) - 1) // streams
    if length < 1:
        raise ValueError(f"the text ({len(ids):,} characters) is too short for {streams} "
                         "streams: lower --batch-size")
    return ray.data.from_items([{"stream": i, "ids": ids[i * length : (i + 1) * length + 1]}
                                for i in range(streams)])
