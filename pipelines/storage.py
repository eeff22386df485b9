"""Storage URIs: a local path or s3://bucket/prefix, through pyarrow's filesystems. S3 reads
the standard AWS variables (pipelines.s3); AWS_ENDPOINT_URL points it at an S3-compatible
store."""

from __future__ import annotations

import fnmatch
import glob
import os
import posixpath
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from .s3 import _s3, _s3_settings

# The model folder's file names; models.checkpoint (which imports torch) loads only when a
# model is, so that data tasks reading images never pay for importing torch.
CONFIG_FILE, WEIGHTS_FILE = "config.json", "weights.safetensors"

GLOB_CHARS = set("*?[")


class StorageError(RuntimeError):
    """A URI that cannot be reached, read or written; the message says what to check."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a URI: for S3, and for writing local outputs (whose
    paths are UTF-8: kiln.pipelines.fence). Local inputs are read through Python's own file calls
    (open_input, read_bytes, list_files), which take every name a disk can hold."""
    uri = str(uri)
    if is_s3(uri):
        return _s3(_s3_settings()), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), local_path(uri)


def local_path(uri: str) -> str:
    """A local path, absolute, "~" expanded; "/" stays "/" (never "", the working directory)."""
    return os.path.abspath(os.path.expanduser(str(uri)))


def absolute(uri: str) -> str:
    """A local path made absolute (other processes have other working directories)."""
    return str(uri) if is_s3(uri) else local_path(uri)


def join(uri: str, *parts: str) -> str:
    return posixpath.join(str(uri).rstrip("/"), *parts) if is_s3(uri) else str(Path(uri, *parts))


def _wrap(uri: str, e: Exception) -> StorageError:
    msg = str(e)
    if is_s3(uri):
        hint = ""
        if "NoSuchBucket" in msg or "bucket does not exist" in msg.lower():
            hint = "the bucket does not exist"
        elif "AccessDenied" in msg or "InvalidAccessKeyId" in msg or "SignatureDoesNotMatch" in msg:
            hint = "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        elif "curl" in msg.lower() or "connect" in msg.lower() or "resolve" in msg.lower():
            hint = "cannot reach the S3 endpoint: check AWS_ENDPOINT_URL and the network"
        return StorageError(f"{uri}: {hint or msg}")
    if isinstance(e, OSError) and e.strerror:
        msg = e.strerror
    return StorageError(f"{shown(uri)}: {msg}")


def shown(uri: str) -> str:
    """A URI for a message: a local name that is not UTF-8 with its odd bytes as \\xNN."""
    return str(uri).encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class Info:
    """What a URI is: pafs.FileType.File, Directory, NotFound, or Unknown (a device, a FIFO,
    a socket: never read); a link is what it points to."""

    path: str
    type: pafs.FileType
    size: int | None = None
    mtime_ns: int | None = None  # a file's last change, where the store says


def info(uri: str) -> Info:
    if is_s3(uri):
        fs, path = filesystem(uri)
        try:
            i = fs.get_file_info(path)
        except OSError as e:
            raise _wrap(uri, e) from None
        if i.type != pafs.FileType.File:
            return Info(i.path, i.type)
        return Info(i.path, i.type, i.size, i.mtime_ns)
    path = local_path(uri)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return Info(path, pafs.FileType.NotFound)
    except OSError as e:
        raise _wrap(uri, e) from None
    if stat.S_ISDIR(st.st_mode):
        return Info(path, pafs.FileType.Directory)
    if stat.S_ISREG(st.st_mode):
        return Info(path, pafs.FileType.File, st.st_size, st.st_mtime_ns)
    return Info(path, pafs.FileType.Unknown)


def exists(uri: str) -> bool:
    return info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return info(uri).type == pafs.FileType.Directory


def _open_local(uri: str, limit: int | None = None):
    """A local regular file opened to read. A link is followed to what it names; a FIFO, a
    device or a directory is refused without blocking (O_NONBLOCK: opening a FIFO would wait
    for a writer forever, reading /dev/zero would never end)."""
    path = local_path(uri)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise StorageError(f"{shown(uri)}: no such file") from None
    except OSError as e:
        raise _wrap(uri, e) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "a device, FIFO or socket"
        raise StorageError(f"{shown(uri)}: not a regular file ({what}); kiln reads only files")
    if limit is not None and st.st_size > limit:
        os.close(fd)
        raise TooLarge(f"{shown(uri)}: {st.st_size:,} bytes, more than the {limit:,} "
                       "this file may have")
    return os.fdopen(fd, "rb")


class TooLarge(StorageError):
    """A file bigger than what its reader takes."""


def open_input(uri: str):
    """A file to read at any offset (seek, read): a local regular file, or an S3 object."""
    if not is_s3(uri):
        return _open_local(uri)
    fs, path = filesystem(uri)
    try:
        return fs.open_input_file(path)
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except OSError as e:
        raise _wrap(uri, e) from None


def open_stream(uri: str):
    """A file to read front to back. Bytes as they are stored: never decompressed on the way
    by its name's suffix (pyarrow's default), which would cut a truncated .gz short."""
    if not is_s3(uri):
        return _open_local(uri)
    fs, path = filesystem(uri)
    try:
        return fs.open_input_stream(path, compression=None)
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except OSError as e:
        raise _wrap(uri, e) from None


def read_bytes(uri: str, limit: int | None = None) -> bytes:
    """A whole file; only a regular file (or an S3 object), and at most `limit` bytes where
    given (TooLarge past it)."""
    if not is_s3(uri):
        with _open_local(uri, limit) as f:
            try:
                return f.read()
            except OSError as e:
                raise _wrap(uri, e) from None
    fs, path = filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            if limit is not None and f.size() > limit:
                raise TooLarge(f"{uri}: {f.size():,} bytes, more than the {limit:,} this "
                               "file may have")
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except OSError as e:
        raise _wrap(uri, e) from None


def write_bytes(uri: str, data: bytes) -> None:
    """Writes whole or not at all: locally through a temporary file renamed into place; an S3
    object only appears once its upload completes."""
    fs, path = filesystem(uri)
    try:
        fs.create_dir(posixpath.dirname(path), recursive=True)
        target = path if is_s3(uri) else f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with fs.open_output_stream(target) as f:
            f.write(data)
        if target != path:
            fs.move(target, path)
    except OSError as e:
        raise _wrap(uri, e) from None


def delete_file(uri: str) -> None:
    """Deletes one file (kiln deletes only files it wrote, one by one, never a folder)."""
    fs, path = filesystem(uri)
    try:
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as e:
        raise _wrap(uri, e) from None


def move(src: str, dst: str) -> None:
    fs, path = filesystem(src)
    try:
        fs.move(path, filesystem(dst)[1])
    except OSError as e:
        raise _wrap(src, e) from None


def list_files(uri: str) -> list[Info]:
    """Every file under a directory URI, recursively, sorted by path. A local walk follows no
    link to a directory (they can loop)."""
    if is_s3(uri):
        fs, path = filesystem(uri)
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        except OSError as e:
            raise _wrap(uri, e) from None
        return sorted((Info(i.path, i.type, i.size) for i in infos
                       if i.type == pafs.FileType.File), key=lambda i: i.path)
    found = []
    for root, _, files in os.walk(local_path(uri)):
        for name in files:
            full = os.path.join(root, name)
            i = info(full)
            if i.type == pafs.FileType.File:
                found.append(i)
    return sorted(found, key=lambda i: i.path)


def list_dir(uri: str) -> list[str]:
    """The names in a folder, not below it; [] where it does not exist. One listing call (a
    page of S3 keys under the prefix): a full home folder is not walked to say it is full."""
    if not is_s3(uri):
        try:
            return sorted(os.listdir(local_path(uri)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise _wrap(uri, e) from None
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as e:
        raise _wrap(uri, e) from None
    return sorted(posixpath.basename(i.path) for i in infos)


def to_uri(uri_like: str, path: str) -> str:
    """A filesystem path back into the form of the URI it came from."""
    return f"s3://{path}" if is_s3(uri_like) else path


def expand(pattern: str) -> list[str]:
    """A URI, or a glob of URIs (*, ?, [..] in the last parts), as a sorted list of URIs."""
    pattern = str(pattern)
    if not GLOB_CHARS & set(pattern) or exists(pattern):  # a name that holds "[" is itself
        return [pattern]
    if not is_s3(pattern):
        return sorted(glob.glob(local_path(pattern)))
    fs, path = filesystem(pattern)
    parts = path.split("/")
    first_glob = next(i for i, p in enumerate(parts) if GLOB_CHARS & set(p))
    base = "/".join(parts[:first_glob]) or "/"
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as e:
        raise _wrap(pattern, e) from None
    depth = len(parts)
    hits = [i.path for i in infos if len(i.path.split("/")) == depth
            and fnmatch.fnmatchcase(i.path, path)]
    return sorted(to_uri(pattern, p) for p in hits)


def check_reachable(uri: str, *, must_exist: bool = False) -> None:
    """Fails early with a clear message for a missing bucket, bad credentials or a dead endpoint."""
    if is_s3(uri):
        bucket = uri[len("s3://"):].split("/", 1)[0]
        if not bucket:
            raise StorageError(f"{uri}: no bucket named")
        fs, _ = filesystem(uri)
        try:
            kind = fs.get_file_info(bucket).type
        except OSError as e:
            raise _wrap(uri, e) from None
        if kind == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: the bucket {bucket!r} does not exist")
    if must_exist and not exists(uri):
        raise StorageError(f"{uri}: not found")


def model_dir(uri: str) -> str:
    """The one resolver of model folders: a URI that names a run folder resolves to its
    model/ folder; any other names a model folder itself."""
    if exists(join(uri, "model", CONFIG_FILE)):
        return join(uri, "model")
    return str(uri)


MAX_CONFIG_BYTES = 64 * 1024 * 1024  # a config.json with a vocabulary or classes at their limits


def read_model_config(uri: str) -> dict:
    """The config.json of a run or model folder, without building the model."""
    from kiln.models.checkpoint import parse_config

    folder = model_dir(uri)
    try:
        data = read_bytes(join(folder, CONFIG_FILE), MAX_CONFIG_BYTES)
    except TooLarge as e:
        from kiln.models import ModelFolderError

        raise ModelFolderError(f"{e}: the model folder is corrupt") from None
    return parse_config(data, join(folder, CONFIG_FILE))


def load_model(uri: str, expect_kind: str | None = None):
    """The LoadedModel of a run or model folder."""
    from kiln.models import ModelFolderError, model_from_bytes
    from kiln.models.checkpoint import parse_config, weights_limit

    folder = model_dir(uri)
    files = {}
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        # config.json first: it bounds what the weights file may hold, so a weights file
        # of the wrong size (a link to /dev/zero, say) is refused before it is read.
        where = join(folder, CONFIG_FILE)
        limit = MAX_CONFIG_BYTES if name == CONFIG_FILE else weights_limit(
            parse_config(files[CONFIG_FILE], where), where)
        try:
            files[name] = read_bytes(join(folder, name), limit)
        except TooLarge as e:
            raise ModelFolderError(f"{e}: the model folder is corrupt") from None
        except StorageError as e:
            if "no such file" in str(e):
                raise ModelFolderError(f"{uri} is not a model folder: {name} is missing") from None
            raise
    return model_from_bytes(files[CONFIG_FILE], files[WEIGHTS_FILE], expect_kind, str(uri))


def save_model(uri: str, files: dict[str, bytes]) -> dict:
    """Writes a model folder from models.model_to_bytes' files; returns its config. Weights
    first: a folder whose config.json is present is complete."""
    import json

    for name in (WEIGHTS_FILE, CONFIG_FILE):
        write_bytes(join(uri, name), files[name])
    return json.loads(files[CONFIG_FILE])


def write_files(uri: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        write_bytes(join(uri, name), data)


def read_files(uri: str, names: tuple[str, ...]) -> dict[str, bytes]:
    """The named files of a folder; a missing one is left out."""
    files = {}
    for name in names:
        try:
            files[name] = read_bytes(join(uri, name))
        except StorageError as e:
            if "no such file" not in str(e):
                raise
    return files

