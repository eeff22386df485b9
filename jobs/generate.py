"""`kiln generate`: bulk text generation with a trained char-RNN, in this process's threads
or on a Ray Data actor pool (jobs.connect.runs_here decides).

The driver checks everything it can before Ray starts (the model's kind, the prompt file's
encoding, the output folder), then follows one stats row per written part for live progress
and writes summary.json. Re-running with the same arguments writes only the missing rows."""

from __future__ import annotations

import dataclasses
import math
import time

from rich.console import Console

from jobs.connect import RayOptions, local_cpus, may_run_here, ray_session, runs_here
from jobs.options import GenerateOptions
from jobs.redact import redact
from models import GPU_LANES, LANES, SamplingSettings
from pipelines import generate as gen
from pipelines import sink, storage

# One core steps a 2x256 char-LSTM ~22,000 characters a second (bench/generate.py).
CHARS_PER_CPU_S = 22_000


def settings_of(opts: GenerateOptions) -> SamplingSettings:
    """The sampling settings; a bad value fails here, before anything runs."""
    if opts.batch_size is not None and opts.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if opts.actors is not None and opts.actors < 1:
        raise ValueError("--actors must be >= 1")
    if (opts.prompts is None) == (opts.num_samples is None):
        raise ValueError("give exactly one of --prompts or --num-samples")
    return SamplingSettings(max_chars=opts.max_chars, temperature=opts.temperature,
                            top_k=opts.top_k, stop=opts.stop or None,
                            lanes=GPU_LANES if opts.gpu else LANES)


def job_args(opts: GenerateOptions, model_id: str, s: SamplingSettings, prompts: str) -> dict:
    """The arguments that decide the output's rows: a re-run must match them to resume.
    `prompts` is a digest of the prompt rows, so an edited prompt file is not resumed."""
    return {"command": "generate", "model": model_id, "prompts": opts.prompts,
            "prompts_digest": prompts, "num_samples": opts.num_samples, "max_chars": s.max_chars,
            "temperature": s.temperature, "top_k": s.top_k, "seed": opts.seed, "stop": s.stop,
            "lanes": s.lanes, "max_prompt_chars": s.max_prompt_chars}


def plan_actors(opts: GenerateOptions, n_blocks: int) -> tuple[int, float, float, int]:
    """(actors, CPUs per actor, GPUs per actor, torch threads per actor) for this cluster.

    On CPUs each actor asks for slightly less than its share, so that Ray Data's own small
    tasks are never starved of a CPU by a pool that holds them all (ray#44687)."""
    import ray

    res = ray.cluster_resources()
    if opts.gpu:
        gpus = int(res.get("GPU", 0))
        if gpus < 1:
            raise ValueError("--gpu was given but the Ray cluster has no GPU")
        actors = min(opts.actors or gpus, n_blocks)
        return actors, 1.0, 1.0, 1
    cpus = max(1, int(res.get("CPU", 1)))
    actors = min(opts.actors or cpus, n_blocks)
    share = cpus / actors
    return actors, round(0.9 * share, 2), 0.0, max(1, math.floor(share))


def run_generate(opts: GenerateOptions, console: Console | None = None) -> dict:
    console = console or Console(stderr=True, soft_wrap=True)
    start = time.monotonic()
    if may_run_here(opts):
        sink.skip_pandas_probe()  # before the prompts are read into Arrow
    s = settings_of(opts)
    loaded = storage.load_model(opts.model, expect_kind="rnn")  # a CNN fails here, clearly
    table = gen.read_prompts(opts.prompts, opts.num_samples)  # bad UTF-8 fails here, by line
    stats, _ = gen.prompt_stats(table.column("prompt").to_pylist(), loaded.vocab,
                                s.max_prompt_chars)
    job = job_args(opts, loaded.id, s, gen.prompts_digest(table))
    out = sink.OutputDir(opts.output, job, opts.overwrite)
    done = out.prepare(["id"])
    rows_per_block = opts.batch_size or s.lanes
    blocks = gen.plan_blocks(table, done, rows_per_block)
    todo = sum(b.num_rows for b in blocks)
    console.print(f"kiln generate: {table.num_rows:,} prompts, {table.num_rows - todo:,} "
                  f"already written, {todo:,} to go; model {loaded.id}", highlight=False)
    progress = sink.Progress(todo, "generate", console)
    chars = 0
    if blocks:
        parts_before = set(out.parts())
        work = gen.characters_to_step(blocks, s)
        if runs_here(opts, work, CHARS_PER_CPU_S):
            workers = min(local_cpus(), len(blocks))
            console.print(f"  sampling {len(blocks):,} block(s) in this process on {workers} "
                          "thread(s)", highlight=False)
            chars = _run_here(opts, loaded.id, out, s, blocks, workers, progress)
        else:
            with ray_session(RayOptions(address=opts.address)):
                chars = _run_pipeline(opts, loaded.id, out, s, blocks, rows_per_block,
                                      progress)
        _remove_late_parts(out, parts_before, console)
    summary = _summary(opts, loaded.id, table.num_rows, table.num_rows - todo, progress,
                       chars, stats, time.monotonic() - start)
    out.write_summary(summary)
    console.print(
        f"generated {progress.done:,} rows ({chars:,} chars) in {summary['elapsed_s']:.1f} s: "
        f"{summary['rows_per_s']:,.1f} rows/s, {summary['chars_per_s']:,.0f} chars/s; "
        f"{summary['rows_in_output']:,}/{table.num_rows:,} rows in {opts.output}; "
        f"{stats.unknown_chars:,} unknown chars in {stats.with_unknown:,} prompts",
        highlight=False)
    return summary


def _run_here(opts, model_id, out, s, blocks, workers, progress) -> int:
    """The actors' own code in this process: `workers` threads, one torch thread each (as
    each actor has, so the rows are the same), each sampling the next block as it finishes
    one. The step's matrix products and pointwise kernels release the GIL: 2 threads sample
    as fast as 2 forked processes did (measured)."""
    from concurrent.futures import ThreadPoolExecutor

    settings = gen.GenerateSettings(model=opts.model, model_id=model_id, output=out.uri,
                                    run_id=out.run_id, sampling=s, seed=opts.seed,
                                    gpu=False, threads=1)
    generator = gen.Generator(settings)
    chars = 0
    pool = ThreadPoolExecutor(workers, "kiln-generate")
    try:
        for result in pool.map(generator, blocks):
            progress.update(sum(result.column("rows").to_pylist()))
            chars += sum(result.column("chars").to_pylist())
    finally:  # on an error or Ctrl-C the blocks not begun are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)
    return chars


def _run_pipeline(opts, model_id, out, s, blocks, rows_per_block, progress) -> int:
    actors, num_cpus, num_gpus, threads = plan_actors(opts, len(blocks))
    settings = gen.GenerateSettings(model=opts.model, model_id=model_id, output=out.uri,
                                    run_id=out.run_id, sampling=s, seed=opts.seed,
                                    gpu=opts.gpu, threads=threads)
    ds = gen.generate_dataset(blocks, settings, rows_per_block, actors, num_cpus, num_gpus)
    chars = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows = sum(batch.column("rows").to_pylist())
        chars += sum(batch.column("chars").to_pylist())
        progress.update(rows)
    return chars


def _remove_late_parts(out: sink.OutputDir, before: set[str], console: Console) -> None:
    """Deletes parts that an earlier, killed run's last actors wrote after this run read
    which rows were done: this run has written each of their rows again."""
    mine = f"-{out.run_id}.parquet"
    for part in out.parts():
        if part not in before and not part.endswith(mine):
            storage.delete_dir(part)
            console.print(f"  removed {part}: written late by an interrupted run", highlight=False)


def _summary(opts, model_id, rows_in, done_before, progress, chars, stats, elapsed) -> dict:
    # Rates cover this run's rows and time, Ray's start included.
    args = {k: redact(v) if isinstance(v, str) else v
            for k, v in dataclasses.asdict(opts).items()}
    return {
        "command": "generate",
        "model": model_id,
        "rows_in": rows_in,
        "rows_written": progress.done,
        "rows_already_done": done_before,
        "rows_in_output": done_before + progress.done,
        "errors": {},  # no row fails: bad prompts are handled by the policy counted below
        "empty_prompts": stats.empty,
        "truncated_prompts": stats.truncated,
        "prompts_with_unknown_chars": stats.with_unknown,
        "unknown_chars": stats.unknown_chars,
        "chars_generated": chars,
        "elapsed_s": round(elapsed, 3),
        "rows_per_s": round(progress.done / elapsed, 3) if elapsed > 0 else 0.0,
        "chars_per_s": round(chars / elapsed, 1) if elapsed > 0 else 0.0,
        "arguments": args,
    }
