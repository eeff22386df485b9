"""Shared fixtures: one local Ray for the session, a moto S3 server on 127.0.0.1, and the
embedded data sets written as real files."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kiln import embedded

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory):
    """The sampling kernels' measurements (models.kernels) cached for the session, in a folder
    of its own: the tests neither read nor add to the user's cache."""
    old = os.environ.get("KILN_CACHE_DIR")
    os.environ["KILN_CACHE_DIR"] = str(tmp_path_factory.mktemp("kiln-cache"))
    yield os.environ["KILN_CACHE_DIR"]
    if old is None:
        os.environ.pop("KILN_CACHE_DIR", None)
    else:
        os.environ["KILN_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray (2 CPUs, small object store, a short temp dir) for every Ray test. Its
    workers inherit the environment at start, so the S3 server's variables come first."""
    import ray

    from kiln.cluster.connect import ensure_token_auth, local_train_env

    ensure_token_auth()
    tmp = tempfile.mkdtemp(prefix="kr-", dir="/tmp")
    env = local_train_env()  # as kiln sets it up for the local Ray it starts
    env.__enter__()
    ray.init(address="local", num_cpus=2, object_store_memory=600 * 1024 * 1024, _temp_dir=tmp,
             include_dashboard=True, logging_level="WARNING")
    yield ray
    ray.shutdown()
    env.__exit__(None, None, None)
    shutil.rmtree(tmp, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto in server mode on 127.0.0.1: a real HTTP S3 endpoint, with the AWS variables set."""
    port = free_port()
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing-key-id",
           "AWS_SECRET_ACCESS_KEY": "testing-secret-key-123", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the moto server; yields its s3:// URI."""
    import boto3

    name = "kiln-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def digits_data():
    """(pngs, labels) of scikit-learn's digits at 28x28."""
    return embedded.digits(28)


@pytest.fixture(scope="session")
def digits_files(digits_data, tmp_path_factory):
    """The digits as a class-per-folder tar (train), a Parquet file (train) and the held-out
    test images, split 80/20."""
    pngs, labels = digits_data
    d = tmp_path_factory.mktemp("digits")
    train, test = embedded.split(len(pngs), 0.2, seed=1)
    pick = lambda idx, xs: [xs[i] for i in idx]  # noqa: E731
    return {
        "tar": embedded.write_class_tar(d / "train.tar", pick(train, pngs), pick(train, labels)),
        "parquet": embedded.write_image_parquet(d / "train.parquet", pick(train, pngs),
                                                pick(train, labels)),
        "test_images": pick(test, pngs),
        "test_labels": pick(test, labels),
        "dir": d,
    }
