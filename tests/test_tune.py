"""`kiln tune`: its search spaces and plan (no Ray), and searches on a local Ray: the best
trial exported, ASHA's early stops and the workers they free, a killed search resumed on S3."""

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from kiln.cluster import connect
from kiln.options import TrainOptions, TuneOptions
from kiln.pipelines import s3, storage
from kiln.tune.job import run_tune
from kiln.tune.space import Choice, Range, parse_space, plan_trials, trial_ids


def test_a_value_a_list_and_a_range():
    assert parse_space("lr", "0.01", float) == 0.01
    assert parse_space("batch_size", "32, 64,32", int) == Choice((32, 64))  # repeats dropped
    assert parse_space("batch_size", "64,", int) == 64  # one value is no space
    assert parse_space("lr", "1e-4:1e-2:log", float) == Range(1e-4, 1e-2, log=True)
    assert parse_space("cell", "lstm,gru", str) == Choice(("lstm", "gru"))
    hidden = parse_space("hidden", "64:512:log", int)
    assert [hidden.at(u) for u in (0.0, 0.5, 0.999)] == [64, 181, 511]


@pytest.mark.parametrize("name,text,kind,message", [
    ("lr", "1e-2:1e-4", float, "low end must be below its high end"),
    ("lr", "0:1e-2:log", float, "a log range must be positive"),
    ("lr", "1e-4:1e-2:ln", float, "a range is LOW:HIGH or LOW:HIGH:log"),
    ("batch_size", "32,6x4", int, "--batch-size: '6x4' is not an integer"),
    ("dropout", "a:b", float, "--dropout: 'a' is not a number"),
    ("arch", "resnet8:resnet20", str, "--arch takes a value or a list"),
])
def test_a_bad_space_names_its_option(name, text, kind, message):
    with pytest.raises(ValueError, match=message):
        parse_space(name, text, kind)


def test_lists_alone_are_a_grid_in_full_or_sampled_without_repeats():
    spaces = {"lr": Choice((1e-3, 1e-2)), "batch_size": Choice((32, 64, 128))}
    grid = plan_trials(spaces, None, seed=0)
    assert len(grid) == 6 and len({tuple(p.values()) for p in grid}) == 6
    assert plan_trials(spaces, 10, seed=0) == grid  # no trial run twice
    assert plan_trials(spaces, None, seed=1) != grid  # in an order of the seed's
    four = plan_trials(spaces, 4, seed=0)
    assert len({tuple(p.values()) for p in four}) == 4 and all(p in grid for p in four)


def test_ranges_are_latin_hypercube_with_lists_drawn_evenly():
    spaces = {"lr": Range(1e-4, 1e-2, log=True), "hidden": Range(64, 512, integer=True),
              "cell": Choice(("lstm", "gru"))}
    plan = plan_trials(spaces, 8, seed=3)
    assert len(plan) == 8
    # Each eighth of the log range (and of the hidden range) holds exactly one trial.
    strata = sorted(int(8 * (math.log(p["lr"]) - math.log(1e-4)) / (math.log(1e-2) -
                                                                      math.log(1e-4)))
                    for p in plan)
    assert strata == list(range(8))
    assert sorted(int(8 * (p["hidden"] - 64) / 449) for p in plan) == list(range(8))
    assert all(isinstance(p["hidden"], int) for p in plan)
    assert sorted(p["cell"] for p in plan) == ["gru"] * 4 + ["lstm"] * 4
    assert plan_trials(spaces, 8, seed=3) == plan  # the seed fixes the plan
    assert plan_trials(spaces, 8, seed=4) != plan
    assert len(plan_trials({"lr": Range(1e-4, 1e-2)}, None, seed=0)) == 8  # the default


def test_a_plan_needs_a_space_and_a_trial():
    with pytest.raises(ValueError, match="nothing to search"):
        plan_trials({}, None, 0)
    with pytest.raises(ValueError, match="--trials must be at least 1"):
        plan_trials({"lr": Range(1e-4, 1e-2)}, 0, 0)
    assert trial_ids(3) == ["t00", "t01", "t02"] and trial_ids(101)[-1] == "t100"


def alive_train_actors() -> list:
    import ray
    from ray.util.state import list_actors

    here = ray.get_runtime_context().gcs_address  # this session's Ray, not another's
    return [a for a in list_actors(address=here, filters=[("state", "=", "ALIVE")], limit=1000)
            if "RayTrainWorker" in a.class_name or "TrainController" in a.class_name]


@pytest.mark.slow
def test_search_exports_the_best_trial_and_asha_frees_the_workers(ray_local, digits_files,
                                                                 tmp_path):
    """Four learning rates; seed 6 runs the two largest first, side by side: ASHA's first
    rung has both when the slow learners reach it, and stops them after their first epoch."""
    out = str(tmp_path / "search")
    train = TrainOptions("cnn", str(digits_files["tar"]), out, epochs=2, batch_size=64,
                         workers=1, seed=6)
    lrs = "3e-3,1e-3,3e-4,1e-4"
    summary = run_tune(TuneOptions(train, {"lr": lrs}, concurrent=2))
    rows = pq.read_table(f"{out}/trials.parquet").to_pylist()
    assert [r["trial"] for r in rows] == ["t00", "t01", "t02", "t03"]
    assert [r["lr"] for r in rows] == [3e-3, 1e-3, 3e-4, 1e-4]  # the plan's order
    assert len({r["best"] for r in rows}) >= 3  # the trials differ
    best = max(rows, key=lambda r: (r["best"], -r["val_loss"]))
    assert summary["best"] == best["trial"]
    exported = storage.read_model_config(out)
    assert exported["tune"]["trial"] == best["trial"]
    assert exported["metrics"]["val_accuracy"] == best["best"]
    trial_model = f"{out}/trials/{best['trial']}/model/weights.safetensors"
    assert storage.read_bytes(f"{out}/model/weights.safetensors") == \
        storage.read_bytes(trial_model)
    assert storage.load_model(out).kind == "cnn"  # label and info take the search folder

    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and all(r["epochs"] < 2 for r in stopped), rows
    assert all(r["status"] in ("finished", "stopped early") for r in rows)
    # Every trial's workers are gone and their CPUs back (ASHA stops them in Tune; Ray
    # Train's controller, owned by the trial, takes its workers and placement group along).
    pids = [r["worker_pid"] for r in rows]
    assert all(pids) and not any(psutil.pid_exists(p) for p in pids)
    deadline = time.monotonic() + 30
    while ray_local.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_local.available_resources().get("CPU", 0) == 2
    assert alive_train_actors() == []
    assert storage.read_bytes(f"{out}/tune.png")[:4] == b"\x89PNG"

    with pytest.raises(ValueError, match="already holds a search"):
        run_tune(TuneOptions(train, {"lr": lrs}))
    other = TrainOptions("cnn", str(digits_files["tar"]), out, epochs=2, batch_size=64,
                         workers=1, seed=6, resume=True)
    with pytest.raises(ValueError, match="searched with other spaces"):
        run_tune(TuneOptions(other, {"lr": "1e-3,1e-4"}, concurrent=2))


def kiln(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", "kiln", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.slow
def test_a_killed_search_on_s3_resumes_only_its_unfinished_trials(s3_bucket, digits_files):
    """The whole search on the moto endpoint, in its own kiln process and local Ray: killed
    (process group and Ray with it) while its second trial trains, then resumed."""
    tar = f"{s3_bucket}/digits.tar"
    storage.write_bytes(tar, digits_files["tar"].read_bytes())
    out = f"{s3_bucket}/search"
    args = ["tune", "cnn", "--data", tar, "--out", out, "--lr", "3e-3,1e-3", "--epochs", "2",
            "--batch-size", "64", "--concurrent", "1", "--scheduler", "fifo"]
    proc = kiln(*args)
    deadline = time.monotonic() + 400
    while not storage.exists(f"{out}/trials/t01/metrics.jsonl"):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the second trial never validated"
        time.sleep(1)
    first = storage.read_bytes(f"{out}/trials/t00/metrics.jsonl")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not storage.exists(f"{out}/trials.parquet")

    again = kiln(*args, "--resume")
    log, _ = again.communicate(timeout=600)
    assert again.returncode == 0, log[-3000:]
    assert "t01  started" in log and "t00  started" not in log, log  # t00 is not run again
    assert storage.read_bytes(f"{out}/trials/t00/metrics.jsonl") == first
    epochs = [json.loads(x)["epoch"] for x in
              storage.read_bytes(f"{out}/trials/t01/metrics.jsonl").decode().splitlines()]
    assert epochs == [1, 2]  # continued from its checkpoint: nothing repeated
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/trials.parquet"))).to_pylist()
    assert [r["status"] for r in table] == ["finished", "finished"]
    assert storage.exists(f"{out}/model/weights.safetensors")
    # The S3 secret is in no object of the search (Tune pickles its filesystem into its
    # state) and in no log of the search's Ray session (Tune copies AWS variables into each
    # trial's runtime_env, which Ray's runtime-env agent logs).
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    bucket, _ = s3.s3_bucket_key(out)
    client = s3.s3_client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.endswith("tuner.pkl") for k in keys)
    assert [k for k in keys
            if secret in client.get_object(Bucket=bucket, Key=k)["Body"].read()] == []
    logs = Path(connect.TEMP_DIR, "session_latest", "logs")
    assert [f for f in logs.rglob("*") if f.is_file() and secret in f.read_bytes()] == []
