"""Storage URIs: a local path or s3://bucket/prefix, through pyarrow's filesystems. S3 reads
the standard AWS variables; AWS_ENDPOINT_URL points it at an S3-compatible store."""

from __future__ import annotations

import fnmatch
import os
import posixpath
import uuid
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs

# The model folder's file names; models.checkpoint (which imports torch) loads only when a
# model is, so that data tasks reading images never pay for importing torch.
CONFIG_FILE, WEIGHTS_FILE = "config.json", "weights.safetensors"

GLOB_CHARS = set("*?[")
# The standard AWS variables that S3 reads, the one list of them (jobs.redact keeps the secret
# ones out of every log).
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
AWS_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class StorageError(RuntimeError):
    """A URI that cannot be reached, read or written; the message says what to check."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _s3_settings() -> tuple:
    """The environment's S3 settings, the one place kiln reads them (in every process that
    touches S3: a Ray worker has them from its own environment); part of the cache key, so
    a changed environment is seen."""
    return tuple(os.environ.get(k) for k in AWS_VARS)


@lru_cache(maxsize=8)
def _s3(settings: tuple) -> pafs.S3FileSystem:
    endpoint, endpoint_s3, region, region2, key, secret, token = settings
    endpoint = endpoint_s3 or endpoint
    kwargs = dict(
        region=region or region2 or "us-east-1",
        connect_timeout=5,
        request_timeout=30,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=token)
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/") if host else scheme,
                      scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a URI."""
    uri = str(uri)
    if is_s3(uri):
        return _s3(_s3_settings()), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


def absolute(uri: str) -> str:
    """A local path made absolute (other processes have other working directories)."""
    return str(uri) if is_s3(uri) else str(Path(uri).expanduser().absolute())


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
    return StorageError(f"{uri}: {msg}")


def info(uri: str) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise _wrap(uri, e) from None


def exists(uri: str) -> bool:
    return info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return info(uri).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
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


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as e:
        raise _wrap(uri, e) from None


def list_files(uri: str) -> list[pafs.FileInfo]:
    """Every file under a directory URI, recursively, sorted by path."""
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as e:
        raise _wrap(uri, e) from None
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def to_uri(uri_like: str, path: str) -> str:
    """A filesystem path back into the form of the URI it came from."""
    return f"s3://{path}" if is_s3(uri_like) else path


def expand(pattern: str) -> list[str]:
    """A URI, or a glob of URIs (*, ?, [..] in the last parts), as a sorted list of URIs."""
    pattern = str(pattern)
    if not GLOB_CHARS & set(pattern):
        return [pattern]
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


def read_model_config(uri: str) -> dict:
    """The config.json of a run or model folder, without building the model."""
    from models.checkpoint import parse_config

    folder = model_dir(uri)
    return parse_config(read_bytes(join(folder, CONFIG_FILE)), join(folder, CONFIG_FILE))


def load_model(uri: str, expect_kind: str | None = None):
    """The LoadedModel of a run or model folder."""
    from models import ModelFolderError, model_from_bytes

    folder = model_dir(uri)
    files = {}
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            files[name] = read_bytes(join(folder, name))
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
