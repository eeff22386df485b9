"""Generation benchmark: `kiln generate` side by side with the naive loop that samples one
sequence at a time (char-rnn's sample.lua way: prime with the prompt a character at a time,
then softmax + torch.multinomial per character, the plain nn.LSTM forward, default torch
settings), same model, same prompts, in one run, on this machine.

The model is a 2x256 char-LSTM (embedding 64) over the standard library's characters, with
untrained weights: sampling speed does not depend on their values. Prompts are lines of the
standard library's source. The naive loop is timed on the first --naive-prompts prompts only
(it runs ~1,000 chars/s); chars/s are comparable since every text is --max-chars long.

    .venv/bin/python bench/generate.py [--prompts 1000] [--max-chars 500] [--naive-prompts 20]
Writes the "## Generation" section of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sections import write_section  # noqa: E402
from jobs import embedded  # noqa: E402
from jobs.connect import RayOptions, ray_session  # noqa: E402
from jobs.generate import run_generate  # noqa: E402
from jobs.options import GenerateOptions  # noqa: E402
from models import (  # noqa: E402
    CharRNN,
    CharVocab,
    RNNSpec,
    SamplingSettings,
    load_folder,
    row_seed,
    save_folder,
)
from models import sample as kiln_sample  # noqa: E402


def make_model(folder: Path) -> Path:
    torch.manual_seed(0)
    vocab = CharVocab.build(embedded.stdlib_corpus(1_000_000))
    spec = RNNSpec(vocab.chars, "lstm", embed=64, hidden=256, layers=2)
    save_folder(folder / "model", CharRNN(len(vocab), "lstm", 64, 256, 2).eval(), "rnn", spec)
    return folder


def make_prompts(n: int) -> list[str]:
    lines = [s.strip() for s in embedded.stdlib_corpus(2_000_000).splitlines()]
    lines = [s[:80] for s in lines if len(s) >= 8]
    return [lines[(i * 7919) % len(lines)] for i in range(n)]


@torch.no_grad()
def naive(model: CharRNN, vocab: CharVocab, prompts: list[str], max_chars: int,
          temperature: float) -> list[str]:
    """One sequence at a time, as a user of nn.LSTM would write it."""
    out = []
    for prompt in prompts:
        state, x = None, None
        for c in prompt:  # prime: feed the prompt one character at a time
            x = torch.tensor([[vocab.stoi.get(c, 0)]])
            y, state = model.rnn(model.embed(x), state)
        chars = []
        for _ in range(max_chars):
            probs = torch.softmax(model.head(y[:, -1]) / temperature, dim=-1)  # (1, V)
            x = torch.multinomial(probs, 1)  # (1, 1)
            chars.append(vocab.itos[x.item()])
            y, state = model.rnn(model.embed(x), state)
        out.append("".join(chars))
    return out


def time_naive(loaded, prompts: list[str], max_chars: int) -> float:
    t0 = time.monotonic()
    naive(loaded.model, loaded.vocab, prompts, max_chars, 1.0)
    return len(prompts) * max_chars / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--max-chars", type=int, default=500)
    ap.add_argument("--naive-prompts", type=int, default=20)
    ap.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-gen-"))
    run = make_model(tmp / "run")
    prompts = make_prompts(args.prompts)
    (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
    loaded = load_folder(run)
    n_naive = min(args.naive_prompts, len(prompts))
    total = args.prompts * args.max_chars

    naive_rate = time_naive(loaded, prompts[:n_naive], args.max_chars)
    print(f"naive, one sequence at a time: {naive_rate:,.0f} chars/s ({n_naive} prompts)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # its per-call cost dominates single steps
    tuned_rate = time_naive(loaded, prompts[:n_naive], args.max_chars)
    torch.backends.mkldnn.enabled = True
    torch.set_num_threads(threads)
    print(f"naive, tuned: {tuned_rate:,.0f} chars/s")

    torch.set_num_threads(1)  # as in each kiln actor
    t0 = time.monotonic()
    seeds = [row_seed(0, i + 1) for i in range(len(prompts))]
    kiln_sample(loaded.model, loaded.vocab, prompts, seeds,
                SamplingSettings(max_chars=args.max_chars))
    plain_rate = total / (time.monotonic() - t0)
    torch.set_num_threads(threads)
    print(f"models.sample, one process, 1 thread: {plain_rate:,.0f} chars/s")

    t0 = time.monotonic()
    with ray_session(RayOptions()):
        ray_start = time.monotonic() - t0
        opts = GenerateOptions(model=str(run), output=str(tmp / "out"),
                               prompts=str(tmp / "prompts.txt"), max_chars=args.max_chars)
        t1 = time.monotonic()
        summary = run_generate(opts)
        job_s = time.monotonic() - t1
    kiln_rate = summary["chars_generated"] / job_s
    e2e_rate = summary["chars_generated"] / (time.monotonic() - t0)
    print(f"kiln generate: {kiln_rate:,.0f} chars/s ({e2e_rate:,.0f} with Ray's start)")
    assert summary["chars_generated"] == total

    body = report(args, n_naive, naive_rate, tuned_rate, plain_rate, kiln_rate, e2e_rate,
                  ray_start, summary["arguments"]["batch_size"])
    body += (f"\nLoad average (1 min) at the start {load_before:.1f}, at the end "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other work on the machine "
             "slows every row, the default naive loop's two OpenMP threads most of all.\n")
    print(body)
    if not args.no_write:
        write_section("Generation", body)


def report(args, n_naive, naive_rate, tuned_rate, plain_rate, kiln_rate, e2e_rate, ray_start,
           batch_size) -> str:
    rows = [
        (f"naive: one sequence at a time, nn.LSTM + torch.multinomial ({n_naive} prompts)",
         naive_rate, "1.0x"),
        ("naive, tuned: 1 thread, oneDNN off (`torch.backends.mkldnn.enabled = False`)",
         tuned_rate, f"{tuned_rate / naive_rate:.1f}x"),
        ("`models.sample` in one process, 1 thread (64 lanes, no Ray)", plain_rate,
         f"{plain_rate / naive_rate:.1f}x"),
        (f"`kiln generate` (Ray Data, {batch_size} rows a batch, an actor a CPU; Ray up)",
         kiln_rate, f"**{kiln_rate / naive_rate:.1f}x**"),
        (f"`kiln generate`, Ray's start ({ray_start:.1f} s) included", e2e_rate,
         f"{e2e_rate / naive_rate:.1f}x"),
    ]
    table = "\n".join(f"| {name} | {rate:,.0f} | {ratio} |" for name, rate, ratio in rows)
    total = args.prompts * args.max_chars
    return f"""
{args.prompts:,} prompts (standard-library lines, up to 80 chars) x {args.max_chars} chars each,
a 2x256 char-LSTM (embedding 64), temperature 1, every CPU of this machine.

| sampler | chars/s | vs naive |
| --- | ---: | ---: |
{table}

The naive loop is timed on the first {n_naive} prompts only (all {args.prompts:,} would take
~{total / naive_rate / 60:.0f} min); every text is {args.max_chars} chars, so the rates compare.
Against the tuned naive loop `kiln generate` is {kiln_rate / tuned_rate:.1f}x.
`kiln generate`'s time is the whole job but Ray's start: reading the prompts, starting the
actors and loading the model in each, sampling, writing Parquet and summary.json.

Command: `.venv/bin/python bench/generate.py --prompts {args.prompts} --max-chars \
{args.max_chars} --naive-prompts {n_naive}`
"""


if __name__ == "__main__":
    main()
