"""What `kiln label` and `kiln generate` share below the driver: a task is one slice of a
job's input (a source Unit to label, a block of prompts to sample), pickled so that Arrow
leaves its shape alone; an actor class (LabelPredictor, Generator) loads its model once and
turns a task into the stats of each Parquet part it writes. The same actor serves a Ray Data
actor pool (`bulk_dataset`) and, without Ray, the threads of the command's own process
(`run_in_threads`) or worker processes forked from it (`run_in_processes`), so the rows are
the same every way."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

_switch_lock = threading.Lock()
_switch = {"tasks": 0, "saved": 0.005}  # tasks running in this process; the interval before


@contextlib.contextmanager
def short_switch_interval(seconds: float = 0.0005):
    """Python's GIL switch interval, shortened while a task that decodes in threads runs: a
    decode thread holding the GIL would otherwise make the model thread wait a whole interval
    (5 ms by default) after each of its ops. Counted across the threads of a process, so that
    the process's own interval comes back once, when its last task ends."""
    with _switch_lock:
        if _switch["tasks"] == 0:
            _switch["saved"] = sys.getswitchinterval()
            sys.setswitchinterval(seconds)
        _switch["tasks"] += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch["tasks"] -= 1
            if _switch["tasks"] == 0:
                sys.setswitchinterval(_switch["saved"])


def pack(task) -> dict:
    """A task as a from_items row."""
    return {"task": pickle.dumps(task, protocol=5)}


def unpack(row: dict):
    """A from_items row back into its task. The rows are made by this job's own driver."""
    return pickle.loads(row["task"])


class BulkActor:
    """The part of the actor classes that Ray Data calls: every row of a batch is a task,
    and each part the task writes comes back as one small JSON stats row. An actor whose
    task splits into compute (no I/O) and finish (the writes) says so (`forks`), and may run
    in processes forked from the command (`run_in_processes`)."""

    forks = False

    def run_task(self, task) -> Iterator[dict]:
        if not self.forks:
            raise NotImplementedError
        return self.finish(task, self.compute(task))

    def compute(self, task):
        """The task's work alone: no file, socket or thread of this process is touched."""
        raise NotImplementedError

    def finish(self, task, result) -> Iterator[dict]:
        """Writes what compute() made of the task; yields the stats of each part."""
        raise NotImplementedError

    def __call__(self, batch: dict) -> Iterator[dict[str, list]]:
        for row in batch["task"]:
            for stats in self.run_task(pickle.loads(row)):
                yield {"stats": [json.dumps(stats)]}


@dataclass
class Layout:
    """How an actor pool sits on the cluster."""

    actors: int
    num_cpus: float  # per actor; fractional so Ray Data's own tasks never starve
    num_gpus: float
    threads: int  # torch threads per actor
    decode_threads: int  # labeling: background decode threads per actor


def bulk_dataset(actor: type, settings, tasks: list[dict], layout: Layout):
    """The Ray Data pipeline: a block per task, a pool of `layout.actors` actors. Each actor
    takes one task at a time (two in flight) so that no task waits in one actor's queue while
    another actor idles at the end."""
    import ray.data

    ds = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
    return ds.map_batches(
        actor,
        fn_constructor_args=(settings,),
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=layout.actors, max_tasks_in_flight_per_actor=2),
        num_cpus=layout.num_cpus,
        num_gpus=layout.num_gpus,
    )


def stats_rows(ds) -> Iterator[dict]:
    """The stats of every part the pool writes, as they come."""
    return (json.loads(row["stats"]) for row in ds.iter_rows())


def run_in_threads(run_task: Callable[[object], Iterator[dict]], tasks: list[dict],
                   workers: int) -> Iterator[dict]:
    """`run_task` over every task on `workers` threads of this process, each taking the next
    task as it finishes one, as the actors of a pool do; yields the stats of each part as it
    is written. The models' kernels and the decoders release the GIL, so on one torch thread
    each the threads keep as many cores busy. An error in any thread stops the others (at
    their next part) and is raised here; so is a consumer's Ctrl-C."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for task in tasks:
        todo.put(task)
    done: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    end = object()

    def work() -> None:
        try:
            while not stop.is_set():
                try:
                    task = unpack(todo.get_nowait())
                except queue.Empty:
                    break
                for stats in run_task(task):
                    done.put(stats)
                    if stop.is_set():
                        break
        except BaseException as e:  # the caller raises it
            done.put(e)
        done.put(end)

    threads = [threading.Thread(target=work, name=f"kiln-bulk-{i}", daemon=True)
               for i in range(max(1, min(workers, len(tasks))))]
    for t in threads:
        t.start()
    running = len(threads)
    try:
        while running:
            item = done.get()
            if item is end:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)


def can_fork() -> bool:
    """Whether worker processes can be forked from this one: Linux (macOS's system libraries
    are not fork-safe; Windows cannot fork)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def run_in_processes(compute: Callable[[object], object],
                     finish: Callable[[object, object], Iterator[dict]], tasks: list[dict],
                     workers: int) -> Iterator[dict]:
    """`compute` over every task in `workers` processes forked from this one, each taking the
    next task as it finishes one; `finish(task, result)` here, in this process, in the order
    the results come: yields the stats of each part it writes. For work whose kernels are
    too short to leave the GIL to threads (sampling steps: two threads of one process step
    slower than two processes on bf16 matrix units; BENCHMARKS.md, Generation section), with
    its I/O kept in this process (the workers only compute: they touch no file, socket or
    thread pool of this one).
    One task, one worker or no fork: this process's threads instead. An error in a worker
    is raised here; a worker that dies (killed, out of memory) is an error; the workers end
    with this generator, and with this process if it is killed."""
    n = max(1, min(workers, len(tasks)))
    if n == 1 or not can_fork():
        yield from run_in_threads(lambda task: finish(task, compute(task)), tasks, n)
        return
    ctx = multiprocessing.get_context("fork")
    todo, done = ctx.Queue(), ctx.Queue()
    for item in enumerate(tasks):
        todo.put(item)
    for _ in range(n):
        todo.put(None)  # one stop each
    # A forked worker inherits its target and arguments: compute need not pickle.
    procs = [ctx.Process(target=_work, args=(compute, todo, done, os.getpid()), daemon=True,
                         name=f"kiln-bulk-{i}") for i in range(n)]
    try:
        for proc in procs:
            proc.start()
        for _ in tasks:
            i, result = _next_result(done, procs)
            yield from finish(unpack(tasks[i]), result)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(10)
        todo.cancel_join_thread()  # tasks no worker took: this process need not wait to feed them


def _next_result(done, procs) -> tuple[int, object]:
    while True:
        try:
            i, result, error = done.get(timeout=0.5)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a worker process died (exit code {dead[0]}; killed, or "
                                   "out of memory?); what it had not written is not in the "
                                   "output: run the command again to finish") from None
            continue
        if error is not None:
            raise error
        return i, result


def _work(compute: Callable[[object], object], todo, done, parent: int) -> None:
    """A forked worker: the next task until a stop, or until its parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with(parent)
    while (item := todo.get()) is not None and os.getppid() == parent:
        i, task = item
        try:
            done.put((i, compute(unpack(task)), None))
        except Exception as e:  # raised in the parent, as a thread's would be
            e.add_note(f"in worker process {os.getpid()}:\n{traceback.format_exc()}")
            try:
                pickle.dumps(e)
            except Exception:
                e = RuntimeError(f"{type(e).__name__}: {e}")
            done.put((i, None, e))
            return


def _die_with(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux's PR_SET_PDEATHSIG), so that a killed
    command leaves no worker stepping on; a parent gone already ends it now."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # then the worker checks its parent before each task
    if os.getppid() != parent:
        os._exit(0)
