"""The archive formats' own rules, apart from reading records (pipelines.sources): a tar's
members from their headers, its end where a header is bad; a zip's entries and their names,
also where a name is flagged UTF-8 but is not; which members are refused (unsafe names, links,
special files, members over MAX_MEMBER_BYTES)."""

from __future__ import annotations

import io
import stat
import struct
import tarfile
import zipfile
from collections.abc import Iterator

from . import names

MAX_MEMBER_BYTES = 256 * 1024 * 1024  # a bigger single member is refused, never read


def unsafe_name(name: str) -> bool:
    return name.startswith("/") or ".." in name.replace("\\", "/").split("/")


def open_zip(f) -> zipfile.ZipFile:
    """A zip archive, also where an entry's name is flagged UTF-8 but is not (zipfile then
    refuses the whole archive): such names are read as the bytes they are."""
    try:
        return zipfile.ZipFile(f)
    except UnicodeDecodeError:
        return zipfile.ZipFile(_Unflagged(f))


class _Unflagged(io.RawIOBase):
    """A zip file as it is, but for the UTF-8 flag cleared on the entries whose names are not
    UTF-8, in the central directory and their local headers: zipfile reads those names as
    cp437, from which zip_name takes the bytes back. A zip64 archive is left as it is."""

    def __init__(self, f):
        self.f, self.pos, self.patches = f, 0, {}
        size = f.seek(0, io.SEEK_END)
        f.seek(max(0, size - 65_557))
        tail = f.read()
        end = tail.rfind(b"PK\x05\x06")
        if end < 0 or len(tail) < end + 22:
            return
        cd_size, cd_offset = struct.unpack("<II", tail[end + 12 : end + 20])
        f.seek(cd_offset)
        cd, at = f.read(cd_size), 0
        while at + 46 <= len(cd) and cd[at : at + 4] == b"PK\x01\x02":
            flags, = struct.unpack("<H", cd[at + 8 : at + 10])
            n, extra, comment = struct.unpack("<HHH", cd[at + 28 : at + 34])
            if flags & 0x800 and not _utf8(cd[at + 46 : at + 46 + n]):
                self.patches[cd_offset + at + 8] = struct.pack("<H", flags & ~0x800)
                local, = struct.unpack("<I", cd[at + 42 : at + 46])  # its local header's
                f.seek(local + 6)
                self.patches[local + 6] = struct.pack("<H", struct.unpack(
                    "<H", f.read(2))[0] & ~0x800)
            at += 46 + n + extra + comment

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = self.f.seek(offset, whence)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        self.f.seek(self.pos)
        data = bytearray(self.f.read(n))
        for where, patch in self.patches.items():
            if self.pos <= where and where + 2 <= self.pos + len(data):
                data[where - self.pos : where - self.pos + 2] = patch
        self.pos += len(data)
        return bytes(data)


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def zip_name(info: zipfile.ZipInfo) -> str:
    """A zip entry's name as bytes would give it: zipfile reads a name without the UTF-8 flag
    as cp437 (the format's old default), but most tools write UTF-8 there; so the bytes are
    read as UTF-8, and where they are not, kept as they are (pipelines.names)."""
    if info.flag_bits & 0x800:
        return info.filename
    return names.from_bytes(info.filename.encode("cp437"))


class CheckedTarInfo(tarfile.TarInfo):
    """tarfile ends an archive silently at a bad header after the first; this notes the
    error on the TarFile so the reader can report the rest of the archive as unreadable."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except (tarfile.EOFHeaderError, tarfile.EmptyHeaderError):
            raise  # a normal end of archive
        except tarfile.HeaderError as e:
            tf.kiln_error = (tf.offset, e)
            raise


def tar_end_error(tar: tarfile.TarFile, last: str | None) -> tuple | None:
    """An error item for an archive that ended at a bad header, else None."""
    bad = getattr(tar, "kiln_error", None)
    if bad is None:
        return None
    offset, e = bad
    kind = "truncated" if isinstance(e, tarfile.TruncatedHeaderError) else "corrupt"
    after = f" after {names.text(last)}" if last else ""
    return (f"<archive byte {offset}>", 0, 0, f"{kind}: bad member header{after}: {e}")


def scan_tar(tar: tarfile.TarFile) -> list[tuple]:
    """The members of a seekable tar from their headers (the data is skipped), and an error
    item where the archive turns out truncated or corrupt; members before it are kept."""
    return list(iter_tar(tar))


def iter_tar(tar: tarfile.TarFile) -> Iterator[tuple]:
    """scan_tar's items one by one, each header read as it is asked for: a reader that seeks
    to each member's data in between reads a whole tar without holding its headers."""
    last, last_item, count = None, None, names.Counter()
    while True:
        try:
            m = tar.next()
        except (tarfile.TarError, OSError, EOFError) as e:
            if "end of data" in str(e) and last_item and last_item[2] > 0:
                break  # the last member's data runs past the end: its own row says so
            kind = "truncated" if "end of data" in str(e) else "corrupt"
            yield (f"<archive byte {tar.offset}>", 0, 0, f"{kind}: {e}")
            break
        if m is None:
            end = tar_end_error(tar, last)
            if end:
                yield end
            break
        tar.members.clear()  # tarfile keeps every header otherwise: memory for huge archives
        last = m.name
        item = tar_item(m, count)
        if item:
            last_item = item
            yield item


def tar_item(m: tarfile.TarInfo, count: names.Counter):
    """(path, data offset, size, error) for a tar member; None for a directory. `count`: the
    names of the archive so far (a tar appended to holds a name twice: two rows)."""
    if m.isdir():
        return None
    path = count.key(m.name)
    if unsafe_name(m.name):
        return (path, 0, 0, "unsafe_path: absolute or '..' member name")
    if m.issym() or m.islnk():
        return (path, 0, 0, "not_a_file: link member")
    if not m.isfile():
        return (path, 0, 0, "not_a_file: device, fifo or other special member")
    if m.size > MAX_MEMBER_BYTES:
        return (path, 0, 0, f"too_large: {m.size} bytes")
    return (path, m.offset_data, m.size, None)


def zip_member_error(info: zipfile.ZipInfo) -> str | None:
    if unsafe_name(info.filename):
        return "unsafe_path: absolute or '..' member name"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "not_a_file: link member"
    if info.file_size > MAX_MEMBER_BYTES:
        return f"too_large: {info.file_size} bytes"
    return None
