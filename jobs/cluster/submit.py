"""Runs kiln commands on a Ray cluster through Ray Jobs: `kiln submit`, `status`, `logs`, `stop`
and `list`. The job's driver runs on the cluster with the kiln project as its working_dir and
its code as the py_module kiln, so the cluster runs the same kiln code as the machine that
submitted it.

The address is the dashboard's HTTP address (`ray dashboard cluster.yaml` forwards it to
http://127.0.0.1:8265). Token authentication stays on: the client sends the token that Ray finds
in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from kiln import compat
from kiln.cluster.connect import forwarded_credentials
from kiln.options import SubmitOptions
from kiln.redact import redact

# Where each part of the import package kiln lives in the project (pyproject.toml's
# package-dir): jobs/ is kiln itself, models/ and pipelines/ its sub-packages.
PACKAGE_DIRS = {".": "jobs", "models": "models", "pipelines": "pipelines"}
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# gitignore patterns, relative to the project root. Ray also honours .gitignore and .rayignore,
# but a copy of the project need not have them. Data and models belong on s3://, not in the
# upload: a path on this machine means nothing on a cluster, and Ray caps the upload at a few
# hundred MiB.
EXCLUDES = [".venv", "venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache",
            "*.egg-info", "*.pyc", "/build", "/demo-output", "/bench/out", "/out", "*.parquet",
            "*.tar", "*.tar.gz", "*.tgz", "*.zip", "*.safetensors"]


class ClusterError(ValueError):
    """The cluster could not be reached, refused the token, or has no such job. A ValueError so
    that the CLI prints it as one line."""


class JobFailed(ValueError):
    """A job waited on ended FAILED or STOPPED."""


def _say(message: str) -> None:
    """Status lines go to stderr; stdout holds the job id and the job's own output."""
    print(redact(message), file=sys.stderr, flush=True)


def _resolve_address(address: str | None) -> str:
    return (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or DEFAULT_ADDRESS)


def _require_token() -> None:
    """A client needs the cluster's own token; a freshly generated one could never match, so
    unlike a local Ray this never generates one."""
    from kiln.cluster.connect import ensure_token_auth

    mode = os.environ.get("RAY_AUTH_MODE", "token").lower()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if mode == "token" and not os.environ.get("RAY_AUTH_TOKEN") and not os.path.exists(path):
        raise ClusterError(f"no Ray auth token at {path}: copy the cluster's token there "
                           "(`ray get-auth-token` on the head node prints it) or set "
                           "RAY_AUTH_TOKEN")
    ensure_token_auth()  # turns token mode on where Ray was imported before it was set


def _check_reachable(address: str) -> None:
    """Fails in seconds with a useful message, where requests would wait for the OS's connect
    timeout (minutes, for an address that drops packets)."""
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return  # a GCS address or "auto": Ray resolves the dashboard itself
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=10).close()
    except OSError as e:
        raise ClusterError(
            f"cannot reach a Ray dashboard at {address} ({e.strerror or e}). Is the cluster up? "
            "For a cluster from `ray up cluster.yaml`, keep `ray dashboard cluster.yaml` running "
            f"and use --address {DEFAULT_ADDRESS}") from None


@contextlib.contextmanager
def _clean_errors(address: str, job_id: str | None = None):
    """Turns Ray's connection, token and not-found errors into one line that says what to do."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError:
        raise ClusterError(f"the cluster at {address} refused the auth token: use the cluster's "
                           "token (`ray get-auth-token` on the head node) in ~/.ray/auth_token "
                           "or RAY_AUTH_TOKEN") from None
    except (ConnectionError, requests.RequestException, aiohttp.ClientError) as e:
        raise ClusterError(f"lost the connection to the Ray dashboard at {address}: {e}") from None
    except RuntimeError as e:
        if job_id and ("404" in str(e) or "does not exist" in str(e)):
            raise ClusterError(f"no job {job_id} on the cluster at {address}; `kiln list` shows "
                               "its jobs") from None
        if job_id and "WebSocket" in str(e):  # the dashboard went away mid-stream
            raise ClusterError(f"lost the log stream of {job_id} ({e}); the job itself may "
                               f"still run: `kiln logs --follow {job_id}` resumes") from None
        raise


def client(address: str | None):
    """A JobSubmissionClient for the dashboard at `address` (else RAY_API_SERVER_ADDRESS,
    RAY_ADDRESS, or the forwarded default)."""
    from ray.job_submission import JobSubmissionClient

    address = _resolve_address(address)
    _require_token()
    # Ray's client logs at INFO each file it skips in the upload and each log stream's end.
    for name in compat.RAY_QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    _check_reachable(address)
    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the argument; --address must win.
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        with _clean_errors(address):
            return JobSubmissionClient(address)
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def entrypoint(args: list[str]) -> str:
    """The shell command the job runs. A leading `kiln` becomes `python -m kiln`, which imports
    the uploaded kiln (kiln_package) whether or not the console script is on the cluster's
    PATH; any other command runs as given."""
    if not args:
        raise ValueError("give the command to run after --, e.g. "
                         "kiln submit -- kiln label --model ... --input ... --output ...")
    if args[0] == "kiln":
        args = ["python", "-m", "kiln", *args[1:]]
    return shlex.join(args)


def _is_project(path: Path) -> bool:
    return (path / "jobs" / "__main__.py").is_file() and (path / "pyproject.toml").is_file()


def working_dir(path: str | None) -> str | None:
    """The folder uploaded as the job's working_dir: `path` if it is a kiln project, else the
    source checkout this kiln runs from; None where kiln is installed as a package (the
    cluster then runs its own installed kiln)."""
    here = Path(path or ".").resolve()
    if _is_project(here):
        return str(here)
    own = Path(__file__).resolve().parents[2]  # jobs/cluster/submit.py
    return str(own) if _is_project(own) else None


@contextlib.contextmanager
def kiln_package(project: str | None):
    """The project's code as the import package kiln, laid out as pyproject.toml maps it
    (PACKAGE_DIRS), in a private temporary folder for Ray to upload as a py_module: on the
    cluster it comes before any kiln installed there, so the job runs the code that submitted
    it. Yields the py_modules entries: none where no project is uploaded."""
    if project is None:
        yield []
        return
    folder = tempfile.mkdtemp(prefix="kiln-code-")
    try:
        package = os.path.join(folder, "kiln")
        for inside, source in PACKAGE_DIRS.items():
            shutil.copytree(os.path.join(project, source), os.path.join(package, inside),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                            dirs_exist_ok=True)
        yield [package]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def runtime_env(opts: SubmitOptions, forwarded: dict | None = None,
                code: list[str] = ()) -> dict:
    """The job's runtime_env: the project as its working_dir, its code (kiln_package) and
    `forwarded` (connect.forwarded_credentials: the AWS variables, where the user asks) as
    py_modules. Its env_vars carry nothing secret: Ray logs and shows them."""
    env = dict(opts.env)
    env.setdefault("PYTHONUNBUFFERED", "1")  # so that `kiln logs --follow` sees lines as printed
    renv: dict = {"env_vars": env}
    modules = [*code, *(forwarded or {}).get("py_modules", [])]
    if modules:
        renv["py_modules"] = modules
    folder = working_dir(opts.working_dir)
    if folder:
        renv.update(working_dir=folder, excludes=list(EXCLUDES))
    return renv


def submit(opts: SubmitOptions) -> str:
    """Submits the job and prints its id; with opts.wait, follows its logs to the end and
    raises JobFailed unless it SUCCEEDED. Returns the job id."""
    command = entrypoint(opts.entrypoint)
    jc = client(opts.address)
    address = _resolve_address(opts.address)
    with (forwarded_credentials(opts.forward_credentials) as forwarded,
          kiln_package(working_dir(opts.working_dir)) as code, _clean_errors(address)):
        renv = runtime_env(opts, forwarded, code)
        job_id = jc.submit_job(
            entrypoint=command,
            runtime_env=renv,
            # None leaves Ray's default (the driver runs on the head, reserving nothing).
            entrypoint_num_cpus=opts.cpus or None,
            entrypoint_num_gpus=opts.gpus or None,
        )
    print(job_id, flush=True)
    where = renv.get("working_dir", "the cluster's installed kiln")
    _say(f"submitted {job_id} to {address}: {command}  (code: {where})")
    if not opts.wait:
        _say(f"follow it with: kiln logs --follow {job_id}")
        return job_id
    try:
        _follow(jc, job_id, address)
    except KeyboardInterrupt:
        _say(f"stopped following; {job_id} still runs. `kiln logs --follow {job_id}` resumes, "
             f"`kiln stop {job_id}` stops it")
        return job_id
    final = _wait_terminal(jc, job_id, address, timeout=60)
    with _clean_errors(address, job_id):
        info = jc.get_job_info(job_id)
    if final != "SUCCEEDED":
        # Ray's message carries the log's tail, which was just streamed: keep its first clause.
        why = (info.message or "").split(", last available logs")[0].splitlines()
        raise JobFailed(f"job {job_id} ended {final}: {why[0] if why else ''} "
                        f"(kiln logs {job_id} has its output)")
    _say(f"job {job_id} SUCCEEDED")
    return job_id


def _follow(jc, job_id: str, address: str) -> None:
    """Streams the job's output until it ends; Ray closes the stream at a terminal state."""

    async def tail() -> None:
        async for chunk in jc.tail_job_logs(job_id):
            sys.stdout.write(redact(chunk))
            sys.stdout.flush()

    with _clean_errors(address, job_id):
        asyncio.run(tail())


def _wait_terminal(jc, job_id: str, address: str, timeout: float) -> str:
    """The job's status once terminal, or its latest status after `timeout` seconds: the log
    stream can close a moment before the status is written."""
    deadline = time.monotonic() + timeout
    with _clean_errors(address, job_id):
        while True:
            now = str(jc.get_job_status(job_id))
            if now in TERMINAL or time.monotonic() > deadline:
                return now
            time.sleep(0.5)


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def status(job_id: str, address: str | None = None) -> str:
    """Prints the job's status, message, command and times; returns the status. The job's
    runtime_env is never printed: its env_vars hold the AWS credentials."""
    jc = client(address)
    with _clean_errors(_resolve_address(address), job_id):
        info = jc.get_job_info(job_id)
    rows = [("job", job_id), ("status", str(info.status)), ("message", info.message or ""),
            ("entrypoint", info.entrypoint), ("started", _when(info.start_time)),
            ("ended", _when(info.end_time))]
    for key, value in rows:
        print(redact(f"{key:<11}{value}"))
    return str(info.status)


def logs(job_id: str, address: str | None = None, follow: bool = False) -> None:
    """Prints the job's output so far; with follow, streams it until the job ends."""
    jc = client(address)
    address = _resolve_address(address)
    if follow:
        with _clean_errors(address, job_id):
            jc.get_job_status(job_id)  # an unknown id: a clear error, not a failed stream
        with contextlib.suppress(KeyboardInterrupt):
            _follow(jc, job_id, address)
        return
    with _clean_errors(address, job_id):
        text = jc.get_job_logs(job_id)
    sys.stdout.write(redact(text))
    sys.stdout.flush()


def stop(job_id: str, address: str | None = None, timeout: float = 60) -> str:
    """Asks Ray to stop the job (SIGTERM, then SIGKILL after Ray's grace period) and waits for
    it to end; returns its final status."""
    jc = client(address)
    address = _resolve_address(address)
    with _clean_errors(address, job_id):
        running = jc.stop_job(job_id)
    if not running:
        final = _wait_terminal(jc, job_id, address, timeout=0)
        _say(f"job {job_id} had already ended: {final}")
        return final
    final = _wait_terminal(jc, job_id, address, timeout)
    _say(f"job {job_id} {final}" if final in TERMINAL else
         f"job {job_id} is still {final} after {timeout:.0f} s; `kiln status {job_id}` follows it")
    return final


def list_jobs(address: str | None = None) -> list[dict]:
    """Prints the cluster's jobs, oldest first; returns them as dicts (no runtime_env)."""
    jc = client(address)
    with _clean_errors(_resolve_address(address)):
        jobs = sorted(jc.list_jobs(), key=lambda j: j.start_time or 0)
    rows = [{"id": j.submission_id or j.job_id or "-", "status": str(j.status),
             "started": _when(j.start_time), "entrypoint": j.entrypoint or ""} for j in jobs]
    if not rows:
        _say(f"no jobs on the cluster at {_resolve_address(address)}")
        return rows
    width = max(len(r["id"]) for r in rows)
    print(f"{'JOB':<{width}}  {'STATUS':<9}  {'STARTED':<19}  ENTRYPOINT")
    for r in rows:
        command = r["entrypoint"] if len(r["entrypoint"]) <= 70 else r["entrypoint"][:67] + "..."
        print(redact(f"{r['id']:<{width}}  {r['status']:<9}  {r['started']:<19}  {command}"))
    return rows
