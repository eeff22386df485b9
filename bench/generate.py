"""Generation benchmark: the whole `kiln generate` command against plain PyTorch samplers
written without kiln (bench/plain/sampling.py), side by side in one run on this machine, same
model, same prompts:

- the naive loop, one sequence at a time (char-rnn's sample.lua), with both of torch's CPU
  LSTM kernels (oneDNN on, and off), on default threads and on one; the fastest is the
  baseline for the ">= 20x" goal;
- the plain batched loop, 64 sequences stepped together through nn.LSTM, torch.multinomial
  (issue #13's baseline), and the stronger plain loops a user could write: every prompt in
  one batch, in fp32 and, where kiln takes bf16, under bf16 autocast;
- `kiln generate` as a user runs it (in this process on every core), and on a local Ray
  (`--actors N`), both timed from launch to exit; the naive, batched and in-process commands
  in alternating rounds (--rounds, medians), Ray once;
- small jobs (--small, 10 and 100 prompts): the three whole commands, start-up included;
- models.sample on one thread at 64 / 128 / 256 / 512 lanes, which sets models.stepper.LANES;
- a sampling step on one thread with the LSTM's gates through sigmoid and through tanh alone,
  and with bf16 products where the CPU has oneDNN's bf16 kernels, which models.kernels
  chooses between by timing them on this CPU (the probe's cost is reported; its choice is
  cached per CPU model, torch version and model shape, here in the run's own folder); where
  kiln takes bf16, `kiln generate --precision fp32` runs in the rounds too;
- an upper layer's matrix product on one thread, through torch's addmm and through the
  sampler's own models.stepper.Linear (fp32, and bf16 where it runs), which sets the
  physical limit.

The model is a 2x256 char-LSTM (embedding 64) over the standard library's characters, with
untrained weights (sampling speed does not depend on their values); prompts are lines of the
standard library's source, up to 80 characters.

    .venv/bin/python bench/generate.py [--prompts 1000] [--max-chars 500] [--naive-prompts 20]
        [--small 10 100] [--rounds 3]
Writes the "## Generation" section of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# The naive loop's kernels: bench/plain/sampling.py's flags for each.
NAIVE_KERNELS = {"oneDNN on, default threads": [],
                 "oneDNN off, default threads": ["--mkldnn", "off"],
                 "oneDNN off, 1 thread": ["--mkldnn", "off", "--threads", "1"]}


def make_model(folder: Path) -> Path:
    import torch

    from kiln import embedded
    from kiln.models import CharRNN, CharVocab, RNNSpec, model_to_bytes
    from kiln.pipelines import storage

    torch.manual_seed(0)
    vocab = CharVocab.build(embedded.stdlib_corpus(1_000_000))
    spec = RNNSpec(vocab.chars, "lstm", embed=64, hidden=256, layers=2)
    net = CharRNN(len(vocab), "lstm", 64, 256, 2).eval()
    storage.save_model(str(folder / "model"), model_to_bytes(net, "rnn", spec))
    return folder


def make_prompts(n: int) -> list[str]:
    from kiln import embedded

    lines = [s.strip() for s in embedded.stdlib_corpus(2_000_000).splitlines()]
    lines = [s[:80] for s in lines if len(s) >= 8]
    return [lines[(i * 7919) % len(lines)] for i in range(n)]


def run(cmd: list[str]) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{res.stderr[-3000:]}")
    return seconds, res.stdout + res.stderr


def plain(model: Path, prompts: Path, max_chars: int, *extra: str) -> dict:
    seconds, out = run([sys.executable, str(ROOT / "bench/plain/sampling.py"), str(model),
                        str(prompts), "--max-chars", str(max_chars), *extra])
    res = json.loads(out.strip().splitlines()[-1])
    res["whole_s"] = seconds
    return res


def kiln(model: Path, prompts: Path, out: Path, max_chars: int, *extra: str) -> dict:
    seconds, log = run([sys.executable, "-m", "kiln", "generate", "--model", str(model),
                        "--prompts", str(prompts), "--output", str(out), "--max-chars",
                        str(max_chars), "--overwrite", *extra])
    summary = json.loads((out / "summary.json").read_text())
    chars = summary["chars_generated"]
    return {"whole_s": seconds, "chars": chars, "chars_per_s": chars / seconds,
            "how": "Ray" if " actor(s) of " in log else "without Ray"}


def small_job(model: Path, prompts: list[str], tmp: Path, max_chars: int,
              naive_kernel: str) -> dict[str, float]:
    """Whole commands on a small job: the naive loop on `naive_kernel` (of NAIVE_KERNELS), the
    plain batched loop, and kiln generate (which steps a few prompts at a narrower width)."""
    pfile = tmp / f"small-{len(prompts)}.txt"
    pfile.write_text("\n".join(prompts) + "\n")
    return {"naive": plain(model, pfile, max_chars, "--mode", "naive",
                           *NAIVE_KERNELS[naive_kernel])["whole_s"],
            "batched": plain(model, pfile, max_chars, "--mode", "batched", "--batch",
                             "64")["whole_s"],
            "kiln": kiln(model, pfile, tmp / f"small-{len(prompts)}", max_chars)["whole_s"]}


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread inside the block, its thread count restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def lanes_sweep(model: Path, prompts: list[str], max_chars: int, gates: str, precision: str
                ) -> dict[int, float]:
    """models.sample's rate by lanes, in the form kiln chose (no probe inside the timing)."""
    from kiln.models import SamplingSettings, row_seed, sample
    from kiln.models.runtime import keep_freed_memory
    from kiln.pipelines import storage

    keep_freed_memory()  # as kiln's generator does
    loaded = storage.load_model(str(model))
    seeds = [row_seed(0, i) for i in range(len(prompts))]
    rates = {}
    with one_torch_thread():
        for lanes in (64, 128, 256, 512):
            start = time.perf_counter()
            sample(loaded.model, loaded.vocab, prompts, seeds,
                   SamplingSettings(max_chars=max_chars, lanes=lanes, gates=gates,
                                    precision=precision))
            rates[lanes] = len(prompts) * max_chars / (time.perf_counter() - start)
    return rates


def step_forms(model: Path, lanes: int = 256, rounds: int = 5) -> dict[str, float]:
    """Milliseconds a sampling step takes at `lanes` on one thread with the LSTM's gates
    through sigmoid and through tanh alone, with fp32 and (where oneDNN has the kernels)
    bf16 products; medians of alternating rounds of 300 steps."""
    import statistics

    import torch

    from kiln.models.stepper import Stepper, bf16_linear
    from kiln.pipelines import storage

    net = storage.load_model(str(model)).model
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, net.head.out_features, (lanes,), generator=g)
    steppers = {"sigmoid": Stepper(net, tanh_gates=False, bf16=False),
                "tanh": Stepper(net, tanh_gates=True, bf16=False)}
    if bf16_linear():
        steppers["sigmoid, bf16 products"] = Stepper(net, tanh_gates=False, bf16=True)
        steppers["tanh, bf16 products"] = Stepper(net, tanh_gates=True, bf16=True)
    times: dict[str, list[float]] = {k: [] for k in steppers}
    with one_torch_thread():
        for _ in range(rounds):
            for name, step in steppers.items():
                state = step.init_state(lanes)
                for _ in range(30):
                    _, state = step(x, state)
                start = time.perf_counter()
                for _ in range(300):
                    _, state = step(x, state)
                times[name].append((time.perf_counter() - start) / 300 * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def median_run(runs: list[dict], key: str) -> dict:
    """The run whose `key` is the median of the rounds' (the lower middle of an even count)."""
    return sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2]


def matmul_rates(lanes: int = 256, hidden: int = 256) -> dict[str, float]:
    """GFLOP/s of an upper layer's product, (lanes, 2H) @ (2H, 4H), on one thread: torch's
    addmm (MKL here), and models.stepper.Linear, the sampler's own (oneDNN's linear where
    `onednn_linear()`, else addmm again)."""
    import torch

    from kiln.models.stepper import Linear, bf16_linear

    a, w = torch.randn(lanes, 2 * hidden), torch.randn(4 * hidden, 2 * hidden)
    b, wt = torch.randn(4 * hidden), w.T.contiguous()
    lin = Linear(w, b, torch.device("cpu"))
    flops = 2 * lanes * 2 * hidden * 4 * hidden
    kernels = {"addmm": lambda: torch.addmm(b, a, wt),
               f"kiln's Linear ({'oneDNN' if lin.onednn else 'addmm'})": lambda: lin(a)}
    if bf16_linear():
        lin16 = Linear(w, b, torch.device("cpu"), bf16=True)
        kernels["kiln's Linear, bf16 (oneDNN)"] = lambda: lin16(a)
    rates = {}
    with one_torch_thread():
        for name, f in kernels.items():
            for _ in range(20):
                f()
            start, n = time.perf_counter(), 300
            for _ in range(n):
                f()
            rates[name] = flops * n / (time.perf_counter() - start) / 1e9
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--max-chars", type=int, default=500)
    ap.add_argument("--naive-prompts", type=int, default=20)
    ap.add_argument("--small", type=int, nargs="*", default=[10, 100],
                    help="small jobs: whole commands at these prompt counts")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating rounds of the naive, batched and kiln commands (medians)")
    ap.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-gen-"))
    model = make_model(tmp / "run")
    prompts = make_prompts(args.prompts)
    pfile = tmp / "prompts.txt"
    pfile.write_text("\n".join(prompts) + "\n")
    n, c = args.naive_prompts, args.max_chars
    cpus = os.cpu_count() or 1

    # Alternating rounds of the naive kernels, the plain batched loop and kiln; medians.
    import torch

    from kiln.models.kernels import choose
    from kiln.models.stepper import LANES
    from kiln.pipelines import storage

    # kiln's choice of kernels, timed here as kiln times it; the kiln commands below find it
    # in the same cache.
    os.environ["KILN_CACHE_DIR"] = str(tmp / "kernel-cache")
    net = storage.load_model(str(model)).model
    chosen = choose(net, "auto", LANES)
    print(f"kernels: {chosen.describe()}", flush=True)
    choose(net, "fp32", LANES)  # what `kiln generate --precision fp32` takes, timed here too
    bf16 = chosen.products == "bf16"  # then kiln at --precision fp32 runs too
    strong = {"batched, all prompts": ["--batch", str(args.prompts)],
              **({"batched, all prompts, bf16": ["--batch", str(args.prompts), "--bf16"]}
                 if bf16 else {})}
    names = [*NAIVE_KERNELS, "batched", *strong, "kiln", *(["kiln fp32"] if bf16 else [])]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for i in range(args.rounds):
        for name, flags in NAIVE_KERNELS.items():
            # oneDNN's LSTM one sequence at a time is ~6x slower: a quarter of the prompts.
            limit = max(2, n // 4) if name == "oneDNN on, default threads" else n
            runs[name].append(plain(model, pfile, c, "--mode", "naive", "--limit", str(limit),
                                    *flags))
        runs["batched"].append(plain(model, pfile, c, "--mode", "batched", "--batch", "64"))
        for name, flags in strong.items():
            runs[name].append(plain(model, pfile, c, "--mode", "batched", *flags))
        runs["kiln"].append(kiln(model, pfile, tmp / "here", c))
        if bf16:
            runs["kiln fp32"].append(kiln(model, pfile, tmp / "fp32", c, "--precision", "fp32"))
        print(f"round {i + 1}: " + ", ".join(f"{k} {r[-1]['chars_per_s']:,.0f}"
                                             for k, r in runs.items()) + " chars/s", flush=True)
    naive = {name: median_run(runs[name], "chars_per_s") for name in NAIVE_KERNELS}
    batched = median_run(runs["batched"], "chars_per_s")
    stronger = {name: median_run(runs[name], "chars_per_s") for name in strong}
    here = median_run(runs["kiln"], "chars_per_s")
    fp32 = median_run(runs["kiln fp32"], "chars_per_s") if bf16 else None
    # kiln against the fastest naive kernel of the same round, round by round.
    per_round = [k["chars_per_s"] / max(runs[name][i]["chars_per_s"] for name in NAIVE_KERNELS)
                 for i, k in enumerate(runs["kiln"])]
    print(f"kiln generate: {here['whole_s']:.1f} s ({here['how']})", flush=True)
    ray = kiln(model, pfile, tmp / "ray", c, "--actors", str(cpus))
    print(f"kiln generate on Ray: {ray['whole_s']:.1f} s", flush=True)
    base_name = max(naive, key=lambda k: naive[k]["chars_per_s"])
    small = {k: small_job(model, prompts[:k], tmp, c, base_name) for k in args.small}
    for k, r in small.items():
        print(f"{k} prompts: {r}", flush=True)
    lanes = lanes_sweep(model, prompts[:1000], 100, chosen.gates, chosen.products)
    print(f"lanes: {lanes}", flush=True)
    forms = step_forms(model)
    print(f"an LSTM step, ms: {forms}", flush=True)
    from kiln.models.stepper import onednn_linear

    taken = f"{chosen.gates} gates with {chosen.products} products"
    isa = torch.backends.cpu.get_cpu_capability()

    gemm = matmul_rates()
    print(f"matmul GFLOP/s on one thread: {gemm}", flush=True)
    kernel = "oneDNN's linear" if onednn_linear() else "addmm"
    vocab = len(storage.load_model(str(model)).vocab)
    flops = 2 * (256 * 1024 + 512 * 1024 + 256 * vocab)  # a character: two layers and the head
    limit = max(gemm.values()) * 1e9 / flops
    assert here["chars"] == ray["chars"] == args.prompts * c

    base_rate = naive[base_name]["chars_per_s"]
    kiln_rate, ray_rate = here["chars_per_s"], ray["chars_per_s"]
    batched_whole = batched["chars"] / batched["whole_s"]
    whole = {name: r["chars"] / r["whole_s"] for name, r in stronger.items()}
    rows = [(f"naive, one sequence at a time, {name} ({r['prompts']} prompts; its loop)",
             r["chars_per_s"]) for name, r in naive.items()]
    rows += [("plain batched: 64 sequences through nn.LSTM, torch.multinomial; its loop",
              batched["chars_per_s"]),
             (f"plain batched, the whole command ({batched['whole_s']:.1f} s)", batched_whole),
             *[(f"plain {name}, the whole command ({r['whole_s']:.1f} s)", whole[name])
               for name, r in stronger.items()],
             (f"**`kiln generate`, the whole command** ({here['whole_s']:.1f} s, "
              f"{here['how']}, {cpus} processes{', bf16 products' if bf16 else ''})",
              kiln_rate),
             *([(f"`kiln generate --precision fp32`, the whole command ({fp32['whole_s']:.1f}"
                 f" s)", fp32["chars_per_s"])] if fp32 else []),
             (f"`kiln generate --actors {cpus}`, the whole command on a local Ray "
              f"({ray['whole_s']:.1f} s)", ray_rate)]
    table = "\n".join(f"| {name} | {rate:,.0f} | {rate / base_rate:.1f}x |"
                      for name, rate in rows)
    sweep = ", ".join(f"{k} lanes {v:,.0f}" for k, v in lanes.items())
    small_rows = "\n".join(
        f"| {k:,} | {r['naive']:.1f} s | {r['batched']:.1f} s | {r['kiln']:.1f} s | "
        f"**{r['naive'] / r['kiln']:.2f}x** | **{r['batched'] / r['kiln']:.2f}x** |"
        for k, r in small.items())
    gemm_text = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in gemm.items())
    best_name = max(whole, key=whole.get)
    best = stronger[best_name]
    fp32_vs = "" if fp32 is None else (
        "; `--precision fp32` against the plain fp32 loop of all prompts: "
        f"**{fp32['chars_per_s'] / whole['batched, all prompts']:.2f}x**")
    bf16_step = (f", {forms['sigmoid, bf16 products']:.2f} and "
                 f"{forms['tanh, bf16 products']:.2f} ms through each with bf16 products"
                 if "tanh, bf16 products" in forms else "")
    body = f"""
{args.prompts:,} prompts (standard-library lines, up to 80 chars) x {c} chars each, a 2x256
char-LSTM (embedding 64), temperature 1, {cpus} CPUs. Baselines: `bench/plain/sampling.py`
(plain PyTorch, imports nothing from kiln). The fastest naive kernel here is "{base_name}".

| sampler | chars/s | vs the fastest naive |
| --- | ---: | ---: |
{table}

- `kiln generate` against the plain batched-64 loop: **{kiln_rate / batched_whole:.2f}x**
  whole command to whole command ({kiln_rate / batched['chars_per_s']:.2f}x of its inner
  loop's rate); against the fastest naive kernel **{kiln_rate / base_rate:.1f}x**
  (medians of {args.rounds} alternating rounds; kiln against the same round's fastest naive
  kernel, round by round: {", ".join(f"{r:.1f}x" for r in per_round)}).
- Against the strongest plain loop here, {best_name} ({best['whole_s']:.1f} s whole):
  **{kiln_rate / whole[best_name]:.2f}x**{fp32_vs}.
- The naive loops are timed on their first prompts only (the whole set would take
  ~{args.prompts * c / base_rate / 60:.0f} min); every text is {c} chars, so rates compare.
  Their rates leave out Python's start and imports; kiln's include them.
- `models.sample` on one thread, 1,000 prompts x 100 chars: {sweep} chars/s
  (LANES = {LANES}; each block's last sequences step narrower, at every lane count).
- An upper layer's matrix product, (256, 512) @ (512, 1024) on one thread: {gemm_text}.
  kiln's sampler takes {kernel} here (`models.stepper.onednn_linear`).
- A sampling step at 256 lanes on one thread: {forms["sigmoid"]:.2f} ms with the LSTM's gates
  through sigmoid, {forms["tanh"]:.2f} ms through tanh alone{bf16_step}; kiln takes {taken}
  here, timed by `models.kernels` in {chosen.probe_s:.2f} s (once per CPU model, torch version
  and model shape; cached after; torch's kernels: {isa}).
- The physical limit: the LSTM costs {flops / 1e6:.2f} MFLOP a character (2x256, embedding
  folded into a table), so one core at {max(gemm.values()):.0f} GFLOP/s steps
  ~{limit:,.0f} characters a second at most, {cpus} cores ~{cpus * limit:,.0f}.

Small jobs, whole commands from launch to exit ({c} chars a prompt; the naive loop on
"{base_name}"; start-up included in all three). kiln steps fewer prompts than its lanes at a
narrower width (`models.stepper.Stepper.width_for`) and gives each CPU a block:

| prompts | naive | plain batched-64 | `kiln generate` | kiln vs naive | kiln vs batched |
| ---: | ---: | ---: | ---: | ---: | ---: |
{small_rows}

Load average (1 min) at the start {load_before:.1f}, at the end {os.getloadavg()[0]:.1f}.

Command: `.venv/bin/python bench/generate.py --prompts {args.prompts} --max-chars {c} \
--naive-prompts {n} --small {' '.join(map(str, args.small))} --rounds {args.rounds}`
"""
    print(body)
    if not args.no_write:
        from bench.sections import write_section

        write_section("Generation", body)


if __name__ == "__main__":
    main()
