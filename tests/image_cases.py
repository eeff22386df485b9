"""Hand-made images and archives for the source, transform and labeling tests: odd but valid
images (every mode a camera, scanner or editor writes) and every kind of bad input."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pattern(size=(40, 30)) -> Image.Image:
    """An RGB picture with a bright left half, so orientation and values can be checked."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (250, 200, 150)
    arr[:, w // 2 :] = (10, 60, 110)
    return Image.fromarray(arr, "RGB")


def exif_rotated_jpeg() -> tuple[bytes, Image.Image]:
    """A JPEG stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise),
    and the picture as a viewer shows it."""
    shown = pattern((40, 24))
    stored = shown.transpose(Image.Transpose.ROTATE_90)  # undone by orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes()), shown


def odd_images() -> dict[str, bytes]:
    """Valid images of every awkward kind, by a descriptive file name."""
    rgb = pattern()
    gray16 = Image.fromarray((np.linspace(0, 65535, 30 * 40).reshape(30, 40)).astype(np.uint16))
    p_alpha = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    p_alpha.info["transparency"] = 0
    cases = {
        "palette.png": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)),
        "palette_alpha.png": encode(p_alpha),
        "palette.gif": encode(rgb.convert("P")),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "cmyk.tif": encode(rgb.convert("CMYK"), "TIFF"),
        "gray16.png": encode(gray16),
        "gray16.tif": encode(gray16, "TIFF"),
        "float.tif": encode(Image.fromarray(np.random.rand(30, 40).astype(np.float32)), "TIFF"),
        "int32.tif": encode(Image.fromarray((np.random.rand(30, 40) * 1e5).astype(np.int32)),
                            "TIFF"),
        "rgba.png": encode(rgb.convert("RGBA")),
        "la.png": encode(rgb.convert("LA")),
        "gray.png": encode(rgb.convert("L")),
        "bilevel.png": encode(rgb.convert("1")),
        "rgb.png": encode(rgb),
        "rgb.webp": encode(rgb, "WEBP"),
        "rgb.bmp": encode(rgb, "BMP"),
        "ycbcr.jpg": encode(rgb, "JPEG"),
        "lab.tif": encode(Image.frombytes("LAB", (40, 30), bytes(range(256)) * 14 + b"\0" * 16),
                          "TIFF"),
        "exif_rotated.jpg": exif_rotated_jpeg()[0],
        "tiny_1x1.png": encode(Image.new("RGB", (1, 1), (200, 10, 10))),
        "wide_3000x7.png": encode(Image.new("L", (3000, 7), 128)),
        "large_2400x1800.jpg": encode(pattern((2400, 1800)), "JPEG"),
    }
    return cases


def bomb_png(side: int = 8000) -> bytes:
    """A tiny file that claims side x side pixels (64 M at 8000): refused before decoding."""
    return encode(Image.new("1", (side, side)))


def claimed_png(side: int) -> bytes:
    """An 8x8 PNG whose header claims side x side pixels (the IHDR rewritten, its CRC too)."""
    data = bytearray(encode(Image.new("1", (8, 8))))
    data[16:24] = struct.pack(">II", side, side)  # IHDR: width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # over type + fields
    return bytes(data)


def corrupt_png(good: bytes) -> bytes:
    """A PNG whose compressed pixel data is overwritten: the header still parses."""
    idat = good.index(b"IDAT")
    data = bytearray(good)
    for i in range(idat + 8, min(len(data) - 16, idat + 40)):
        data[i] ^= 0x5A
    return bytes(data)


# Every bad member of bad_tar(), by path, with the error kind its row must carry.
BAD_TAR_KINDS = {
    "bad/corrupt.png": "corrupt",
    "bad/truncated.png": "truncated",
    "bad/truncated.jpg": "truncated",
    "bad/notes.txt": "not_image",
    "bad/fake.png": "not_image",
    "bad/empty.png": "empty",
    "bad/bomb.png": "too_large",
    "../escape.png": "unsafe_path",
    "/etc/absolute.png": "unsafe_path",
    "bad/symlink.png": "not_a_file",
    "bad/hardlink.png": "not_a_file",
    "bad/fifo": "not_a_file",
    "bad/device": "not_a_file",
}


def bad_members(good: bytes) -> dict[str, bytes]:
    jpeg = encode(pattern((64, 64)), "JPEG")
    return {
        "bad/corrupt.png": corrupt_png(good),
        "bad/truncated.png": good[: len(good) * 2 // 3],
        "bad/truncated.jpg": jpeg[: len(jpeg) // 2],
        "bad/notes.txt": b"these are not the pixels you are looking for\n",
        "bad/fake.png": b"%PDF-1.4\n" + os.urandom(200),
        "bad/empty.png": b"",
        "bad/bomb.png": bomb_png(),
        "../escape.png": good,
        "/etc/absolute.png": good,
    }


def bad_tar(path: Path, goods: dict[str, bytes], mode: str = "w") -> Path:
    """A tar of good images mixed with every bad kind of BAD_TAR_KINDS, and a directory
    entry (which is no row)."""
    good = next(iter(goods.values()))
    bad = bad_members(good)
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tar:
        d = tarfile.TarInfo("bad")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        names = list(goods)
        for i, (name, data) in enumerate(bad.items()):
            _add(tar, names[i % len(names)], goods[names[i % len(names)]])
            _add(tar, name, data)
        for name in names[len(bad):]:
            _add(tar, name, goods[name])
        for name, kind in (("bad/symlink.png", tarfile.SYMTYPE), ("bad/hardlink.png",
                           tarfile.LNKTYPE), ("bad/fifo", tarfile.FIFOTYPE),
                           ("bad/device", tarfile.CHRTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = names[0] if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tar.addfile(info)
    return path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def truncated_tar(path: Path, goods: dict[str, bytes]) -> tuple[Path, list[str]]:
    """A tar cut off inside its last member; returns it and the names that stay whole."""
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w") as tar:
        for name, data in goods.items():
            _add(tar, name, data + b"\0" * 2000)  # padding keeps the cut inside the data
    raw = full.getvalue()
    last = list(goods)[-1]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        cut = tar.getmember(last).offset_data + 100
    path.write_bytes(raw[:cut])
    return path, list(goods)[:-1]


def corrupt_header_tar(path: Path, goods: dict[str, bytes]) -> tuple[Path, list[str]]:
    """A tar whose third member header is garbage: the two before it stay readable, the rest
    of the archive is one error row."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in goods.items():
            _add(tar, name, data)
    raw = raw.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        third = tar.getmembers()[2].offset
    data = bytearray(raw)
    data[third : third + 512] = os.urandom(512)
    path.write_bytes(bytes(data))
    return path, list(goods)[:2]


# Bad members of bad_zip(), by path, with their error kind.
BAD_ZIP_KINDS = {
    "bad/crc.png": "unreadable",
    "bad/encrypted.png": "unreadable",
    "bad/link.png": "not_a_file",
    "../up.png": "unsafe_path",
    "bad/empty.png": "empty",
    "bad/truncated.png": "truncated",
}


def bad_zip(path: Path, goods: dict[str, bytes]) -> Path:
    """A zip of good images with a member whose data fails its CRC, an 'encrypted' member, a
    symlink member, a '..' name, an empty and a truncated image, and a directory entry."""
    good = next(iter(goods.values()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("bad/", b"")  # a directory entry: no row
        for name, data in goods.items():
            zf.writestr(name, data)
        zf.writestr("bad/crc.png", good)
        zf.writestr("bad/encrypted.png", good)
        link = zipfile.ZipInfo("bad/link.png")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, list(goods)[0])
        zf.writestr("../up.png", good)
        zf.writestr("bad/empty.png", b"")
        zf.writestr("bad/truncated.png", good[: len(good) // 2])
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        crc = zf.getinfo("bad/crc.png")
        enc = zf.getinfo("bad/encrypted.png")
    # Flip a byte of the stored data: the CRC check fails on reading.
    start = crc.header_offset + 30 + len(crc.filename)
    raw[start + 10] ^= 0xFF
    # Set the 'encrypted' flag bit in the member's local header and its directory entry.
    raw[enc.header_offset + 6] |= 0x01
    pos = 0
    while (pos := raw.find(b"PK\x01\x02", pos)) >= 0:
        name_len = struct.unpack_from("<H", raw, pos + 28)[0]
        if raw[pos + 46 : pos + 46 + name_len] == b"bad/encrypted.png":
            raw[pos + 8] |= 0x01
        pos += 4
    path.write_bytes(bytes(raw))
    return path


def bad_dir(root: Path, goods: dict[str, bytes]) -> tuple[Path, dict[str, str]]:
    """A directory of good images with an empty file, a text file, a broken link, a link to a
    directory and a FIFO; returns it and the expected error kind by path."""
    for name, data in goods.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "bad").mkdir()
    (root / "bad" / "empty.png").write_bytes(b"")
    (root / "bad" / "readme.txt").write_text("not an image")
    (root / "bad" / "broken.png").symlink_to(root / "missing.png")
    (root / "bad" / "dirlink").symlink_to(root / "bad", target_is_directory=True)
    os.mkfifo(root / "bad" / "pipe.png")
    (root / "bad" / "good_link.png").symlink_to(root / list(goods)[0])
    return root, {"bad/empty.png": "empty", "bad/readme.txt": "not_image",
                  "bad/broken.png": "not_a_file", "bad/dirlink": "not_a_file",
                  "bad/pipe.png": "not_a_file"}
