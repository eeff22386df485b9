"""What `kiln label` and `kiln generate` share below the driver: a task is one slice of a
job's input (a source Unit to label, a block of prompts to sample), pickled so that Arrow
leaves its shape alone; an actor class (LabelPredictor, Generator) loads its model once and
turns a task into the stats of each Parquet part it writes. The same actor serves a Ray Data
actor pool (`bulk_dataset`) and the threads of the command's own process (`run_in_threads`),
so the rows are the same either way."""

from __future__ import annotations

import json
import pickle
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass


def pack(task) -> dict:
    """A task as a from_items row."""
    return {"task": pickle.dumps(task, protocol=5)}


def unpack(row: dict):
    """A from_items row back into its task. The rows are made by this job's own driver."""
    return pickle.loads(row["task"])


class BulkActor:
    """The part of the actor classes that Ray Data calls: every row of a batch is a task,
    and each part the task writes comes back as one small JSON stats row."""

    def run_task(self, task) -> Iterator[dict]:
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
