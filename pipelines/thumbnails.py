"""The label report's and kiln eval's thumbnails: the least confident images of each part,
kept while it is labeled (Thumbs), and those of rows an earlier run labeled, read again from
their sources (fetch_thumbnails)."""

from __future__ import annotations

import base64
import heapq
import io
from typing import TYPE_CHECKING

import numpy as np

from . import names
from .sources import read_named
from .transforms import open_image

if TYPE_CHECKING:
    from .label import Batch

THUMB_PX = 96


class Thumbs:
    """The n least confident labeled records of a part, for the report's contact sheet. Only
    they keep their image bytes; every other record drops them at once, so a part of large
    photos does not sit in memory."""

    def __init__(self, n: int):
        self.n, self.heap = n, []  # max-heap on confidence: (-confidence, seq, record, class)
        self.seq = 0

    def offer(self, batch: Batch) -> None:
        keep = set()
        for pos, idx, score in zip(batch.good, batch.idx[:, 0], batch.scores[:, 0],
                                   strict=True):
            if self.n == 0:
                break
            self.seq += 1
            item = (-float(score), self.seq, batch.records[pos], int(idx))
            if len(self.heap) < self.n:
                heapq.heappush(self.heap, item)
            elif item[0] > self.heap[0][0]:  # less confident than the most confident kept
                heapq.heapreplace(self.heap, item)[2].data = None
            else:
                continue
            keep.add(int(pos))
        for pos, rec in enumerate(batch.records):
            if pos not in keep:
                rec.data = None

    def render(self, classes: np.ndarray) -> list[dict]:
        kept = sorted(self.heap, key=lambda t: -t[0])
        return [{"source": names.text(r.source), "path": r.path, "label": classes[c],
                 "confidence": -s, "image": thumbnail(r.data)} for s, _, r, c in kept]


def thumbnail(data: bytes) -> str | None:
    """A small PNG of an image as a data: URI, or None when it cannot be shown."""
    try:
        img = open_image(data, max_pixels=50_000_000)
        img = img.convert("RGBA" if "A" in img.mode or img.mode == "P" else "RGB")
        img.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    except Exception:
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def fetch_thumbnails(keys: list[tuple[str, str]]) -> dict[tuple[str, str], str | None]:
    """Thumbnails of given (source, path) rows, read again from their sources: the report
    needs them for rows that an earlier run labeled. Units that hold none of the paths are
    not read; Parquet files and streamed tars are read through."""
    wanted: dict[str, set[str]] = {}
    for source, path in keys:
        wanted.setdefault(source, set()).add(path)
    found: dict[tuple[str, str], str | None] = {}
    for source, paths in wanted.items():
        for rec in read_named(source, paths):
            if rec.data is not None:
                found[(source, rec.path)] = thumbnail(rec.data)
    return found
