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


def test_train_variant_shifts_but_keeps_shape():
    rng = np.random.default_rng(0)
    outs = [decode(ODD["rgb.png"], RGB, train=True, rng=rng) for _ in range(8)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])


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
