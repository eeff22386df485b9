"""Scale benchmark: whole `kiln label` and `kiln generate` commands at ten and a hundred times
the size of the usual benchmarks, with the summed memory of every process of the job (the
command, its local Ray's daemons and workers, its forked workers) sampled through the run.

PSS (proportional set size) is the memory figure that sums: a page that N processes share
counts 1/N in each, so the sum over the job's process tree is the memory the job holds. It is
read from /proc/PID/smaps_rollup every SAMPLE_S seconds for the command and all of its
descendants (Ray's raylet and workers descend from the command that started them).

    .venv/bin/python bench/scale.py [--label 20000 200000 2000000] [--dir 20000 200000]
                                    [--s3 10000 100000] [--generate 10000 100000 1000000]
                                    [--no-resume]
                                    [--work FOLDER] [--no-write]

Label inputs are tar shards of 10,000 28x28 digit PNGs each (200 shards at 2,000,000),
directories of loose PNG files and an S3 prefix of them (moto in server mode on 127.0.0.1,
whose memory is not counted); generate's are Parquet files of prompts. The plan time is the
time from launch to the line that says how many units the job runs, and where; the steady
rate is the rows between the first and the last progress line over the time between them. The
biggest label job is also killed half way (SIGKILL) and resumed: its rows are counted, each
exactly once. Writes the "## Scale" section of BENCHMARKS.md, with a plot of peak memory
against size (bench/scale-memory.png)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARD = 10_000  # images per tar shard
SAMPLE_S = 0.5
PLOT = ROOT / "bench" / "scale-memory.png"


# -- memory of a process tree ----------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def tree(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Sampler(threading.Thread):
    """Samples the summed PSS of a process tree until stopped; `peak` in MiB."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.samples = pid, 0.0, []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            mib = sum(pss_kib(p) for p in tree(self.pid)) / 1024
            self.samples.append((time.monotonic(), mib))
            self.peak = max(self.peak, mib)
            self.halt.wait(SAMPLE_S)


def run_measured(cmd: list[str], plan_line: str, extra_env: dict | None = None) -> dict:
    """Runs a whole command as a user would, sampling its tree's memory; returns wall time,
    plan time (launch to the first line matching `plan_line`), steady rate and peak PSS."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (extra_env or {})
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    lines, plan_s, progress, how = [], None, [], "-"
    for line in proc.stderr:
        now = time.monotonic() - start
        lines.append(line)
        if plan_s is None and re.search(plan_line, line):
            plan_s, how = now, line.split(" in ", 1)[-1].strip()
        m = re.search(r"(\d[\d,]*)/[\d,]+ rows", line) or re.search(r": ([\d,]+) rows,", line)
        if m:
            progress.append((now, int(m.group(1).replace(",", ""))))
    proc.wait()
    sampler.halt.set()
    sampler.join()
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{''.join(lines)[-3000:]}")
    rate = None
    if len(progress) >= 2 and progress[-1][0] > progress[0][0]:
        rate = (progress[-1][1] - progress[0][1]) / (progress[-1][0] - progress[0][0])
    return {"wall_s": wall, "plan_s": plan_s, "rate": rate, "peak_mib": sampler.peak,
            "how": how, "log": "".join(lines)}


# -- data ------------------------------------------------------------------------------------

def label_shards(work: Path, n: int) -> list[Path]:
    """ceil(n / SHARD) tars of digit PNGs, SHARD images each (the last holds the rest);
    shared between sizes: the first shards of a bigger set are the smaller set's."""
    from kiln import embedded

    pngs, labels = embedded.digits(28)
    shards = []
    for s in range(0, (n + SHARD - 1) // SHARD):
        count = min(SHARD, n - s * SHARD)
        path = work / f"shard-{s:04d}-{count}.tar"
        if not path.exists():
            first = s * SHARD
            names = [f"{labels[i % len(pngs)]}/{i:08d}.png" for i in range(first, first + count)]
            embedded.write_flat_archive(path, [pngs[i % len(pngs)] for i in range(first,
                                                                                  first + count)],
                                        names)
        shards.append(path)
    return shards


def label_dir(work: Path, n: int) -> Path:
    """A directory of n loose PNGs, 1,000 to a sub-folder."""
    from kiln import embedded

    pngs, _ = embedded.digits(28)
    top = work / f"dir-{n}"
    if (top / "done").exists():
        return top
    for i in range(n):
        sub = top / f"{i // 1000:05d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:08d}.png").write_bytes(pngs[i % len(pngs)])
    (top / "done").write_text("")  # not a PNG: one error row, as a stray file would be
    return top


def s3_prefix(n: int) -> tuple[subprocess.Popen, dict, str]:
    """moto in server mode on 127.0.0.1 holding n digit PNGs under s3://scale/imgs/, 1,000 to
    a folder: (its process, the AWS variables that reach it, the prefix's URI)."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    from kiln import embedded

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "scale",
           "AWS_SECRET_ACCESS_KEY": "scale-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="scale", aws_secret_access_key="scale-secret")
    client.create_bucket(Bucket="scale")
    pngs, _ = embedded.digits(28)

    def put(i: int) -> None:
        client.put_object(Bucket="scale", Key=f"imgs/{i // 1000:04d}/{i:07d}.png",
                          Body=pngs[i % len(pngs)])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(n)))
    return proc, env, "s3://scale/imgs"


def prompt_parquet(work: Path, n: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = work / f"prompts-{n}.parquet"
    if not path.exists():
        starts = ["def ", "import ", "class ", "return ", "for i in ", "if ", "# ", "self."]
        pq.write_table(pa.table({"prompt": [starts[i % len(starts)] for i in range(n)]}),
                       path, row_group_size=10_000)
    return path


def models(work: Path) -> tuple[Path, Path]:
    """An untrained mnist_cnn and an untrained 2x256 char-LSTM over the standard library's
    characters: rates and memory do not depend on the weights."""
    import torch

    from kiln import embedded
    from kiln.models import CharVocab, CNNSpec, RNNSpec, build_model, model_to_bytes
    from kiln.pipelines import storage

    torch.manual_seed(0)
    cnn = CNNSpec("mnist_cnn", [str(i) for i in range(10)], 1, 28)
    storage.save_model(str(work / "cnn"), model_to_bytes(build_model("cnn", cnn).eval(), "cnn",
                                                         cnn))
    vocab = CharVocab.build(embedded.stdlib_corpus(200_000))
    rnn = RNNSpec(vocab.chars, "lstm", embed=64, hidden=256, layers=2)
    storage.save_model(str(work / "rnn"), model_to_bytes(build_model("rnn", rnn).eval(), "rnn",
                                                         rnn))
    return work / "cnn", work / "rnn"


# -- jobs ------------------------------------------------------------------------------------

def label(model: Path, inputs: list, out: Path, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "kiln", "label", "--model", str(model), "--output", str(out),
           "--overwrite"]
    for i in inputs:
        cmd += ["--input", str(i)]
    res = run_measured(cmd, r"^labeling [\d,]+ unit", env)
    res["summary"] = json.loads((out / "summary.json").read_text())
    return res


def rows_written(out: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet"))


def kill_and_resume(model: Path, inputs: list[Path], out: Path, n: int) -> dict:
    """`kiln label` killed (SIGKILL, the whole process group) once half of the rows are
    written, then run again as a user would; every row counted: exactly once."""
    import signal

    import pyarrow.parquet as pq

    cmd = [sys.executable, "-m", "kiln", "label", "--model", str(model), "--output", str(out)]
    for i in inputs:
        cmd += ["--input", str(i)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([*cmd, "--overwrite"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    while proc.poll() is None and rows_written(out) < n // 2:
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = rows_written(out)
    res = run_measured(cmd, r"^labeling [\d,]+ unit")  # without --overwrite: a resume
    keys = set()
    total = 0
    for part in out.glob("part-*.parquet"):
        t = pq.read_table(part, columns=["source", "path"])
        total += t.num_rows
        keys.update(zip(t.column("source").to_pylist(), t.column("path").to_pylist(),
                        strict=True))
    res["summary"] = json.loads((out / "summary.json").read_text())
    res.update(killed_at=before, total=total, distinct=len(keys))
    if not total == len(keys) == n:
        raise RuntimeError(f"resume lost or repeated rows: {total:,} rows, {len(keys):,} "
                           f"distinct, {n:,} images")
    return res


def generate(model: Path, prompts: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "kiln", "generate", "--model", str(model), "--prompts",
           str(prompts), "--output", str(out), "--overwrite", "--max-chars", "20"]
    res = run_measured(cmd, r"^generating [\d,]+ unit")
    res["summary"] = json.loads((out / "summary.json").read_text())
    return res


def row(what: str, n: int, r: dict) -> str:
    rate = f"{r['rate']:,.0f}" if r["rate"] else "-"
    plan = f"{r['plan_s']:.1f}" if r["plan_s"] is not None else "-"
    return (f"| {what} ({r['how']}) | {n:,} | {r['wall_s']:.1f} | {plan} | {rate} | "
            f"{r['summary']['rows_in']:,} | {r['peak_mib']:,.0f} |")


def plot(points: dict[str, list[tuple[int, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for what, pts in points.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=what)
    ax.set(xscale="log", xlabel="rows", ylabel="peak summed PSS (MiB)",
           title="memory of the whole job against its size")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", type=int, nargs="*", default=[20_000, 200_000, 2_000_000])
    ap.add_argument("--dir", type=int, nargs="*", default=[20_000, 200_000])
    ap.add_argument("--s3", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--generate", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                    help="kill the biggest label job half way and resume it")
    ap.add_argument("--work", default=None, help="a folder to keep the data between runs")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="kiln-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    cnn, rnn = models(work)
    lines, points = [], {}
    for n in sorted(args.label):
        r = label(cnn, label_shards(work, n), work / "out-label")
        lines.append(row(f"label, {(n + SHARD - 1) // SHARD} tar shards", n, r))
        points.setdefault("label (tars)", []).append((n, r["peak_mib"]))
        print(lines[-1], flush=True)
    if args.label and args.resume:
        n = max(args.label)
        r = kill_and_resume(cnn, label_shards(work, n), work / "out-resume", n)
        lines.append(row(f"label resumed after a kill at {r['killed_at']:,} rows, "
                         f"{r['distinct']:,} distinct rows of {r['total']:,}", n, r))
        print(lines[-1], flush=True)
    for n in sorted(args.dir):
        r = label(cnn, [label_dir(work, n)], work / "out-dir")
        lines.append(row("label, a directory", n, r))
        points.setdefault("label (directory)", []).append((n, r["peak_mib"]))
        print(lines[-1], flush=True)
    for n in sorted(args.s3):
        moto, env, prefix = s3_prefix(n)
        try:
            r = label(cnn, [prefix], work / "out-s3", env)
        finally:
            moto.terminate()
            moto.wait(10)
        lines.append(row("label, an S3 prefix (moto on 127.0.0.1)", n, r))
        points.setdefault("label (S3 prefix)", []).append((n, r["peak_mib"]))
        print(lines[-1], flush=True)
    for n in sorted(args.generate):
        r = generate(rnn, prompt_parquet(work, n), work / "out-gen")
        lines.append(row("generate, 20 characters", n, r))
        points.setdefault("generate", []).append((n, r["peak_mib"]))
        print(lines[-1], flush=True)
    if args.no_write:
        return
    from bench.sections import write_section

    plot(points)
    body = ("| job | rows | whole command (s) | plan (s) | steady rows/s | rows out | "
            "peak summed PSS (MiB) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
            + "\n".join(lines) + "\n\n![peak memory against size](bench/scale-memory.png)\n")
    write_section("Scale", body)


if __name__ == "__main__":
    main()
