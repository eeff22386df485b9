"""Trainer start-up: the wall time of consecutive tiny `kiln train cnn` runs (600 digits, 2
steps, 1 worker) on one running local Ray set up as kiln sets up the one it starts, as the
tests and kiln tune's trials pay it. With 2
steps, nearly all of a run is fixed cost: the data's decode tasks, TorchTrainer's controller
and worker processes, the data hand-off, the first checkpoint. The first run also starts Ray
Data's and Ray Train's long-lived helper actors; the later ones show the per-run cost.

    .venv/bin/python bench/trainer_start.py [--runs 4]
Prints one line a run and the median of the runs after the first; writes nothing."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4)
    args = ap.parse_args()
    import ray

    from kiln import embedded
    from kiln.cluster.connect import console, ensure_token_auth, local_train_env
    from kiln.options import TrainOptions
    from kiln.train.job import run_train

    ensure_token_auth()
    work = Path(tempfile.mkdtemp(prefix="kiln-start-"))
    pngs, labels = embedded.digits(28)
    tar = embedded.write_class_tar(work / "digits.tar", pngs[:600], labels[:600])
    env = local_train_env()  # as for the local Ray that kiln starts itself
    env.__enter__()
    t = time.monotonic()
    ray.init(address="local", num_cpus=2, object_store_memory=600 * 1024 * 1024,
             _temp_dir=tempfile.mkdtemp(prefix="kr-", dir="/tmp"), include_dashboard=False,
             logging_level="WARNING")
    print(f"ray.init: {time.monotonic() - t:.1f} s", flush=True)
    quiet, times = console(quiet=True), []
    for i in range(args.runs):
        t = time.monotonic()
        run_train(TrainOptions("cnn", str(tar), str(work / f"run{i}"), max_steps=2,
                               batch_size=64, workers=1, val_fraction=0.25), quiet)
        times.append(time.monotonic() - t)
        print(f"run {i + 1}: {times[-1]:.1f} s", flush=True)
    if len(times) > 1:
        print(f"median of runs 2-{len(times)}: {statistics.median(times[1:]):.1f} s")
    ray.shutdown()
    env.__exit__(None, None, None)


if __name__ == "__main__":
    main()
