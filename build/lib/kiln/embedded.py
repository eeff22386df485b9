"""Embedded data sets that need no download: scikit-learn's bundled handwritten digits written
as real PNG files, and a text corpus from the Python standard library's own source."""

from __future__ import annotations

import functools
import io
import math
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


PHOTO_CLASSES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "retina", "motorcycle", "china", "flower")
PHOTO_TRAIN_WIDTH = 0.7  # train crops lie in the left 70% of a photo's width, test in the rest


@functools.lru_cache(maxsize=1)
def _photo_sources() -> list[Image.Image]:
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    arrays = [getattr(sd, name)() for name in PHOTO_CLASSES[:7]]
    arrays.append(sd.stereo_motorcycle()[0])  # the left view; the bundled PNG, no network
    arrays.extend(load_sample_images().images)  # china.jpg, flower.jpg
    return [Image.fromarray(np.ascontiguousarray(a[..., :3])).convert("RGB") for a in arrays]


def photos(per_class: int, size: int = 32, seed: int = 0,
           part: str = "train") -> tuple[list[bytes], list[str]]:
    """A 10-class colour photo set with no download, hard enough not to be solved in an epoch:
    each example is a small random crop of one of 10 photos bundled with scikit-image and
    scikit-learn (class = the photo), resized to size x size, maybe flipped, colour-jittered
    (brightness, contrast, saturation +-20%) and saved as JPEG (quality 75-95). Crops cover
    2-10% of the photo's area (aspect 3/4-4/3, at most 30% of its width wide); "train" crops
    lie entirely in the left 70% of the photo's width, "test" crops entirely in the right 30%,
    so test images show parts of the photo that no train image does. Classes are interleaved
    (example i is of class i % 10); the same (seed, part) gives the same bytes, and a smaller
    per_class gives a prefix of a larger one."""
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', not {part!r}")
    rng = np.random.default_rng([seed, 0 if part == "train" else 1])
    sources = _photo_sources()
    cap = 1.0 - PHOTO_TRAIN_WIDTH  # widest crop: fits in the narrower (test) strip
    gray = np.array([0.299, 0.587, 0.114], np.float32)
    images, labels = [], []
    for _ in range(per_class):
        for name, img in zip(PHOTO_CLASSES, sources, strict=True):
            W, H = img.size
            lo, hi = (0.0, PHOTO_TRAIN_WIDTH * W) if part == "train" else (PHOTO_TRAIN_WIDTH * W, W)
            while True:  # the same size distribution for both parts: area, aspect, width cap
                area = rng.uniform(0.02, 0.10) * W * H
                aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
                w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
                if w <= cap * W and h <= H:
                    break
            x0, y0 = rng.uniform(lo, hi - w), rng.uniform(0.0, H - h)
            a = np.asarray(img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h)),
                           np.float32)
            if rng.random() < 0.5:
                a = a[:, ::-1]
            b, c, s = rng.uniform(0.8, 1.2, 3)
            a = a * b
            m = (a @ gray).mean()
            a = (a - m) * c + m
            g = (a @ gray)[..., None]
            a = (a - g) * s + g
            buf = io.BytesIO()
            Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "RGB").save(
                buf, format="JPEG", quality=int(rng.integers(75, 96)))
            images.append(buf.getvalue())
            labels.append(name)
    return images, labels

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
