"""Image decoding and transforms: one module for training and inference, configured from the
model's config.json, so normalization cannot drift. Training augments whole tensor batches
after decoding (augment_batch).

decode() turns encoded bytes into a normalized (C, S, S) float32 array or raises ImageError
with a short `kind` that labeling counts in its summary.

Two decoders give the same pixels (within one level): TorchCodec's, which runs without the
GIL and so scales with threads, takes plain 8-bit grey or RGB PNGs and baseline or
progressive grey or YCbCr JPEGs that need no EXIF rotation and no more than a 3x resize
(`fast_decode`); Pillow takes everything else (palettes, alpha, 16-bit, CMYK, TIFF, WebP, GIF,
rotated photos, JPEGs at least twice the model's size, which it decodes straight at a reduced
scale) and every broken file, so the error rows stay Pillow's."""

from __future__ import annotations

import io
import struct
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError


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
    except Image.DecompressionBombError as e:  # Pillow's own guard, above max_pixels here
        raise ImageError("too_large", str(e)[:200]) from None
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
        img = Image.fromarray(_to_8bit(img), "L")
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


def _to_8bit(img: Image.Image, rows: int = 256) -> np.ndarray:
    """A 16-bit, 32-bit or float grey image -> (H, W) uint8, scaled from its white level.
    In float64 a block of rows at a time: a 7000x7000 16-bit PNG takes its own 98 MB once more
    and 14 MB of float rows, not 1.2 GB of whole-image float copies."""
    arr = np.asarray(img)  # (H, W), the mode's own dtype
    top = _white_level(img.mode, float(arr.max(initial=0)))
    out = np.empty(arr.shape, np.uint8)
    for r in range(0, arr.shape[0], rows):
        block = arr[r : r + rows].astype(np.float64) * (255.0 / top)
        out[r : r + rows] = np.clip(block, 0, 255, out=block)
    return out


@lru_cache(maxsize=1)
def _lab_to_srgb():
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                   "LAB", "RGB")


def to_uint8(img: Image.Image, preset: ImagePreset) -> np.ndarray:
    """A decoded image -> (C, S, S) uint8 at the preset's size and channels."""
    s = preset.image_size
    img = to_mode(img, preset.channels)
    if img.size != (s, s):
        img = img.resize((s, s), Image.BILINEAR, reducing_gap=3.0)
    # frombuffer on tobytes() skips numpy's slower __array_interface__ path.
    arr = np.frombuffer(img.tobytes(), dtype=np.uint8)
    return arr.reshape(1, s, s) if preset.channels == 1 else arr.reshape(s, s, 3).transpose(2, 0, 1)


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


def decode_uint8(data: bytes, preset: ImagePreset, fast: bool = False) -> np.ndarray:
    """Encoded bytes -> (C, S, S) uint8, not yet normalized (labeling normalizes whole
    batches at once); raises ImageError. `fast` tries TorchCodec first (it imports torch:
    labeling has it loaded already, the training set's decoding tasks do not)."""
    if fast:
        arr = fast_decode(data, preset)
        if arr is not None:
            return arr
    img = open_image(data, preset.max_pixels, draft_size=preset.image_size)
    try:
        return to_uint8(img, preset)
    except ImageError:
        raise
    except Exception as e:
        raise ImageError("corrupt", f"cannot convert mode {img.mode}: {e}") from None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RESIZE_LIMIT = 3  # Pillow's resize (reducing_gap=3) box-reduces first beyond 6x; stay under 3x


def image_header(data: bytes) -> tuple[str, int, int, int] | None:
    """(format, width, height, channels) of a PNG or JPEG that fast_decode can take, read from
    its header alone; None for any other file (Pillow decodes those)."""
    if data.startswith(PNG_SIGNATURE):
        if len(data) < 33 or data[12:16] != b"IHDR":
            return None
        width, height = struct.unpack(">II", data[16:24])
        depth, colour = data[24], data[25]
        if depth != 8 or colour not in (0, 2):  # 8-bit grey or RGB, no palette, no alpha
            return None
        return "png", width, height, 1 if colour == 0 else 3
    if data.startswith(b"\xff\xd8"):
        return _jpeg_header(data)
    return None


def _jpeg_header(data: bytes) -> tuple[str, int, int, int] | None:
    """Walks a JPEG's marker segments up to its frame header."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            if _exif_orientation(segment[6:]) not in (None, 1):
                return None  # Pillow turns it upright
        elif marker in (0xC0, 0xC1, 0xC2):  # baseline, extended, progressive Huffman
            if len(segment) < 6:
                return None
            height, width = struct.unpack(">HH", segment[1:5])
            channels = segment[5]
            return ("jpeg", width, height, channels) if channels in (1, 3) else None
        elif 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return None  # lossless or arithmetic coding: Pillow's
        elif marker == 0xDA:  # scan data before a frame header
            return None
        pos += 2 + length
    return None


def _exif_orientation(tiff: bytes) -> int | None:
    """The Orientation tag of an EXIF block's first directory; None if it has none or cannot
    be read (Pillow then leaves the image as it is, and so does fast_decode)."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
        for i in range(count):
            entry = tiff[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, kind = struct.unpack(order + "HH", entry[:4])
            if tag == 0x0112 and kind == 3:
                return struct.unpack(order + "H", entry[8:10])[0]
    except (KeyError, struct.error):
        return None
    return None


@lru_cache(maxsize=1)
def _torchcodec():
    """TorchCodec's PNG and JPEG decoders, or None where it cannot load."""
    try:
        from torchcodec.decoders import decode_jpeg, decode_png
    except Exception:  # not installed, or no build for this platform
        return None
    return {"png": decode_png, "jpeg": decode_jpeg}


def _pillow_grey(img):
    """(3, H, W) uint8 tensor -> (1, H, W) by Pillow's L = R 299/1000 + G 587/1000 + B 114/1000
    (its fixed-point form), on whatever device the tensor is."""
    import torch

    rgb = img.to(torch.int32)
    return ((rgb[0] * 19595 + rgb[1] * 38470 + rgb[2] * 7471 + 0x8000) >> 16)[None].to(
        torch.uint8)


def fast_decode(data: bytes, preset: ImagePreset) -> np.ndarray | None:
    """(C, S, S) uint8 through TorchCodec, whose decoders release the GIL, for the files that
    image_header() admits; None for any other file or where TorchCodec fails, and Pillow then
    decodes it (or names its error). The same pixels as Pillow's path within one level: the
    same libjpeg and libpng, Pillow's grey formula, and torch's antialiased bilinear resize,
    which follows Pillow's."""
    header = image_header(data)
    decoders = _torchcodec() if header else None
    if decoders is None:
        return None
    fmt, width, height, _ = header
    s = preset.image_size
    if width * height > preset.max_pixels or width < 1 or height < 1:
        return None
    if max(width, height) >= RESIZE_LIMIT * s:
        return None  # Pillow box-reduces large images first
    if fmt == "jpeg" and min(width, height) >= 2 * s:
        return None  # Pillow decodes these straight at 1/2 to 1/8 scale (JPEG draft mode)
    import torch
    import torch.nn.functional as F

    try:  # a bytearray: torch.frombuffer warns on read-only bytes
        img = decoders[fmt](torch.frombuffer(bytearray(data), dtype=torch.uint8),
                            mode="UNCHANGED")  # (C, H, W)
    except Exception:
        return None
    if img.dim() != 3 or img.shape[0] not in (1, 3) or img.shape[1:] != (height, width):
        return None
    if preset.channels == 1 and img.shape[0] == 3:
        img = _pillow_grey(img)
    elif preset.channels == 3 and img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    if (height, width) != (s, s):  # channels-last: torch's uint8 AVX2 kernel, much faster
        img = img[None].contiguous(memory_format=torch.channels_last)
        img = F.interpolate(img, size=(s, s), mode="bilinear", antialias=True,
                            align_corners=False)[0]
    return np.ascontiguousarray(img.numpy())


# JPEGs decoded on a CUDA device (nvJPEG, a batch per call) up to this size each, and this
# many pixels a call: a batch of 128 camera photos would otherwise take gigabytes of GPU
# memory at once.
DEVICE_MAX_PIXELS = 4096 * 4096
DEVICE_CALL_PIXELS = 256 * 1024 * 1024
_device_lock = threading.Lock()


def device_jpeg(data: bytes, preset: ImagePreset) -> bool:
    """Whether decode_jpegs_on() takes a file: a JPEG that image_header() admits (baseline or
    progressive, grey or YCbCr, no EXIF rotation), of any size up to DEVICE_MAX_PIXELS."""
    header = image_header(data)
    return bool(header) and header[0] == "jpeg" and 1 <= header[1] * header[2] <= min(
        preset.max_pixels, DEVICE_MAX_PIXELS)


def decode_jpegs_on(device, blobs: list[bytes], preset: ImagePreset):
    """uint8 (N, C, S, S) on `device` for JPEGs that device_jpeg() admits, decoded a batch per
    call (on a CUDA device, nvJPEG: issue #13), converted to grey with Pillow's formula and
    resized with torch's antialiased bilinear, as fast_decode() does on the CPU; None where a
    call fails (a broken file among them), and the caller decodes them one by one instead."""
    import torch
    import torch.nn.functional as F

    decoders = _torchcodec()
    if decoders is None or not blobs:
        return None
    s, out = preset.image_size, []
    calls, size = [[]], 0
    for b in blobs:
        w, h = image_header(b)[1:3]
        if calls[-1] and size + w * h > DEVICE_CALL_PIXELS:
            calls.append([])
            size = 0
        calls[-1].append(b)
        size += w * h
    try:
        for call in calls:
            # One call's full-size images on the device at a time, whichever thread asks.
            with _device_lock:
                imgs = decoders["jpeg"]([torch.frombuffer(bytearray(b), dtype=torch.uint8)
                                         for b in call], mode="RGB", device=device)
                for img in imgs:  # (3, H, W) uint8
                    if preset.channels == 1:
                        img = _pillow_grey(img)
                    if img.shape[1:] != (s, s):
                        img = F.interpolate(img[None].float(), size=(s, s), mode="bilinear",
                                            antialias=True, align_corners=False)[0]
                        img = img.round_().clamp_(0, 255).to(torch.uint8)
                    out.append(img)
                del imgs
    except Exception as e:
        if not _device_failed.is_set():  # the first failure is logged: a broken file, or
            _device_failed.set()  # a device that cannot decode (then every batch falls back)
            import logging

            logging.getLogger("kiln").warning(
                "decoding JPEGs on %s failed (%s: %s); such batches decode on the CPU", device,
                type(e).__name__, str(e)[:200])
        return None
    return torch.stack(out)


_device_failed = threading.Event()


def decode(data: bytes, preset: ImagePreset) -> np.ndarray:
    """Encoded bytes -> normalized (C, S, S) float32; raises ImageError."""
    return normalize(decode_uint8(data, preset), preset)


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
    flip: a random crop of a copy padded by 1/8 of its size (4 pixels at 32) with its own
    pixels mirrored at the border (reflect: the standard recipe's, and better test accuracy
    than zeros on the team's photos; BENCHMARKS.md, Photo recipe section), then a horizontal
    flip of a random half of the images; none: as it is."""
    import torch
    import torch.nn.functional as F

    if mode == "none":
        return x
    b, c, s, _ = x.shape
    if mode == "flip":
        pad = max(1, s // 8)
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, C, S+2p, S+2p)
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
