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
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from . import names, sources, storage

if TYPE_CHECKING:
    import ray.data
from .transforms import ImageError, ImagePreset, decode_uint8


def _decode_unit(unit, preset: ImagePreset, val_fraction: float, held_out: bool) -> tuple:
    """One unit of the plan -> (what the driver needs to know, training block, validation
    block). Images decode to uint8; the training images' per-channel sums of pixels and of
    their squares (exact integers) give the data set's statistics. An image that cannot be
    used is left out and reported. A `held_out` unit (from --val) goes to validation whole;
    else a stable, random-looking share of the images (by a hash of their path) does, so no
    shuffle is needed to hold them out."""
    from ray.data.block import BlockAccessor

    c, s = preset.channels, preset.image_size
    rows: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}
    skipped = []
    for rec in sources.read_unit(unit, with_labels=True):
        error = rec.error or (None if rec.label else "no class folder")
        if error is None:
            try:
                x = decode_uint8(rec.data, preset)
            except ImageError as e:
                error = str(e)
        if error:
            skipped.append(f"{storage.shown(rec.source)}:{rec.path}: {error}")
            continue
        where = f"{rec.source}:{rec.path}".encode("utf-8", "surrogateescape")
        val = held_out or zlib.crc32(where) / 2**32 < val_fraction
        rows[val][0].append(x)
        rows[val][1].append(str(rec.label))
    blocks, labels = {}, set()
    for val, (xs, classes) in rows.items():
        # An empty block is a one-row block cut to none: it keeps the tensor column's type.
        x = np.stack(xs) if xs else np.zeros((1, c, s, s), np.uint8)  # (N, C, S, S)
        block = BlockAccessor.batch_to_block({"x": x, "label": np.array(classes or [""],
                                                                        dtype=object)})
        blocks[val] = block if xs else block.slice(0, 0)
        labels.update(classes)
    flat = (np.stack(rows[False][0]) if rows[False][0] else np.zeros((0, c, s, s), np.uint8)
            ).reshape(-1, c, s * s).astype(np.int64)  # (N, C, S*S)
    meta = {"skipped": skipped, "labels": labels, "n": len(flat),
            "sums": np.stack([flat.sum((0, 2)), (flat * flat).sum((0, 2))])}
    return meta, blocks[False], blocks[True]


def check_image_source(uri: str, chunk: int = 500, min_classes: int = 2
                       ) -> tuple[list[sources.Unit], int | None]:
    """Fails fast, before any decoding, where `uri` cannot be labeled image data (to train
    on, or for kiln eval): a lone file that is not an archive or Parquet, an archive that
    cannot be opened, images not laid out CLASS_NAME/file, fewer than `min_classes` classes,
    Parquet without `label`. Returns its plan
    (for image_dataset) and how many files it holds when that is known without reading."""
    layout = ("labeled image data is a directory or an archive (.tar, .tar.gz, .tgz, .zip) "
              "laid out CLASS_NAME/file.png, Parquet with image and label columns, or a kiln "
              "label output with reviews (kiln review)")
    from .review import is_label_output, reviewed_units

    if storage.is_dir(uri) and is_label_output(uri):
        units = reviewed_units(uri, chunk)
        classes = {label for u in units for _, label in u.items}
        if len(classes) < min_classes:
            raise ValueError(f"{uri}: a label output whose reviewed rows hold "
                             f"{len(classes)} class(es); review rows of at least "
                             f"{min_classes} classes first (kiln review --labels {uri})")
        return units, sum(len(u.items) for u in units)
    units = sources.plan([uri], chunk=chunk)
    if any(sources.input_kind(u.source) == "file" for u in units):
        raise ValueError(f"{uri}: not a directory, an archive or a Parquet file; {layout}")
    if units and all(u.kind == "broken" for u in units):
        raise ValueError(f"{uri}: cannot be opened: {units[0].items[0]}")
    for source in dict.fromkeys(u.source for u in units if u.kind == "parquet"):
        with storage.open_input(source) as f:
            if "label" not in pq.ParquetFile(f).schema_arrow.names:
                raise ValueError(f"{source}: labeled Parquet image data needs a `label` column; "
                                 + layout)
    if any(u.kind in ("parquet", "tarstream", "tarshard") for u in units):
        return units, None  # their classes are known as they are read
    classes, count = set(), 0
    for u in units:
        if u.kind == "folder":  # its files' names are listed by the task: their folder's is
            rel = u.items[0]
            classes.add(names.text(rel.split("/", 1)[0]) if rel != "." else None)
            count += u.items[3]
        elif u.kind == "s3page":  # its objects' first folders, seen when it was planned
            classes.update(f or None for f in u.items[4])
            count += u.items[3]
        elif u.kind != "broken":
            paths = sources.unit_paths(u) or []
            classes.update(map(names.folder, paths))
            count += len(paths)
    classes.discard(None)
    if not classes:
        raise ValueError(f"{uri}: no class folders found; {layout}")
    if len(classes) < min_classes:
        raise ValueError(f"{uri}: one class folder ({classes.pop()}); a classifier needs at "
                         "least two")
    return units, count


@dataclass
class ImageData:
    train: ray.data.Dataset  # rows {"x": (C, S, S) uint8, "label": str}
    val: ray.data.Dataset | None  # the held-out share (val_fraction > 0), or val_uri's images
    classes: list[str]
    skipped: list[str]  # "source:path: why" of every image left out
    mean: list[float]  # per channel, of the training images in 0..1
    std: list[float]


SHUFFLE_BYTES = 2 * 1024**3  # a training set up to this size is shuffled in full


def image_dataset(uri: str, preset: ImagePreset, val_fraction: float = 0.0,
                  chunk: int = 500, seed: int | None = None, shuffle_above: int = 0,
                  val_uri: str | None = None, units: list | None = None,
                  val_units: list | None = None) -> ImageData:
    """The decoded images of a source (and of a validation source), in one pass of Ray tasks,
    a unit each, whose blocks become the datasets as they are. With a seed, training rows
    above `shuffle_above` bytes in all are shuffled once (in full up to SHUFFLE_BYTES, else
    by block): a class-per-folder archive lists its classes one after another, and a worker
    that streams its shard mixes only nearby rows through its shuffle buffer. A set small
    enough for every worker to hold is left in order: the workers draw a fresh permutation of
    it every epoch. `units` / `val_units`: the sources' plans, where the caller has them."""
    import ray
    import ray.data

    units = sources.plan([uri], chunk=chunk) if units is None else units
    if not units:
        raise ValueError(f"{uri}: no images found")
    if val_units is None:
        val_units = sources.plan([val_uri], chunk=chunk) if val_uri else []
    if val_uri and not val_units:
        raise ValueError(f"{val_uri}: no images found")
    task = ray.remote(num_returns=3)(_decode_unit)
    refs = [task.remote(u, preset, 0.0 if val_uri else val_fraction, i >= len(units))
            for i, u in enumerate(units + val_units)]
    metas = ray.get([r[0] for r in refs])
    skipped = [e for m in metas for e in m["skipped"]]
    classes = sorted(set().union(*(m["labels"] for m in metas[: len(units)])))
    if not classes:
        raise ValueError(f"{uri}: no decodable, labelled images (layout: CLASS_NAME/file.png, "
                         "or Parquet with image and label columns)")
    n = sum(m["n"] for m in metas)
    pixels = max(1, n) * preset.image_size ** 2 * 255.0
    sums = np.sum([m["sums"] for m in metas], axis=0).astype(np.float64)  # (2, C)
    mean = sums[0] / pixels
    std = np.sqrt(np.maximum(sums[1] / (pixels * 255.0) - mean**2, 0.0))
    train = ray.data.from_arrow_refs([r[1] for r in refs[: len(units)]])
    val = ray.data.from_arrow_refs([r[2] for r in refs]) if (val_uri or val_fraction > 0) \
        else None
    if seed is not None and train.size_bytes() > shuffle_above:
        train = (train.random_shuffle(seed=seed) if train.size_bytes() <= SHUFFLE_BYTES
                 else train.randomize_block_order(seed=seed)).materialize()
    return ImageData(train, val, classes, skipped, [round(float(m), 6) for m in mean],
                     [round(max(float(v), 1e-3), 6) for v in std])


class HeldShard:
    """A prepared data set small enough for every worker to hold, handed to the training
    workers as its blocks' object refs rather than through Ray Train's dataset ingest. That
    ingest starts a coordinator actor per data set and a manager (new processes, seconds
    each on a small machine) to stream rows that every worker reads whole anyway; here each
    worker reads the blocks straight from the object store, all in the same order. With
    `split`, worker r of W keeps rows r, r + W, ... of each block (every row counted once).
    Offers the two reads the training loop makes of a Ray Data shard."""

    def __init__(self, refs: list, split: bool = False, rank: int = 0, workers: int = 1):
        self.refs, self.split, self.rank, self.workers = list(refs), split, rank, workers

    @classmethod
    def of(cls, dataset: ray.data.Dataset, split: bool = False) -> HeldShard:
        return cls(dataset.to_arrow_refs(), split)

    def for_worker(self, rank: int, workers: int) -> HeldShard:
        return HeldShard(self.refs, self.split, rank, workers)

    def iter_batches(self, batch_size=None, batch_format: str = "numpy"):
        """A dict of NumPy columns per block (the only form the loop asks for)."""
        import ray
        from ray.data.block import BlockAccessor

        assert batch_size is None and batch_format == "numpy"
        step = self.workers if self.split else 1
        for ref in self.refs:
            batch = BlockAccessor.for_block(ray.get(ref)).to_batch_format("numpy")
            yield {k: v[self.rank :: step] for k, v in batch.items()} if step > 1 else batch

    def iter_torch_batches(self, batch_size: int, collate_fn):
        """Batches of `batch_size` rows (the last one shorter), across block boundaries."""
        blocks = [b for b in self.iter_batches() if len(next(iter(b.values()), []))]
        if not blocks:
            return
        rows = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
        n = len(next(iter(rows.values())))
        for i in range(0, n, batch_size):
            yield collate_fn({k: v[i : i + batch_size] for k, v in rows.items()})


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
    import ray.data

    length = (len(ids) - 1) // streams
    if length < 1:
        raise ValueError(f"the text ({len(ids):,} characters) is too short for {streams} "
                         "streams: lower --batch-size")
    return ray.data.from_items([{"stream": i, "ids": ids[i * length : (i + 1) * length + 1]}
                                for i in range(streams)])
