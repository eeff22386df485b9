"""Image decoding and transforms: one module for training (train=True adds augmentation) and
inference, configured from the model's config.json, so normalization cannot drift.

decode() turns encoded bytes into a normalized (C, S, S) float32 array or raises ImageError
with a short `kind` that labeling counts in its summary."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Pillow's own bomb guard is replaced by the per-preset max_pixels check below.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

ERROR_KINDS = ("empty", "not_image", "corrupt", "truncated", "too_large", "unsafe_path",
               "not_a_file", "unreadable")


class ImageError(ValueError):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class ImagePreset:
    image_size: int = 28
    channels: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    max_pixels: int = 50_000_000  # larger images are refused as decompression bombs

    @classmethod
    def from_spec(cls, spec) -> ImagePreset:
        return cls(spec.image_size, spec.channels, tuple(spec.mean), tuple(spec.std))


def open_image(data: bytes, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Opens and fully decodes an image, EXIF orientation applied; raises ImageError. A JPEG
    is decoded straight at a reduced scale when `draft_size` allows (much cheaper)."""
    if not data:
        raise ImageError("empty", "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels or w <= 0 or h <= 0:
                raise ImageError("too_large", f"{w}x{h} pixels exceeds the limit of {max_pixels}")
            if draft_size and img.format == "JPEG":
                img.draft(img.mode, (draft_size, draft_size))
            img.load()
            return ImageOps.exif_transpose(img) or img
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not_image", "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise ImageError(kind, str(e)[:200]) from None
    except Exception as e:  # decoders raise assorted errors on hostile input
        raise ImageError("corrupt", f"{type(e).__name__}: {str(e)[:200]}") from None


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode (palette, CMYK, 16-bit, float, alpha) -> 'L' or 'RGB'."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("L" if channels == 1 else "RGB")


def to_array(img: Image.Image, preset: ImagePreset, train: bool = False,
             rng: np.random.Generator | None = None) -> np.ndarray:
    """A decoded image -> normalized (C, S, S) float32. Training shifts it by up to 1/14 of
    its size (random crop of a padded copy), as the reference recipes do for small images."""
    s = preset.image_size
    img = to_mode(img, preset.channels)
    if img.size != (s, s):
        img = img.resize((s, s), Image.BILINEAR, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)  # (S, S) or (S, S, 3)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, S, S)
    if train:
        rng = rng or np.random.default_rng()
        pad = max(1, s // 14)
        padded = np.pad(arr, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
        dy, dx = rng.integers(0, 2 * pad + 1, size=2)
        arr = padded[:, dy : dy + s, dx : dx + s]
    mean = np.asarray(preset.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(preset.std, dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)


def decode(data: bytes, preset: ImagePreset, train: bool = False,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Encoded bytes -> normalized (C, S, S) float32; raises ImageError."""
    img = open_image(data, preset.max_pixels, draft_size=preset.image_size)
    try:
        return to_array(img, preset, train, rng)
    except ImageError:
        raise
    except Exception as e:
        raise ImageError("corrupt", f"cannot convert mode {img.mode}: {e}") from None
