"""kiln.pipelines.transforms: every odd but valid image decodes to the model's input, every bad one
raises ImageError with its kind. No Ray."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kiln.pipelines.transforms import (
    ImageError,
    ImagePreset,
    decode,
    decode_uint8,
    normalize,
)
from tests import image_cases as ic

GRAY = ImagePreset(28, 1, (0.5,), (0.5,))
RGB = ImagePreset(32, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ODD = ic.odd_images()
# Images with the bright-left pattern: their left half must come out brighter than the right.
PATTERNED = [n for n in ODD if not n.startswith(("gray16", "float", "int32", "lab", "tiny",
                                                 "wide"))]


@pytest.mark.parametrize("preset", [GRAY, RGB], ids=["gray-model", "rgb-model"])
@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_images_decode(name, preset):
    x = decode(ODD[name], preset)
    s = preset.image_size
    assert x.shape == (preset.channels, s, s) and x.dtype == np.float32
    assert np.isfinite(x).all()
    if name in PATTERNED:
        assert x[..., : s // 2 - 2].mean() > x[..., s // 2 + 2 :].mean() + 0.5


def test_exif_orientation_is_applied():
    data, shown = ic.exif_rotated_jpeg()
    upright = decode(ic.encode(shown, "JPEG", quality=95), RGB)
    assert np.abs(decode(data, RGB) - upright).max() < 0.1


def test_high_depth_images_keep_their_range():
    gray16 = decode_uint8(ODD["gray16.png"], GRAY)[0]  # a 0..65535 ramp, row by row
    assert gray16[0, 0] < 10 and gray16[-1, -1] > 245
    floats = decode_uint8(ODD["float.tif"], GRAY)  # values in 0..1
    assert 60 < floats.mean() < 200


def test_transparent_pixels_composite_on_white():
    x = decode_uint8(ODD["palette_alpha.png"], GRAY)[0]
    assert x[:, :10].min() == 255  # palette index 0 (the bright half) is transparent


def test_decode_is_normalize_of_uint8():
    for data in (ODD["rgb.png"], ODD["cmyk.jpg"]):
        for preset in (GRAY, RGB):
            u8 = decode_uint8(data, preset)
            assert u8.dtype == np.uint8
            assert np.array_equal(decode(data, preset), normalize(u8, preset))
    batch = np.stack([decode_uint8(ODD["rgb.png"], RGB)] * 3)
    assert np.allclose(normalize(batch, RGB)[1], decode(ODD["rgb.png"], RGB))


GOOD = ic.encode(ic.pattern((64, 64)))
BAD = {
    "empty": b"",
    "not_image": b"hello, world\n" * 5,
    "corrupt": ic.corrupt_png(GOOD),
    "truncated": GOOD[: len(GOOD) // 2],
    "too_large": ic.bomb_png(),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_bytes_raise_their_kind(kind):
    with pytest.raises(ImageError) as err:
        decode(BAD[kind], GRAY)
    assert err.value.kind == kind
    assert str(err.value).startswith(f"{kind}: ")


def test_truncated_jpeg_and_limit_per_preset():
    jpeg = ic.encode(ic.pattern((64, 64)), "JPEG")
    with pytest.raises(ImageError) as err:
        decode(jpeg[: len(jpeg) // 2], GRAY)
    assert err.value.kind == "truncated"
    small_limit = ImagePreset(28, 1, (0.5,), (0.5,), max_pixels=1000)
    with pytest.raises(ImageError) as err:
        decode(GOOD, small_limit)
    assert err.value.kind == "too_large"


def test_a_claim_past_pillows_own_limit_is_too_large_and_kiln_leaves_pillow_as_it_was():
    """An image claiming 30,000 x 30,000 pixels trips Pillow's own bomb guard before kiln's
    limit is asked: still a too_large row. Importing kiln changes no setting of Pillow's."""
    with pytest.raises(ImageError) as err:
        decode(ic.claimed_png(30_000), GRAY)
    assert err.value.kind == "too_large"
    probe = ("from PIL import Image, ImageFile; before = (Image.MAX_IMAGE_PIXELS, "
             "ImageFile.LOAD_TRUNCATED_IMAGES); import kiln.pipelines.label, kiln.bulk.label; "
             "assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before")
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)


def _photo_cases() -> list[tuple[str, bytes]]:
    """Real photos (scikit-image's) as PNG and JPEG at the models' size, smaller (upscaled) and
    up to 3x larger, in colour and grey."""
    import skimage.data
    from PIL import Image

    photos = {"astronaut": skimage.data.astronaut(), "chelsea": skimage.data.chelsea(),
              "camera": skimage.data.camera()}
    cases = []
    for name, arr in photos.items():
        for size in ((32, 32), (28, 28), (20, 15), (80, 50)):
            img = Image.fromarray(arr).resize(size, Image.BILINEAR)
            for grey in (False, True):
                im = img.convert("L") if grey else img
                tag = f"{name}-{size[0]}x{size[1]}-{'grey' if grey else 'rgb'}"
                cases.append((f"{tag}.png", ic.encode(im)))
                cases.append((f"{tag}.jpg", ic.encode(im, "JPEG", quality=90)))
                cases.append((f"{tag}-progressive.jpg", ic.encode(im, "JPEG", quality=75,
                                                                 progressive=True)))
    return cases


PHOTOS = _photo_cases()


@pytest.mark.parametrize("preset", [GRAY, RGB], ids=["gray-model", "rgb-model"])
def test_fast_decoder_gives_pillows_pixels_within_one_level(preset):
    """TorchCodec (PNG, baseline and progressive JPEG; with grey conversion and resizes up to
    3x) against Pillow's path, pixel by pixel."""
    from kiln.pipelines.transforms import fast_decode

    for name, data in PHOTOS:
        fast = fast_decode(data, preset)
        assert fast is not None, f"{name} should take the fast path"
        slow = decode_uint8(data, preset)
        assert fast.shape == slow.shape and fast.dtype == np.uint8
        worst = np.abs(fast.astype(int) - slow.astype(int)).max()
        assert worst <= 1, f"{name}: {worst} levels apart"
        assert np.array_equal(decode_uint8(data, preset, fast=True), fast)


def test_fast_decoder_leaves_the_rest_to_pillow():
    """Palettes, alpha, 16-bit, CMYK, EXIF rotation, other formats and images that Pillow
    reduces cheaply are not the fast decoder's; broken files keep Pillow's error kinds."""
    from kiln.pipelines.transforms import fast_decode

    taken = {n for n in ODD if fast_decode(ODD[n], RGB) is not None}
    assert taken == {"gray.png", "rgb.png", "ycbcr.jpg", "tiny_1x1.png"}
    for name, data in ODD.items():
        assert np.abs(decode_uint8(data, RGB, fast=True).astype(int)
                      - decode_uint8(data, RGB).astype(int)).max() <= 1, name
    jpeg = ic.encode(ic.pattern((64, 64)), "JPEG")
    bad = {**BAD, "truncated_jpeg": jpeg[: len(jpeg) * 9 // 10]}
    for name, data in bad.items():
        with pytest.raises(ImageError) as err:
            decode_uint8(data, GRAY, fast=True)
        assert err.value.kind == name.split("_jpeg")[0]


DEVICES = ["cpu"] + (["cuda"] if __import__("torch").cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", [GRAY, RGB], ids=["gray-model", "rgb-model"])
def test_batched_device_jpeg_decode_gives_the_cpu_pixels(preset, device):
    """A GPU label actor's path (decode_jpegs_on: one batched call, nvJPEG on CUDA) against
    the file-by-file one: within one level where the CPU decodes at full size. A photo 16x
    the model's size, which the CPU path decodes in Pillow's draft mode (reduced), against
    Pillow's full decode and resize: within a few levels (Pillow box-reduces first), under
    one on average."""
    import io

    import skimage.data
    from PIL import Image

    from kiln.pipelines.transforms import decode_jpegs_on, device_jpeg, to_uint8

    jpegs = [(n, d) for n, d in PHOTOS if n.endswith(".jpg")]
    big = Image.fromarray(skimage.data.astronaut())  # 512x512: 16x the model's size
    jpegs += [("astronaut-512.jpg", ic.encode(big, "JPEG", quality=90)),
              ("astronaut-512-grey.jpg", ic.encode(big.convert("L"), "JPEG", quality=90))]
    assert all(device_jpeg(d, preset) for _, d in jpegs)
    got = decode_jpegs_on(device, [d for _, d in jpegs], preset)
    s = preset.image_size
    assert got.shape == (len(jpegs), preset.channels, s, s) and got.device.type == device
    for (name, data), x in zip(jpegs, got.cpu().numpy(), strict=True):
        want = decode_uint8(data, preset) if "512" not in name else to_uint8(
            Image.open(io.BytesIO(data)).convert("RGB"), preset)
        diff = np.abs(x.astype(int) - want.astype(int))
        assert diff.max() <= (1 if "512" not in name else 8), f"{name}: {diff.max()} apart"
        assert diff.mean() < 0.6, name


@pytest.mark.parametrize("device", DEVICES)
def test_a_device_batch_keeps_every_row_and_pillows_errors(device, monkeypatch):
    """A batch of JPEGs, other formats and broken files: the JPEGs on the device, the rest on
    the CPU, each image in its record's place; a truncated JPEG fails the batched call, and
    the batch is then decoded file by file, so every error is Pillow's."""
    import torch

    from kiln.pipelines import label as label_module
    from kiln.pipelines import transforms
    from kiln.pipelines.label import decode_batch
    from kiln.pipelines.sources import Record
    from kiln.pipelines.transforms import device_jpeg

    calls = []  # what each batched device call gave back

    def recorded(*args):
        calls.append(transforms.decode_jpegs_on(*args))
        return calls[-1]

    monkeypatch.setattr(label_module, "decode_jpegs_on", recorded)

    jpegs = [d for n, d in PHOTOS if n.endswith(".jpg")][:6]
    good = [d for n, d in PHOTOS if n.endswith(".png")][:2] + [ODD["cmyk.jpg"], ODD[
        "palette.png"]]
    assert not any(device_jpeg(d, RGB) for d in good)
    bad = ic.bad_members(ODD["rgb.png"])
    for broken in ([], ["bad/truncated.jpg"]):
        blobs = [jpegs[0], good[0], bad["bad/empty.png"], *jpegs[1:3], good[1],
                 *(bad[b] for b in broken), good[2], *jpegs[3:], bad["bad/corrupt.png"],
                 good[3]]
        records = [Record("src", f"{i}", b) for i, b in enumerate(blobs)]
        records[5].error = "unsafe_path: the reader's"  # already failed: stays as it is
        _, batch, positions = decode_batch(records, RGB, torch.device(device))
        errors = {r.path: r.error.split(":")[0] for r in records if r.error}
        assert errors == {"2": "empty", "5": "unsafe_path", str(len(blobs) - 2): "corrupt",
                          **({"6": "truncated"} if broken else {})}
        assert positions == [i for i in range(len(blobs)) if str(i) not in errors]
        assert torch.is_tensor(batch) and batch.device.type == device
        for x, i in zip(batch.cpu().numpy(), positions, strict=True):
            assert np.abs(x.astype(int) - decode_uint8(blobs[i], RGB).astype(int)).max() <= 1
        # the six JPEGs went to the device; with a truncated one among them the call failed
        assert (calls[-1] is None) == bool(broken), calls[-1]
        assert broken or tuple(calls[-1].shape) == (6, 3, 32, 32)
