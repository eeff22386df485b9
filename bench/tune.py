"""Search benchmark: `kiln tune` with ASHA against the full grid over the same space, as a user
runs them (whole commands), in one run on this machine.

1. The Keras MNIST network on scikit-learn's digits (a quarter held out for validation):
   --lr 3e-4,1e-3,3e-3,1e-2 x --batch-size 32,128, 8 epochs a trial.
2. A 1-layer char-LSTM on the Python docs' English prose (pydoc_data/topics.py, 300 kB):
   --lr 1e-3,3e-3,1e-2,3e-2 x --hidden 64,128, 4 epochs a trial.

Each space is searched twice: the 8-point grid run to the end (--scheduler fifo) and the same 8
trials under ASHA (--scheduler asha). Reported: each side's best validation metric, the
trial-epochs each spent (the sum over trials of the epochs run) and its wall time. While ASHA
runs, each trial's rank-0 worker process (its pid in Tune's result.json) is watched: the time
from a trial's last validation to that process's exit measures whether an early stop frees the
trial's workers.
3. The ASHA search of (1) on a 3-node ray.cluster_utils.Cluster (three 1-CPU nodes): the nodes
   its trials ran on.

    .venv/bin/python bench/tune.py [--only cnn,rnn,cluster]
Writes the "## Tuning" section of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sections import write_section  # noqa: E402
from kiln import compat, embedded  # noqa: E402

SPACES = {"cnn": ["--lr", "3e-4,1e-3,3e-3,1e-2", "--batch-size", "32,128", "--epochs", "8",
                  "--val-fraction", "0.25"],
          "rnn": ["--lr", "1e-3,3e-3,1e-2,3e-2", "--hidden", "64,128", "--layers", "1",
                  "--epochs", "4"]}


class Watch(threading.Thread):
    """Polls Tune's trial folders: each trial's rank-0 worker (its pid in result.json) and
    when its process was gone."""

    def __init__(self, tune_dir: Path):
        super().__init__(daemon=True)
        self.dir, self.stop, self.seen = tune_dir, threading.Event(), {}

    def run(self) -> None:
        while not self.stop.is_set():
            for f in self.dir.glob("t*/result.json"):
                try:
                    lines = f.read_text().splitlines()
                    last = json.loads(lines[-1])
                except (OSError, IndexError, ValueError):
                    continue
                s = self.seen.setdefault(f.parent.name, {})
                if last.get("worker_pid") and s.get("pid") != last["worker_pid"]:
                    s.update(pid=last["worker_pid"], gone=None)
                if s.get("pid") and s.get("gone") is None and not psutil.pid_exists(s["pid"]):
                    s["gone"] = time.time()
            time.sleep(0.2)


def kiln_tune(kind: str, data: list[str], out: Path, *args: str, env=None) -> dict:
    t0 = time.monotonic()
    watch = Watch(out / "tune")
    watch.start()
    proc = subprocess.run([sys.executable, "-m", "kiln", "tune", kind, *data, "--out",
                           str(out), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env)
    watch.stop.set()
    if proc.returncode != 0:
        raise RuntimeError(f"kiln tune failed:\n{proc.stderr[-3000:]}")
    rows = pq.read_table(out / "trials.parquet").to_pylist()
    # A trial's last validation is when its rank 0 last wrote metrics.jsonl (before it
    # reported: Tune writes result.json later, on its own schedule).
    release = [s["gone"] - (out / "trials" / t / "metrics.jsonl").stat().st_mtime
               for t, s in watch.seen.items()
               if s.get("gone") and any(r["trial"] == t and r["status"] == "stopped early"
                                        for r in rows)]
    return {"rows": rows, "wall": time.monotonic() - t0, "release": release,
            "epochs": sum(r["epochs"] for r in rows),
            "train_s": sum(r["elapsed_s"] for r in rows)}


def best(rows: list[dict], mode: str) -> float:
    values = [r["best"] for r in rows if r["best"] is not None]
    return max(values) if mode == "max" else min(values)


def compare(kind: str, data: list[str], tmp: Path, mode: str) -> tuple[list[str], list[str]]:
    grid = kiln_tune(kind, data, tmp / f"{kind}-grid", *SPACES[kind], "--scheduler", "fifo")
    asha = kiln_tune(kind, data, tmp / f"{kind}-asha", *SPACES[kind], "--scheduler", "asha")
    g, a = best(grid["rows"], mode), best(asha["rows"], mode)
    gap = f"{(g - a) * 100:+.2f} pp" if mode == "max" else f"{(a - g) / g * 100:+.2f}%"
    metric = grid["rows"][0]["metric"]
    stopped = sum(r["status"] == "stopped early" for r in asha["rows"])
    rel = asha["release"]
    note = (f"{kind}: ASHA stopped {stopped} of 8 trials early; their rank-0 workers exited "
            f"{min(rel):.1f}-{max(rel):.1f} s after the trial's last validation "
            f"({len(rel)} watched)" if rel else f"{kind}: ASHA stopped {stopped} of 8 trials")
    # What a trial costs beside its training: the trial slots' time (2 at a time) not
    # spent training, per trial (Ray's own start once, then each trial's TorchTrainer start).
    over = (2 * grid["wall"] - grid["train_s"]) / 8
    note += (f"; grid: {grid['train_s']:.0f} s of training in {grid['wall']:.0f} s, about "
             f"{over:.0f} s a trial beside its training")
    return [f"| {kind}: best {metric} | {g:.4f} | {a:.4f} | {gap} (ASHA worse by) |",
            f"| {kind}: trial-epochs | {grid['epochs']:g} | {asha['epochs']:g} | "
            f"{asha['epochs'] / grid['epochs']:.0%} of the grid's |",
            f"| {kind}: wall time, s | {grid['wall']:.0f} | {asha['wall']:.0f} | "
            f"{asha['wall'] / grid['wall']:.2f}x |"], [note]


def on_cluster(data: list[str], tmp: Path) -> list[str]:
    from ray.cluster_utils import Cluster

    from kiln.cluster.connect import ensure_token_auth

    ensure_token_auth()
    os.makedirs(os.path.dirname(compat.ray_address_file()), exist_ok=True)
    temp = tempfile.mkdtemp(prefix="kb-", dir="/tmp")
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "temp_dir": temp,
        "object_store_memory": 300 * 1024 * 1024})
    nodes = [c.add_node(num_cpus=1, object_store_memory=200 * 1024 * 1024) for _ in range(2)]
    try:
        env = {**os.environ, "RAY_ADDRESS": c.address}
        r = kiln_tune("cnn", data, tmp / "cnn-cluster", *SPACES["cnn"], "--scheduler", "asha",
                      env=env)
        ids = {c.head_node.node_id: "head", **{n.node_id: f"worker {i + 1}"
                                               for i, n in enumerate(nodes)}}
        counts: dict = {}
        for row in r["rows"]:
            name = ids.get(row["node"], row["node"])
            counts[name] = counts.get(name, 0) + 1
    finally:
        c.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    shown = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    return [f"3-node cluster (three 1-CPU nodes), the CNN's ASHA search: trials per node "
            f"(the rank-0 worker's) {shown}; {r['wall']:.0f} s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="cnn,rnn,cluster")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-tune-"))
    pngs, labels = embedded.digits(28)
    tar = embedded.write_class_tar(tmp / "digits.tar", pngs, labels)
    topics = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    prose = tmp / "prose.txt"
    prose.write_text(topics.read_text(encoding="utf-8")[:300_000], encoding="utf-8")
    data = {"cnn": ["--data", str(tar)], "rnn": ["--data", str(prose)]}
    rows, notes = [], []
    for name in a.only.split(","):
        if name == "cluster":
            notes += on_cluster(data["cnn"], tmp)
        else:
            r, n = compare(name, data[name], tmp, "max" if name == "cnn" else "min")
            rows += r
            notes += n
        print("\n".join(rows + notes), flush=True)
        write(rows, notes)  # after each part: a cut-short run keeps what it measured


def write(rows: list[str], notes: list[str]) -> None:
    body = "\n".join([
        "| measure | full grid (8 trials, fifo) | ASHA (same 8 trials) | ASHA vs grid |",
        "|---|---|---|---|", *rows, "",
        "Same data, same space, same trials; 2 CPUs, trials of 1 worker, 2 at a time. "
        "Best metric: the best validation of any trial (val_accuracy: higher is better; "
        "val_loss in nats/char: lower is better). A trial-epoch is one epoch of one trial; "
        "wall time is the whole command, Ray's start-up and every trial's TorchTrainer "
        "start included.", "",
        *[f"- {n}" for n in notes], "",
        "Command: `.venv/bin/python bench/tune.py " + " ".join(sys.argv[1:]) + "`"])
    write_section("Tuning", body)


if __name__ == "__main__":
    main()
