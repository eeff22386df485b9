"""kiln submit/status/logs/stop/list against a real Ray head started with `ray start --head`
(token auth on, the dashboard on 127.0.0.1), run as a user runs them; plus the parts that need
no cluster."""

from __future__ import annotations

import hashlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kiln import embedded
from kiln.cluster.submit import (
    EXCLUDES,
    ClusterError,
    JobFailed,
    entrypoint,
    kiln_package,
    list_jobs,
    logs,
    runtime_env,
    status,
    stop,
    submit,
    working_dir,
)
from kiln.models import CNNSpec, build_model, model_to_bytes
from kiln.options import SubmitOptions
from kiln.pipelines import storage
from kiln.pipelines.s3 import FORWARD_MODULE
from tests.conftest import ROOT, free_port

BIN = Path(sys.executable).parent
SECRET = "kiln-test-secret-" + uuid.uuid4().hex[:12]
HEAD: dict = {}  # the head's temp dir (its session logs)


def kiln(*args, env=None, timeout=180):
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**base, **(env or {})})


def _kill_leftovers(marker: str) -> None:
    """Kills what `ray start --block` left behind: only processes of this head, found by its
    own temp dir in their command line (other Ray clusters run on this machine)."""
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd and int(pid) != me:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: held open together, so that the OS cannot hand one out twice."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for_dashboard(address: str, proc: subprocess.Popen, log: Path) -> None:
    from kiln.cluster.submit import ClusterError, client

    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited: {log.read_text()[-3000:]}")
        try:
            client(address)
            return
        except ClusterError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no dashboard at {address}: {log.read_text()[-3000:]}") from e
            time.sleep(1)


@pytest.fixture(scope="module")
def ray_head():
    """A one-node cluster as `ray start --head` makes it, with this venv's python on PATH (as
    cluster.yaml's setup puts kiln on the nodes' PATH). Yields the dashboard address."""
    from kiln.cluster.connect import ensure_token_auth

    ensure_token_auth()  # `ray start` with token auth needs ~/.ray/auth_token to exist
    temp = tempfile.mkdtemp(prefix="ksub-", dir="/tmp")  # short: Ray's socket paths are capped
    gcs, client_server, agent, dash = _free_ports(4)
    # The cluster's own credentials are none: what a job sees of AWS is what it is given.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    env.update(RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               # Idle workers started ahead of time are never used here (each job's driver needs
               # a worker with its runtime_env) and cost seconds of CPU on a shared machine.
               RAY_enable_worker_prestart="0")
    # Every port Ray would otherwise take at a fixed number is chosen free, so that this head
    # does not collide with other Ray clusters on the machine.
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--ray-client-server-port", str(client_server),
           "--dashboard-agent-listen-port", str(agent), "--include-dashboard=true",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           # 3 logical CPUs on a 2-core machine: the job's driver reserves one.
           "--num-cpus", "3", "--object-store-memory", str(300 * 1024 * 1024),
           "--temp-dir", temp, "--disable-usage-stats", "--include-log-monitor=false"]
    log = Path(temp) / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=temp, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    HEAD["temp"] = temp
    try:
        _wait_for_dashboard(address, proc, log)
        yield address
    finally:
        # --block: on SIGTERM Ray drains the node and stops its processes; a test need not
        # wait out the drain, so whatever is left after a few seconds is killed.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(8)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        _kill_leftovers(temp)
        subprocess.run(["rm", "-rf", temp], check=False)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """An untrained mnist_cnn saved as a run folder, and a small digit tar to label."""
    d = tmp_path_factory.mktemp("submit")
    pngs, labels = embedded.digits(28)
    spec = CNNSpec("mnist_cnn", [str(i) for i in range(10)], 1, 28)
    storage.save_model(str(d / "run" / "model"),
                       model_to_bytes(build_model("cnn", spec), "cnn", spec))
    tar = embedded.write_class_tar(d / "digits.tar", pngs[:60], labels[:60])
    return {"run": d / "run", "tar": tar, "n": 60, "dir": d}


def _label_exists() -> bool:
    try:
        return hasattr(importlib.import_module("kiln.bulk.label"), "run_label")
    except ModuleNotFoundError as e:
        if e.name != "kiln.bulk.label":
            raise  # jobs/bulk/label.py is there but broken: say so, do not fall back
        return False


def _job_id(stdout: str) -> str:
    first = stdout.strip().splitlines()[0]
    assert first.startswith("raysubmit_"), stdout
    return first


# ---------------------------------------------------------------- needs no cluster


def test_a_leading_kiln_runs_as_python_m_jobs():
    assert entrypoint(["kiln", "info", "runs/a b"]) == "python -m kiln info 'runs/a b'"
    assert entrypoint(["python", "-c", "print(1)"]) == "python -c 'print(1)'"
    with pytest.raises(ValueError, match="after --"):
        entrypoint([])


def test_runtime_env_uploads_the_project_and_no_aws_variable(monkeypatch):
    """The job's env_vars carry nothing of this shell's AWS settings, asked or not: Ray logs
    and shows env_vars. Forwarded, they travel as a private package, gone once uploaded."""
    from kiln.cluster.connect import forwarded_credentials

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    opts = SubmitOptions(["kiln", "info", "x"], env={"EXTRA": "1"})
    renv = runtime_env(opts)
    assert renv["working_dir"] == str(ROOT)
    assert {".venv", ".git", "/demo-output", "/bench/out", "*.parquet"} <= set(renv["excludes"])
    assert renv["env_vars"] == {"EXTRA": "1", "PYTHONUNBUFFERED": "1"}
    assert "py_modules" not in renv
    assert EXCLUDES == renv["excludes"]
    with forwarded_credentials(False) as none:
        assert none == {}
    with forwarded_credentials(True) as forwarded:
        renv = runtime_env(opts, forwarded)
        package = Path(renv["py_modules"][0])
        assert (package / "env.json").stat().st_mode & 0o077 == 0  # the user's alone
        assert SECRET in (package / "env.json").read_text() and SECRET not in str(renv)
    assert not package.exists()


def test_the_uploaded_code_is_the_kiln_package_as_installed():
    """kiln_package lays the project out as pyproject.toml maps it, without byte code, and
    removes its copy once Ray has it."""
    with kiln_package(str(ROOT)) as code:
        package = Path(code[0])
        assert package.name == "kiln" and (package / "__main__.py").is_file()
        assert (package / "models" / "cnn.py").is_file()
        assert (package / "pipelines" / "sources.py").is_file()
        assert not list(package.rglob("__pycache__"))
        renv = runtime_env(SubmitOptions(["kiln", "info", "x"]), code=code)
        assert renv["py_modules"] == [str(package)]
    assert not package.exists()
    with kiln_package(None) as none:
        assert none == []


def test_working_dir_falls_back_to_this_kiln_checkout(tmp_path):
    assert working_dir(str(tmp_path)) == str(ROOT)
    assert working_dir(str(ROOT / "jobs")) == str(ROOT)


def test_an_unreachable_address_is_one_clear_line():
    with pytest.raises(ClusterError, match="cannot reach a Ray dashboard"):
        status("raysubmit_x", f"http://127.0.0.1:{free_port()}")


# ---------------------------------------------------------------- on a real Ray head


def test_submit_runs_a_job_to_succeeded_with_status_logs_and_list(ray_head, small_model, capsys):
    if _label_exists():
        # `kiln label` exists: the "runs a label job".
        out = small_model["dir"] / "labels"
        # --cpus 0: `kiln label` sizes its actors from the cluster's total CPUs, so on one
        # node a driver that reserves a CPU (the default) leaves its actor no room.
        submit_args = ["--cpus", "0"]
        job = ["kiln", "label", "--model", str(small_model["run"]), "--input",
               str(small_model["tar"]), "--output", str(out), "--top-k", "2", "--actors", "1"]
    else:
        # SWITCH: until jobs/bulk/label.py has run_label, this submits `kiln info`; the branch
        # above takes over by itself once it does.
        out, submit_args = None, []
        job = ["kiln", "info", str(small_model["run"])]
    # The CLI, as a user runs it.
    res = kiln("submit", "--address", ray_head, *submit_args, "--", *job, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    job_id = _job_id(res.stdout)
    assert f"job {job_id} SUCCEEDED" in res.stderr

    assert status(job_id, ray_head) == "SUCCEEDED"
    logs(job_id, ray_head)
    shown = capsys.readouterr().out
    assert "SUCCEEDED" in shown
    if out is None:
        assert "mnist_cnn" in res.stdout and "mnist_cnn" in shown  # the model card
    else:
        assert "labeled" in shown  # its progress and totals lines
        parts = sorted(out.glob("*.parquet"))
        assert sum(pq.read_metadata(p).num_rows for p in parts) == small_model["n"]
    assert job_id in [row["id"] for row in list_jobs(ray_head)]


# A job that reports, from its driver and from a Ray task on the cluster, a hash of the S3
# secret that kiln's storage sees there; then lists its working_dir and exits 3.
SEES = ("import os, sys, hashlib, ray, kiln; from kiln.pipelines import s3\n"
        "def seen():\n"
        "    s = s3._s3_settings()[5] or ''\n"
        "    return hashlib.sha256(s.encode()).hexdigest()[:16]\n"
        "ray.init()\n"
        "print('driver-sees', seen()); print('task-sees', ray.get(ray.remote(seen).remote()))\n"
        "print('cwd-has', sorted(os.listdir('.'))); print('kiln-from', kiln.__file__)\n"
        "sys.exit(3)")


def _sees(out: str, who: str) -> str:
    return next(line.split()[1] for line in out.splitlines() if line.startswith(who))


def test_secrets_reach_a_cluster_only_when_asked_and_never_its_logs(ray_head, monkeypatch,
                                                                    capfd):
    """On a real cluster: a job gets this shell's AWS secret only with --forward-credentials,
    in its driver and its tasks alike; and then no log file of the cluster's session, no
    job table entry (runtime_env, entrypoint, message) and no kiln output shows it. Each job
    also fails (exit 3): submit says so."""
    from kiln.cluster.submit import client

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "kiln-test-key-id")
    digest = hashlib.sha256(SECRET.encode()).hexdigest()[:16]
    seen = {}
    for forward in (False, True):
        with pytest.raises(JobFailed, match="FAILED") as failed:
            submit(SubmitOptions(["python", "-c", SEES], ray_head, cpus=0,
                                 forward_credentials=forward))
        job_id = str(failed.value).split()[1]
        assert status(job_id, ray_head) == "FAILED"
        logs(job_id, ray_head)
        list_jobs(ray_head)
        shown = capfd.readouterr()
        seen[forward] = (_sees(shown.out, "driver-sees"), _sees(shown.out, "task-sees"))
        assert SECRET not in shown.out + shown.err + str(failed.value)
        info = client(ray_head).get_job_info(job_id)
        assert SECRET not in repr(info) and SECRET not in str(info.runtime_env)
    assert seen[True] == (digest, digest)
    assert digest not in seen[False]
    listing = next(line for line in shown.out.splitlines() if line.startswith("cwd-has"))
    assert "'jobs'" in listing and "'pyproject.toml'" in listing
    # the job's kiln is the uploaded copy of this project's code, not one installed there
    uploaded = Path(_sees(shown.out, "kiln-from"))
    assert uploaded.parent.name == "kiln" and not uploaded.is_relative_to(ROOT)
    assert "'.venv'" not in listing and "'.git'" not in listing
    found = []
    for root, _, files in os.walk(HEAD["temp"]):
        for name in files:
            try:
                if SECRET.encode() in Path(root, name).read_bytes():
                    found.append(os.path.join(root, name))
            except OSError:
                continue
    # Ray keeps the uploaded package itself (its store and its unpacked copy on the node):
    # the one place the secret is meant to be, a file no log or page shows.
    assert [f for f in found if f"/{FORWARD_MODULE}/" not in f and "_ray_pkg_" not in f] == []


def test_stop_stops_a_long_job(ray_head, capsys):
    marker = "kiln-long-" + uuid.uuid4().hex[:8]
    code = f"import time; print('{marker} started', flush=True); time.sleep(600)"
    job_id = submit(SubmitOptions(["python", "-c", code], ray_head, cpus=0, wait=False))
    deadline = time.monotonic() + 90
    while True:
        logs(job_id, ray_head)
        if f"{marker} started" in capsys.readouterr().out:
            break
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.5)
    assert stop(job_id, ray_head) == "STOPPED"
    assert status(job_id, ray_head) == "STOPPED"
    # Its process is gone, not just marked stopped.
    deadline = time.monotonic() + 30
    while _running(marker):
        assert time.monotonic() < deadline, "the stopped job's process still runs"
        time.sleep(0.5)


def _running(marker: str) -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def test_an_unknown_job_is_one_clear_line(ray_head):
    for call in (lambda: status("raysubmit_doesnotexist", ray_head),
                 lambda: logs("raysubmit_doesnotexist", ray_head, follow=True),
                 lambda: stop("raysubmit_doesnotexist", ray_head)):
        with pytest.raises(ClusterError, match="no job raysubmit_doesnotexist"):
            call()


def test_ray_job_submit_runs_kiln_the_same(ray_head, small_model):
    """Ray's own CLI, with the kiln console script on the cluster's PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["RAY_AUTH_MODE"] = "token"
    res = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", ray_head,
                          "--working-dir", str(ROOT), "--", "kiln", "info",
                          str(small_model["run"])],
                         capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "mnist_cnn" in res.stdout and "succeeded" in res.stdout.lower()


@pytest.mark.slow
def test_submit_runs_a_search(ray_head, small_model):
    """kiln tune as a Ray Job: its trials on the cluster, its folder finished."""
    out = small_model["dir"] / "search"
    res = kiln("submit", "--address", ray_head, "--cpus", "0", "--", "kiln", "tune", "cnn",
               "--data", str(small_model["tar"]), "--out", str(out), "--lr", "1e-3,1e-2",
               "--epochs", "1", "--batch-size", "16", timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCEEDED" in res.stderr
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    assert [(r["trial"], r["lr"], r["status"]) for r in rows] == [
        ("t00", 1e-2, "finished"), ("t01", 1e-3, "finished")]  # the plan's order (seed 0)
    assert (out / "model" / "weights.safetensors").exists()
    assert "best trial" in res.stdout + res.stderr  # the search's own lines, in the job's log

