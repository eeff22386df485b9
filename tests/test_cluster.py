"""Many nodes and object storage end to end: a head and two worker nodes from
ray.cluster_utils.Cluster, checkpoints and data on a moto S3 server, nodes removed mid-run."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pyarrow.parquet as pq
import pytest

from kiln import compat, embedded
from kiln.cluster.connect import ensure_token_auth
from kiln.pipelines import storage
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def upload(local: str, uri: str) -> str:
    with open(local, "rb") as f:
        storage.write_bytes(uri, f.read())
    return uri


@pytest.fixture
def cluster(s3_server):
    """A head (no CPUs: work lands on the workers) and two one-CPU worker nodes."""
    from ray.cluster_utils import Cluster

    ensure_token_auth()
    # Cluster() records the head's address in Ray's default temp dir, which a fresh machine
    # (where every other Ray here has its own temp dir) does not have yet.
    os.makedirs(os.path.dirname(compat.ray_address_file()), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="kc-", dir="/tmp")
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_port": free_port(),
        "temp_dir": tmp, "object_store_memory": 200 * 1024 * 1024})
    workers = [c.add_node(num_cpus=1, object_store_memory=200 * 1024 * 1024) for _ in range(2)]
    yield c, workers
    c.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def kiln(address: str, *args) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address}
    return subprocess.Popen([sys.executable, "-m", "kiln", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the job ended early:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_training_survives_losing_a_node(cluster, s3_bucket, digits_files):
    c, workers = cluster
    tar = upload(str(digits_files["tar"]), f"{s3_bucket}/data/digits.tar")
    run = f"{s3_bucket}/runs/multi"
    proc = kiln(c.address, "train", "cnn", "--data", tar, "--out", run, "--epochs", "4",
                "--batch-size", "32", "--workers", "2")
    metrics = f"{run}/metrics.jsonl"
    wait_for(lambda: storage.exists(metrics), proc)
    c.remove_node(workers[1])  # one training worker goes with it
    c.add_node(num_cpus=1, object_store_memory=200 * 1024 * 1024)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    epochs = [json.loads(x)["epoch"] for x in storage.read_bytes(metrics).decode().splitlines()]
    assert epochs == [1, 2, 3, 4]  # finished from the last checkpoint: nothing lost or repeated
    assert storage.exists(f"{run}/model/config.json")


def test_labeling_survives_losing_a_node(cluster, digits_data, tmp_path):
    c, workers = cluster
    pngs, _ = digits_data
    names = [f"img/{i:05d}.png" for i in range(6000)]
    tar = embedded.write_flat_archive(tmp_path / "many.tar", [pngs[i % len(pngs)] for i in
                                                              range(6000)], names)
    from kiln.models import CNNSpec, build_model, model_to_bytes

    spec = CNNSpec("mnist_cnn", [str(i) for i in range(10)])
    storage.save_model(str(tmp_path / "model"),
                       model_to_bytes(build_model("cnn", spec), "cnn", spec))
    out = tmp_path / "labels"
    proc = kiln(c.address, "label", "--model", str(tmp_path / "model"), "--input", str(tar),
                "--output", str(out), "--batch-size", "64")
    wait_for(lambda: out.exists() and any(out.glob("part-*.parquet")), proc)
    c.remove_node(workers[1])
    c.add_node(num_cpus=1, object_store_memory=200 * 1024 * 1024)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    paths = [p for f in out.glob("part-*.parquet") for p in pq.read_table(f)["path"].to_pylist()]
    assert sorted(paths) == names  # each input exactly once
