"""Where a command's work runs, decided once per command from its options, before anything is
read or started: on a Ray cluster (--address names one, or a Ray is already up in this
process: a notebook, the tests), or on this machine, in the command's own threads or processes
where a bulk job allows it, else on a local Ray that the command starts. The drivers take the
Placement and ask it; nothing else asks the environment."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

# The size rule for label and generate jobs, from bench/label.py and bench/generate.py on 2
# CPUs: there, the command's own process on every core (threads, one torch thread each) ran
# as fast as a local Ray's actor pool once that was up (measured: BENCHMARKS.md, Labeling
# section), so Ray's start never paid back at any size. Threads share the GIL, so on more
# cores a pool of processes pulls ahead; there a job goes to Ray once it is bigger than what
# the process would do in about Ray's start-up time (HERE_MAX_SECONDS). Not measured
# above 2 CPUs.
HERE_ALWAYS_CPUS = 4
HERE_MAX_SECONDS = 15.0


def local_cpus() -> int:
    """The CPUs this process may run on."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cpus or 1


def local_gpus() -> int:
    """The CUDA GPUs of this machine (torch is imported only to ask)."""
    import torch

    return torch.cuda.device_count()


def has_cluster() -> bool:
    """Whether Ray would join a running cluster: RAY_ADDRESS names one, or a Ray is already
    up in this process (a notebook, the tests)."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@dataclass(frozen=True)
class Placement:
    cluster: bool  # Ray joins a running cluster, whose resources are counted once connected
    cpus: int  # this machine's, for the work that runs here or on a local Ray
    gpu: bool = False  # --gpu
    actors: int | None = None  # --actors: a bulk job's pool size, which only Ray has

    @property
    def here_only(self) -> bool:
        """Whether nothing asks for Ray: no cluster, no --actors, no --gpu."""
        return not (self.cluster or self.actors or self.gpu)

    def runs_here(self, work: float, rate_per_cpu: float) -> bool:
        """Whether a label or generate job runs the actors' code in this process on every
        core rather than on a local Ray: `work` is the job's size (images, characters) and
        `rate_per_cpu` what one core does of it a second, as measured."""
        if not self.here_only:
            return False
        return (self.cpus <= HERE_ALWAYS_CPUS
                or work <= HERE_MAX_SECONDS * rate_per_cpu * self.cpus)


def place(opts) -> Placement:
    """The command's placement, checked: --gpu on this machine (no cluster) needs a CUDA GPU,
    and one for each of --actors (no autoscaler adds any); a cluster's GPUs are counted once
    connected."""
    actors = getattr(opts, "actors", None)
    where = Placement(cluster=bool(opts.address) or has_cluster(), cpus=local_cpus(),
                      gpu=bool(opts.gpu), actors=actors)
    if where.gpu and not where.cluster:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--gpu was given but this machine has no CUDA GPU; drop --gpu, "
                             "or point --address at a Ray cluster with GPU workers")
        if actors and actors > local_gpus():
            raise ValueError(f"--actors {actors} --gpu needs {actors} GPUs; this machine has "
                             f"{local_gpus()}: lower --actors, or point --address "
                             "at a Ray cluster")
    return where
