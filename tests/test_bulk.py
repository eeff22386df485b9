"""kiln.pipelines.bulk's ways to run a job's tasks without Ray: threads of this process, and worker
processes forked from it (what `kiln generate` samples in), with their errors and ends."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kiln.pipelines.bulk import (
    can_fork,
    pack,
    run_in_processes,
    run_in_threads,
    short_switch_interval,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not can_fork(), reason="forks worker processes (Linux)")


def finish_here(task, result):
    yield {"task": task, "result": result, "finished_in": os.getpid()}


def test_workers_compute_and_this_process_finishes_every_task_once():
    tasks = [pack(i) for i in range(7)]
    got = list(run_in_processes(lambda t: (t * t, os.getpid()), finish_here, tasks, 2))
    assert sorted(g["task"] for g in got) == list(range(7))
    assert all(g["result"][0] == g["task"] ** 2 for g in got)
    workers = {g["result"][1] for g in got}
    assert os.getpid() not in workers and 1 <= len(workers) <= 2
    assert {g["finished_in"] for g in got} == {os.getpid()}  # the I/O stays here
    assert not multiprocessing.active_children()


def test_one_task_or_one_worker_runs_in_this_process():
    for tasks, workers in (([pack(3)], 2), ([pack(1), pack(2)], 1)):
        got = list(run_in_processes(lambda t: os.getpid(), finish_here, tasks, workers))
        assert {g["result"] for g in got} == {os.getpid()}
    assert [s["rows"] for s in run_in_threads(lambda t: iter([{"rows": t}]), [pack(4)], 2)] \
        == [4]


def test_an_error_in_a_worker_is_raised_here_and_the_workers_end():
    def compute(t):
        if t == 3:
            raise ValueError(f"bad block {t}")
        return t

    with pytest.raises(ValueError, match="bad block 3") as raised:
        list(run_in_processes(compute, finish_here, [pack(i) for i in range(6)], 2))
    assert "in worker process" in "".join(raised.value.__notes__)  # where, for --debug
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not multiprocessing.active_children()


def test_a_worker_that_dies_is_an_error_not_a_hang():
    def compute(t):
        if t == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
        return t

    with pytest.raises(RuntimeError, match="worker process died"):
        list(run_in_processes(compute, finish_here, [pack(i) for i in range(4)], 2))
    assert not multiprocessing.active_children()


def test_killing_the_command_ends_its_workers(tmp_path):
    """kill -9 of the parent alone: its workers stop too, instead of stepping on unseen."""
    pids = tmp_path / "pids"
    code = textwrap.dedent(f"""
        import os, sys, time
        from kiln.pipelines.bulk import pack, run_in_processes

        def compute(t):
            with open({str(pids)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(120)

        list(run_in_processes(compute, lambda t, r: iter(()), [pack(i) for i in range(4)], 2))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while len(pids.read_text().split() if pids.exists() else []) < 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        workers = [int(p) for p in pids.read_text().split()]
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in workers):
            assert time.monotonic() < deadline, "a worker outlived its parent"
            time.sleep(0.05)
    finally:
        proc.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


def test_the_switch_interval_is_short_while_tasks_run_and_the_callers_after():
    """Labeling's short GIL switch interval lasts while any of a process's tasks runs, however
    the threads' tasks overlap, and the caller's own interval comes back after the last."""
    before = sys.getswitchinterval()
    first, second = short_switch_interval(), short_switch_interval()
    first.__enter__()
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    second.__enter__()
    first.__exit__(None, None, None)  # the first task ends while the second still runs
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    second.__exit__(None, None, None)
    assert sys.getswitchinterval() == before


def test_one_executor_per_job_chosen_from_its_placement():
    """Here on a small machine: threads, or forked processes for an actor that splits its
    work (sampling), unless one task leaves nothing to share; on Ray for a cluster, --actors
    or --gpu."""
    from kiln.bulk.executors import Processes, RayData, Threads, choose
    from kiln.cluster.placement import Placement
    from kiln.pipelines.generate import Generator
    from kiln.pipelines.label import LabelPredictor

    small = Placement(cluster=False, cpus=2)
    threads = choose(small, LabelPredictor, tasks=10, work=100, rate_per_cpu=1.0)
    assert type(threads) is Threads and threads.workers == 2
    assert type(choose(small, Generator, 10, 100, 1.0)) is Processes
    assert type(choose(small, Generator, 1, 100, 1.0)) is Threads
    for where in (Placement(cluster=True, cpus=2), Placement(cluster=False, cpus=2, actors=2),
                  Placement(cluster=False, cpus=2, gpu=True)):
        assert type(choose(where, Generator, 10, 100, 1.0)) is RayData


def test_the_executors_here_run_one_actor_class_to_the_same_stats():
    """Threads compute and write in this process; forked processes compute, and this process
    writes what they computed."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from kiln.bulk.executors import Processes, Threads
    from kiln.pipelines.bulk import BulkActor

    class Squares(BulkActor):
        forks = True

        def __init__(self, settings, loaded):
            self.threads = settings.threads  # one torch thread each, as a pool's actors

        def compute(self, task):
            return task * task, os.getpid()

        def finish(self, task, result):
            yield {"part": str(task), "rows": result[0], "computed_in": result[1],
                   "written_in": os.getpid(), "threads": self.threads}

    job = SimpleNamespace(verb="squaring", loaded=SimpleNamespace(id="m"), actor=Squares,
                          settings=lambda out, layout: layout)
    tasks = [pack(i) for i in range(6)]
    log = io.StringIO()
    here = list(Threads(2).run(job, None, tasks, Console(file=log)))
    forked = list(Processes(2).run(job, None, tasks, Console(file=log)))
    rows = lambda stats: sorted((s["part"], s["rows"], s["threads"]) for s in stats)  # noqa: E731
    assert rows(here) == rows(forked) == [(str(i), i * i, 1) for i in range(6)]
    assert all(s["computed_in"] == s["written_in"] == os.getpid() for s in here)
    assert all(s["computed_in"] != os.getpid() == s["written_in"] for s in forked)
    assert "squaring 6 unit(s) in this process on 2 thread(s) with m" in log.getvalue()
    assert "in 2 processes forked from this one" in log.getvalue()
