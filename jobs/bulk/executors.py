"""Where a bulk job's tasks run, behind one interface: `Executor.run(job, out, tasks, console)`
yields the stats of each Parquet part as it is written, whichever way the tasks run. Three
ways, chosen once per job by `choose` from the command's Placement and the job's size:

- `Threads`: the command's own process, a thread per core, one torch thread each (the models'
  kernels and the decoders release the GIL);
- `Processes`: workers forked from the command, for actors whose steps are too short to leave
  the GIL to threads (sampling); they compute, and this process writes;
- `RayData`: a Ray Data actor pool, on the cluster the command joins or on a local Ray it
  starts.

Each builds the job's own actor class (pipelines.bulk.BulkActor: LabelPredictor for label and
eval, Generator for generate), so the rows are the same every way."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from rich.console import Console

from kiln.cluster.connect import RayOptions, ray_session
from kiln.cluster.placement import Placement
from kiln.pipelines.bulk import (
    Layout,
    bulk_dataset,
    can_fork,
    run_in_processes,
    run_in_threads,
    stats_rows,
)
from kiln.pipelines.sink import OutputDir


class Executor:
    """Runs a job's tasks (pipelines.bulk.pack()ed) and yields each part's stats."""

    def run(self, job, out: OutputDir, tasks: list[dict], console: Console) -> Iterator[dict]:
        raise NotImplementedError

    @staticmethod
    def say(job, tasks: list[dict], how: str, console: Console) -> None:
        console.print(f"{job.verb} {len(tasks):,} unit(s) {how}", highlight=False)


class Threads(Executor):
    def __init__(self, workers: int):
        self.workers = workers

    def actor(self, job, out: OutputDir):
        # One torch thread each, as each actor of a pool has; labeling decodes on `workers`
        # threads.
        return job.actor(job.settings(out, Layout(1, 1.0, 0, 1, self.workers)), job.loaded)

    def run(self, job, out, tasks, console):
        actor = self.actor(job, out)
        self.say(job, tasks, f"in this process on {self.workers} thread(s) with "
                 f"{job.loaded.id}", console)
        yield from run_in_threads(actor.run_task, tasks, self.workers)


class Processes(Threads):
    def run(self, job, out, tasks, console):
        actor = self.actor(job, out)  # built before the fork: the workers inherit its model
        self.say(job, tasks, f"without Ray in {self.workers} processes forked from this one "
                 f"with {job.loaded.id}", console)
        yield from run_in_processes(actor.compute, actor.finish, tasks, self.workers)


class RayData(Executor):
    def run(self, job, out, tasks, console):
        opts = job.opts
        check_fits_here(job.where, len(tasks))
        with ray_session(RayOptions(address=opts.address, log_to_driver=opts.debug,
                                    forward_credentials=opts.forward_credentials)), \
                quiet_ray_data():
            layout = actor_layout(opts, len(tasks), job.decodes)
            self.say(job, tasks, f"with {layout.actors} actor(s) of {job.loaded.id}", console)
            yield from stats_rows(bulk_dataset(job.actor, job.settings(out, layout), tasks,
                                               layout))


def choose(where: Placement, actor: type, tasks: int, work: float, rate_per_cpu: float
           ) -> Executor:
    """The one choice per job: here where the placement allows it and the job is small enough
    for this machine (Placement.runs_here), in forked processes where the actor asks for them
    and there is more than one core's worth of tasks; else on Ray."""
    if not where.runs_here(work, rate_per_cpu):
        return RayData()
    workers = max(1, min(where.cpus, tasks))
    if actor.forks and workers > 1 and can_fork():
        return Processes(workers)
    return Threads(workers)


def check_fits_here(where: Placement, tasks: int) -> None:
    """On a local Ray the pool must fit this machine: each of min(--actors, tasks) actors
    asks at least a tenth of a CPU (actor_layout), and a pool short of CPUs waits forever."""
    actors = min(where.actors or 0, tasks)
    if where.gpu or where.cluster or actors <= 9 * where.cpus:
        return
    raise ValueError(f"--actors {where.actors} does not fit this machine's {where.cpus} CPUs "
                     f"(at most {9 * where.cpus} actors here); lower --actors, or point "
                     "--address at a Ray cluster")


def actor_layout(opts, units: int, decodes: bool = True) -> Layout:
    """CPU: an actor per CPU free now (a job's driver holds some), or --actors of them
    sharing the CPUs, each asking 0.9 of its share so that Ray Data's own tasks always find
    room (ray#44687: a pool holding every CPU starves them), with a torch thread per whole
    CPU of its share. One torch thread an actor and as many actors as CPUs is fastest: the
    decode threads interleave with the models (2 actors on 2 CPUs label faster than one
    actor with a core for its model and a core for its decoding; bench/label.py).
    GPU: one GPU per actor, and (`decodes`) a share of its node's CPUs for decoding; with
    --actors the pool may wait for an autoscaler to add GPUs."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((int(r.get("CPU", 0)) for r in nodes), default=1) or 1
    cpus = max(1, int(ray.available_resources().get("CPU", ray.cluster_resources().get("CPU", 1))))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if opts.gpu:
        if gpus < 1 and not opts.actors:
            raise ValueError("--gpu was given but the Ray cluster has no GPUs now; drop --gpu, "
                             "point --address at a cluster with GPU workers, or pass --actors N "
                             "to wait for an autoscaler to add them")
        actors = min(opts.actors or gpus, units)
        if not decodes:
            return Layout(actors, 1.0, 1, 1, 1)
        share = max(1, min(8, node_cpus - 1, (cpus - 1) // max(1, actors)))
        return Layout(actors, share * 0.9, 1, 1, share)
    actors = min(opts.actors or cpus, units)
    share = cpus / actors
    threads = max(1, min(node_cpus, int(share)))
    return Layout(actors, round(max(0.1, 0.9 * share), 3), 0, threads, threads)


@contextlib.contextmanager
def quiet_ray_data():
    """kiln prints its own progress; Ray Data's notes on its bars and timings would repeat it."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
