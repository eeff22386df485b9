"""pipelines.transforms: every odd but valid image decodes to the model's input, every bad one
raises ImageError with its kind. No Ray."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.transforms import (
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
    from pipelines.transforms import fast_decode

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
    from pipelines.transforms import fast_decode

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
