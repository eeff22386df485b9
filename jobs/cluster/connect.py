"""The Ray connection: an embedded local Ray by default (bounded object store, its own short
temp dir, quiet logs), or a running cluster named by --address / RAY_ADDRESS. Token
authentication stays on either way."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass

from kiln import compat

DEFAULT_OBJECT_STORE_MB = 1536
RAY_DATA_LOGGING = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "ray_data_logging.yaml")


def quiet_ray_data_logs() -> None:
    """Ray Data's INFO notes stay in its log file, off the console, in this process (if
    ray.data is not imported yet) and in the local Ray's workers, which inherit the variable."""
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", RAY_DATA_LOGGING)


@dataclass
class RayOptions:
    address: str | None = None  # None: RAY_ADDRESS, else a local Ray for this command
    forward_credentials: bool = False  # a cluster's processes get this shell's AWS variables
    object_store_mb: int | None = None  # local Ray; None: KILN_OBJECT_STORE_MB, else 1536
    include_dashboard: bool = False
    log_to_driver: bool = False  # workers' output on this console (--debug); else only in
    # the session's log files (logs_dir())


def aws_variables() -> dict[str, str]:
    """This shell's AWS settings (every AWS_ variable: the S3 ones of pipelines.storage, and
    AWS_PROFILE, AWS_CA_BUNDLE and the like), for processes on a cluster."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_") and v}


@contextlib.contextmanager
def forwarded_credentials(forward: bool):
    """The runtime_env entries that carry this shell's AWS variables to a cluster's processes,
    where the user asks for it (--forward-credentials); {} otherwise: a cluster uses its own
    credentials (an instance role), as Ray's docs advise. Never env_vars, which Ray's runtime
    env agent logs and its job table and dashboard show: a py_modules package (a private
    temporary folder, gone once Ray has uploaded it), which Ray stores and unpacks on each
    node but never prints; pipelines.s3.apply_forwarded reads it there."""
    from kiln.pipelines.s3 import FORWARD_MODULE

    env = aws_variables()
    if not forward or not env:
        yield {}
        return
    folder = tempfile.mkdtemp(prefix="kiln-fwd-")  # mode 0700
    try:
        package = os.path.join(folder, FORWARD_MODULE)
        os.mkdir(package, 0o700)
        with open(os.path.join(package, "__init__.py"), "w") as f:
            f.write('"""AWS settings forwarded by kiln (read by pipelines.storage)."""\n')
        fd = os.open(os.path.join(package, "env.json"), os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(env, f)
        yield {"py_modules": [package]}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def ensure_token_auth() -> None:
    """Ray 2.60 turns token auth on for local clusters; say so up front (no warning), and give
    a client the token file if it has none, as `ray get-auth-token --generate` would."""
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        compat.reread_ray_config()  # Ray read its config at import: make it see token mode
    if os.environ["RAY_AUTH_MODE"].lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if not os.path.exists(path):
        compat.generate_auth_token()


def _quiet_data_context() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # kiln prints its own progress
    ctx.print_on_execution_start = False
    with contextlib.suppress(AttributeError):
        ctx.enable_operator_progress_bars = False


@contextlib.contextmanager
def ray_session(opts: RayOptions | None = None):
    """Connects for the duration of a command; a local Ray started here stops with it. Unless
    opts.log_to_driver (--debug), what Ray itself writes to this process's stderr (its C++
    core's lines, its loggers) goes to console_log() instead, and kiln's own lines still reach
    the terminal."""
    import ray

    opts = opts or RayOptions()
    ensure_token_auth()
    quiet_ray_data_logs()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from kiln.pipelines.s3 import secrets_in_a_file

    if ray.is_initialized():  # tests and notebooks bring their own
        _quiet_data_context()
        with secrets_in_a_file():
            yield
        return
    with contextlib.ExitStack() as stack:
        if not opts.log_to_driver:
            stack.enter_context(native_stderr_to(console_log()))
        if not (opts.address or os.environ.get("RAY_ADDRESS")):
            stack.enter_context(local_train_env())
        _init(ray, opts)
        stack.callback(ray.shutdown)
        stack.enter_context(secrets_in_a_file())  # out of what Ray logs or pickles from here
        _quiet_data_context()
        yield


# Ray Train's settings for a local Ray that kiln starts itself: no node of it can be
# preempted, so no preemption watcher (one more actor process a run, seconds of its start on
# a small machine), and workers polled every 0.5 s rather than 2 s, so that a run's end is
# seen sooner. Set before Ray starts, so that its processes (kiln tune's trials, which build
# their own trainers) have them too; values the user set stay.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                   "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


@contextlib.contextmanager
def local_train_env():
    """LOCAL_TRAIN_ENV in this process's environment for the session, then as it was."""
    added = [k for k in LOCAL_TRAIN_ENV if k not in os.environ]
    os.environ.update({k: LOCAL_TRAIN_ENV[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def check_address(address: str | None) -> None:
    """A Ray Jobs (dashboard) URL is what `kiln submit --address` takes, and what Ray's own
    job CLI reads from RAY_ADDRESS; a command that joins the cluster itself needs the GCS
    address (Ray answered such a URL with `ValueError: 2`). A Ray the caller started itself
    (a notebook, a test) is used as it is, whatever the address says."""
    ray = sys.modules.get("ray")  # not imported here for this: in-process jobs never need it
    if ray is not None and ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.split("://", 1)[0].lower() in ("http", "https"):
        raise ValueError(
            f"--address {address} (or RAY_ADDRESS) is a Ray Jobs URL, which kiln submit "
            "takes; this command joins the cluster itself and needs its GCS address "
            "(HEAD:6379). Or run it there: kiln submit --address URL -- kiln ...")


def _init(ray, opts: RayOptions) -> None:
    check_address(opts.address)
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster's workers do not have this shell's S3 settings: hand them over (a Ray Job's
        # driver already runs inside the job's runtime_env, which kiln submit fills).
        # A cluster's processes use the cluster's own credentials, or, where the user asks,
        # this shell's (forwarded_credentials). A Ray Job's driver already runs inside the
        # job's runtime_env, which kiln submit filled.
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        with forwarded_credentials(opts.forward_credentials and not in_job) as renv:
            ray.init(address=address, logging_level=logging.WARNING,
                     log_to_driver=opts.log_to_driver, runtime_env=renv or None)
        return
    store_mb = opts.object_store_mb or int(os.environ.get("KILN_OBJECT_STORE_MB",
                                                          DEFAULT_OBJECT_STORE_MB))
    ray.init(
        address="local",
        object_store_memory=store_mb * 1024 * 1024,
        _temp_dir=TEMP_DIR,
        include_dashboard=opts.include_dashboard,
        logging_level=logging.WARNING,
        log_to_driver=opts.log_to_driver,
        # Workers import kiln from the same interpreter; no runtime_env upload is needed.
    )


TEMP_DIR = os.path.join(tempfile.gettempdir(), f"kiln-ray-{os.getuid()}")


def console_log() -> str:
    """Where Ray's own console output goes in a command without --debug."""
    os.makedirs(TEMP_DIR, exist_ok=True)
    return os.path.join(TEMP_DIR, "console.log")


class Terminal(io.TextIOBase):
    """kiln's own console stream: stderr as the command started, even while Ray's output is
    sent to a log file (native_stderr_to). kiln's Rich consoles write here."""

    stream = None  # the terminal's stream while stderr is redirected

    def write(self, text: str) -> int:
        return (Terminal.stream or sys.stderr).write(text)

    def flush(self) -> None:
        (Terminal.stream or sys.stderr).flush()

    def isatty(self) -> bool:
        return (Terminal.stream or sys.stderr).isatty()

    def fileno(self) -> int:
        return (Terminal.stream or sys.stderr).fileno()


def console(**kwargs):
    """A Rich console on the terminal's stderr (Terminal), with kiln's settings."""
    from rich.console import Console

    return Console(file=Terminal(), soft_wrap=True, **kwargs)


# Lines Ray writes on every run that ask nothing of the user: the C++ core's note on actor
# restarts (ray#53727), Train V2's placement-group watcher without a dashboard, and the
# raylet's count of worker processes (kiln tune's trials are many small actors).
ROUTINE = ("constructor arguments in the object store", "Failed to query Ray Train Controller",
           "PYTHON worker processes have been started")


@contextlib.contextmanager
def native_stderr_to(path: str):
    """Points file descriptor 2 at `path` for the duration: Ray's C++ core, its loggers and
    anything else writing to stderr go there; kiln's consoles keep the terminal (Terminal).
    Warnings and errors among them (but the routine ones) are counted on the terminal at the
    end, with the file's name, so that none a user must act on goes unseen."""
    sys.stderr.flush()
    start = os.path.getsize(path) if os.path.exists(path) else 0
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        terminal = os.dup(2)
    except OSError:
        os.close(log)
        raise
    Terminal.stream = open(terminal, "w", buffering=1, encoding=sys.stderr.encoding,  # noqa: SIM115
                           errors="backslashreplace", closefd=False)
    os.dup2(log, 2)
    os.close(log)
    try:
        yield
    finally:
        sys.stderr.flush()
        Terminal.stream.flush()
        os.dup2(terminal, 2)
        os.close(terminal)
        Terminal.stream = None
        notes = warnings_in(path, start)
        if notes:
            print(f"note: Ray wrote {notes} warning(s) or error(s) to {path}", file=sys.stderr)


def warnings_in(path: str, start: int) -> int:
    """Warning and error lines written to `path` past byte `start`, the routine ones left out."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return 0
    pattern = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b| [EWF] \d+ \d+\]|Warning:")
    return sum(1 for line in text.splitlines()
               if pattern.search(line) and not any(r in line for r in ROUTINE))


def logs_dir() -> str | None:
    """The log folder of this process's Ray session (where every worker's output is kept),
    or None without one."""
    ray = sys.modules.get("ray")
    return compat.session_logs_dir() if ray is not None and ray.is_initialized() else None
