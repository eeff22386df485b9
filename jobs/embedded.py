"""Embedded data sets that need no download: scikit-learn's bundled handwritten digits written
as real PNG files, and a text corpus from the Python standard library's own source."""

from __future__ import annotations

import io
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def digits(size: int = 28) -> tuple[list[bytes], list[str]]:
    """The 1,797 8x8 digits as PNG bytes (white ink on black, upscaled to size x size) and
    their class names "0".."9"."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pngs = []
    for img in d.images:  # (8, 8) in 0..16
        pil = Image.fromarray((img * (255.0 / 16.0)).astype(np.uint8), "L")
        pil = pil.resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs, [str(t) for t in d.target]


def split(n: int, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * (1 - test_fraction)))
    return np.sort(order[:cut]), np.sort(order[cut:])


def write_class_tar(path: str | Path, images: list[bytes], labels: list[str]) -> Path:
    """A class-per-folder archive: CLASS/NNNNN.png (.tar, .tar.gz/.tgz or .zip by suffix)."""
    return write_flat_archive(path, images, [f"{lab}/{i:05d}.png" for i, lab in
                                             zip(range(len(images)), labels, strict=True)])


def write_flat_archive(path: str | Path, images: list[bytes], names: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for name, data in zip(names, images, strict=True):
                zf.writestr(name, data)
        return path
    mode = "w:gz" if path.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tar:
        for name, data in zip(names, images, strict=True):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_image_parquet(path: str | Path, images: list[bytes], labels: list[str] | None = None,
                        ids: list[str] | None = None) -> Path:
    cols = {"image": pa.array(images, pa.binary())}
    if labels is not None:
        cols["label"] = pa.array(labels, pa.string())
    if ids is not None:
        cols["path"] = pa.array(ids, pa.string())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=500)
    return path


def stdlib_corpus(max_bytes: int = 1_000_000) -> str:
    """About max_bytes of the standard library's own Python source, files in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for f in sorted(root.glob("*.py")):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return "".join(parts)[:max_bytes]
