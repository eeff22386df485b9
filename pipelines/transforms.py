"""Image decoding and transforms: one module for training (train=True adds augmentation) and
inference, configured from the model's config.json, so normalization cannot drift.

decode() turns encoded bytes into a normalized (C, S, S) float32 array or raises ImageError
with a short `kind` that labeling counts in its summary."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

# Pillow's own bomb guard is replaced by the per-preset max_pixels check below.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

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
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not_image", "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise ImageError(kind, str(e)[:200]) from None
    except Exception as e:  # decoders raise assorted errors on hostile input
        raise ImageError("corrupt", f"{type(e).__name__}: {str(e)[:200]}") from None
    return _upright(img)


def _upright(img: Image.Image) -> Image.Image:
    """Applies the EXIF orientation. Only images that carry EXIF pay for parsing it (most
    do not), and a broken EXIF block leaves the pixels as they are rather than failing."""
    if "exif" not in img.info and img.format not in ("TIFF", "MPO"):
        return img
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:
        return img


def _white_level(mode: str, brightest: float) -> float:
    """The value that means white in a high-depth image: its format's range where it has
    one, else the smallest usual range that holds its brightest pixel (floats often 0..1)."""
    if mode.startswith("I;16"):
        return 65535.0
    for top in ((1.0,) if mode == "F" else ()) + (255.0, 65535.0):
        if brightest <= top:
            return top
    return brightest


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode (palette, CMYK, 16-bit, float, alpha) -> 'L' or 'RGB'."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = _white_level(img.mode, float(arr.max(initial=0)))
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "LAB":  # Pillow has no direct LAB -> RGB conversion; a CMS transform does
        img = ImageCms.applyTransform(img, _lab_to_srgb())
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


@lru_cache(maxsize=1)
def _lab_to_srgb():
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                   "LAB", "RGB")


def to_uint8(img: Image.Image, preset: ImagePreset, train: bool = False,
             rng: np.random.Generator | None = None) -> np.ndarray:
    """A decoded image -> (C, S, S) uint8 at the preset's size and channels. Training shifts
    it by up to 1/14 of its size (random crop of an edge-padded copy), as the reference
    recipes do for small images."""
    s = preset.image_size
    img = to_mode(img, preset.channels)
    if img.size != (s, s):
        img = img.resize((s, s), Image.BILINEAR, reducing_gap=3.0)
    # frombuffer on tobytes() skips numpy's slower __array_interface__ path.
    arr = np.frombuffer(img.tobytes(), dtype=np.uint8)
    arr = arr.reshape(1, s, s) if preset.channels == 1 else arr.reshape(s, s, 3).transpose(2, 0, 1)
    if train:
        rng = rng or np.random.default_rng()
        pad = max(1, s // 14)
        padded = np.pad(arr, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
        dy, dx = rng.integers(0, 2 * pad + 1, size=2)
        arr = padded[:, dy : dy + s, dx : dx + s]
    return arr


@lru_cache(maxsize=16)
def _mean_std(preset: ImagePreset) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(preset.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(preset.std, dtype=np.float32).reshape(-1, 1, 1)
    return mean, std


def normalize(arr: np.ndarray, preset: ImagePreset) -> np.ndarray:
    """uint8 (..., C, S, S) -> normalized float32 of the same shape; batches welcome."""
    mean, std = _mean_std(preset)
    x = arr.astype(np.float32) * np.float32(1.0 / 255.0)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def decode_uint8(data: bytes, preset: ImagePreset, train: bool = False,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Encoded bytes -> (C, S, S) uint8, not yet normalized (labeling normalizes whole
    batches at once); raises ImageError."""
    img = open_image(data, preset.max_pixels, draft_size=preset.image_size)
    try:
        return to_uint8(img, preset, train, rng)
    except ImageError:
        raise
    except Exception as e:
        raise ImageError("corrupt", f"cannot convert mode {img.mode}: {e}") from None


def decode(data: bytes, preset: ImagePreset, train: bool = False,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """Encoded bytes -> normalized (C, S, S) float32; raises ImageError."""
    return normalize(decode_uint8(data, preset, train, rng), preset)


def scale_shift(preset: ImagePreset, device=None):
    """(x / 255 - mean) / std as one multiply-add, x * scale + shift, for uint8 tensor batches:
    the same two (1, C, 1, 1) tensors serve training and labeling."""
    import torch

    std = torch.tensor(preset.std, dtype=torch.float32).view(1, -1, 1, 1)
    mean = torch.tensor(preset.mean, dtype=torch.float32).view(1, -1, 1, 1)
    return (1.0 / (255.0 * std)).to(device), (-mean / std).to(device)


AUGMENTS = ("auto", "flip", "shift", "none")


def choose_augment(augment: str, channels: int) -> str:
    """`auto`: pad-and-crop plus horizontal flips for colour photos (the standard CIFAR
    recipe), shifts alone for grayscale data (a flipped digit or letter is another glyph)."""
    if augment not in AUGMENTS:
        raise ValueError(f"unknown --augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
    if augment == "auto":
        return "flip" if channels == 3 else "shift"
    return augment


def augment_batch(x, mode: str = "shift"):
    """Training augmentation on a normalized (B, C, S, S) tensor batch.
    shift: each image moved by up to 1/14 of its size (a random crop of an edge-padded copy);
    flip: a random crop of a copy padded by 1/8 of its size with zeros (the mean colour: 4
    pixels at 32, as in the ResNet paper), then a horizontal flip of every other image;
    none: as it is."""
    import torch
    import torch.nn.functional as F

    if mode == "none":
        return x
    b, c, s, _ = x.shape
    if mode == "flip":
        pad = max(1, s // 8)
        padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, S+2p, S+2p), zeros
    else:
        pad = max(1, s // 14)
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (2, b), device=x.device)
    span = torch.arange(s, device=x.device)
    rows = (offsets[0][:, None] + span)[:, None, :, None].expand(-1, c, -1, s + 2 * pad)
    out = padded.gather(2, rows)  # (B, C, S, S+2p)
    cols = (offsets[1][:, None] + span)[:, None, None, :].expand(-1, c, s, -1)
    if mode == "flip":  # reading the columns backwards flips the image
        flip = torch.rand(b, device=x.device) < 0.5
        cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    return out.gather(3, cols)  # (B, C, S, S)
