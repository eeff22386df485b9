"""S3: the AWS settings kiln reads (the environment, or the variables a user forwarded to a
cluster's processes), kept out of Ray's logs and state (secrets_in_a_file), and the clients
built from them: pyarrow's filesystem and, for what pyarrow does not do, boto3's. The URIs
and files themselves are pipelines.storage's."""

from __future__ import annotations

import contextlib
import os
import tempfile
from functools import lru_cache

import pyarrow.fs as pafs

# The standard AWS variables that S3 reads, the one list of them (kiln.redact keeps the secret
# ones out of every log).
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
AWS_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _s3_settings() -> tuple:
    """The environment's S3 settings, the one place kiln reads them (in every process that
    touches S3: a Ray worker has them from its own environment, or forwarded by the user's
    --forward-credentials: apply_forwarded); part of the cache key, so a changed environment
    is seen."""
    apply_forwarded()
    return tuple(os.environ.get(k) for k in (*AWS_VARS, *PROFILE_VARS))


# Where the SDKs look for credentials when none are in the environment: secrets_in_a_file
# points them at a private file.
PROFILE_VARS = ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE")


@contextlib.contextmanager
def secrets_in_a_file():
    """For the duration: this process's AWS secrets move from its environment into a private
    credentials file (mode 0600) that the S3 clients read instead (AWS_SHARED_CREDENTIALS_FILE,
    AWS_PROFILE). While a Ray session runs, Ray Tune copies AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN from the driver's environment into each
    trial's runtime_env, whose env_vars Ray's runtime-env agent logs (and sends to a
    cluster's nodes), and a filesystem built with explicit keys is pickled with them into
    Ray's state files; with the secrets in a file, neither holds them. A local Ray started
    before keeps them in its own processes' environment."""
    secrets = {k: os.environ[k] for k in AWS_SECRETS if os.environ.get(k)}
    if "AWS_ACCESS_KEY_ID" not in secrets or "AWS_SECRET_ACCESS_KEY" not in secrets:
        yield
        return
    names = {"AWS_ACCESS_KEY_ID": "aws_access_key_id",
             "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
             "AWS_SESSION_TOKEN": "aws_session_token"}
    sweep_secret_files()
    fd, path = tempfile.mkstemp(prefix=f"{SECRETS_PREFIX}{os.getpid()}-", suffix=".ini")  # 0600
    with os.fdopen(fd, "w") as f:
        f.write("[kiln]\n" + "".join(f"{names[k]} = {v}\n" for k, v in secrets.items()))
    saved = {k: os.environ.get(k) for k in (*AWS_SECRETS, *PROFILE_VARS)}
    for k in AWS_SECRETS:
        os.environ.pop(k, None)
    os.environ.update(AWS_SHARED_CREDENTIALS_FILE=path, AWS_PROFILE="kiln")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.unlink(path)


SECRETS_PREFIX = "kiln-aws-"


def sweep_secret_files() -> list[str]:
    """Removes the credentials files that secrets_in_a_file wrote for processes no longer
    alive (a command killed with SIGKILL never reaches its own unlink): this user's files of
    that name in the temp folder, named by the process that wrote them. Returns their paths."""
    folder, gone = tempfile.gettempdir(), []
    try:
        names = os.listdir(folder)
    except OSError:
        return gone
    for name in names:
        pid = name[len(SECRETS_PREFIX):].split("-", 1)[0]
        if not (name.startswith(SECRETS_PREFIX) and name.endswith(".ini") and pid.isdigit()):
            continue
        path = os.path.join(folder, name)
        try:
            if os.lstat(path).st_uid != os.getuid() or _alive(int(pid)):
                continue
            os.unlink(path)
            gone.append(path)
        except OSError:
            continue  # another command swept it first, or it is not ours to remove
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The package that carries a user's AWS variables to a cluster's processes when they ask for
# it (kiln.cluster.connect.forwarded_credentials): a Ray runtime_env py_modules entry, which Ray
# uploads to the cluster and puts on its workers' path but never logs or shows, unlike
# env_vars.
FORWARD_MODULE = "kiln_forwarded_aws"
_FORWARDED: dict = {}


def apply_forwarded() -> None:
    """Where this process has the forwarded package (a cluster's job or worker), its
    variables join the environment once, ahead of the node's own: the user asked for them."""
    if "done" in _FORWARDED:
        return
    _FORWARDED["done"] = True
    import importlib.util
    import json

    spec = importlib.util.find_spec(FORWARD_MODULE)
    # Only the package Ray unpacked (its runtime_resources), never a folder of that name that
    # happens to be on the path here.
    if spec is None or not spec.origin or "runtime_resources" not in spec.origin:
        return
    with open(os.path.join(os.path.dirname(spec.origin), "env.json")) as f:
        os.environ.update(json.load(f))


@lru_cache(maxsize=8)
def _s3(settings: tuple) -> pafs.S3FileSystem:
    endpoint, endpoint_s3, region, region2, key, secret, token, *_ = settings
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


@lru_cache(maxsize=8)
def _s3_client(settings: tuple):
    import boto3
    from botocore.config import Config

    endpoint, endpoint_s3, region, region2, key, secret, token, *_ = settings
    url = endpoint_s3 or endpoint or None
    if url and "://" not in url:  # host:port, which pyarrow's filesystem takes as https
        url = f"https://{url}"
    return boto3.client(
        "s3", endpoint_url=url,
        region_name=region or region2 or "us-east-1",
        aws_access_key_id=key or None, aws_secret_access_key=secret or None,
        aws_session_token=token or None,
        config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3}))


def s3_client():
    """A boto3 client with the settings pyarrow's filesystem has: for what pyarrow does not
    do (conditional writes: pipelines.lease)."""
    return _s3_client(_s3_settings())


def s3_bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    return bucket, key


apply_forwarded()  # a cluster's process: before any S3 client is made
