"""`kiln generate`: bulk text generation with a trained char-RNN.

The prompts are read and checked here (the model's kind, the prompt file's encoding), cut
into blocks, a task each; the shared bulk driver (jobs/bulk/run.py) skips the rows an earlier,
interrupted run of the same job wrote, samples the rest with pipelines.generate's Generator
in processes forked from this one (written here) or on a Ray Data actor pool, and writes
summary.json."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

from rich.console import Console

from kiln.bulk.run import BulkJob, Plan, check_options, prepare_process, run_bulk
from kiln.cluster import connect
from kiln.models import GPU_LANES, LANES, PRECISIONS, SamplingSettings
from kiln.options import GenerateOptions
from kiln.pipelines import generate as gen
from kiln.pipelines import storage
from kiln.pipelines.bulk import pack
from kiln.pipelines.fence import check_output
from kiln.pipelines.sink import OutputError, Written, read_job
from kiln.redact import redact

# How many characters a second one core steps with a 2x256 char-LSTM in fp32 (the slowest
# machine measured), and the gain from bf16 products where they are the faster (measured on
# AMX: BENCHMARKS.md, Generation section).
CHARS_PER_CPU_S = 22_000
BF16_SPEEDUP = 2.0
# Bounds where a larger value cannot work: a lane's buffer holds its prompt and text as int64
# (256 lanes x 100,000 characters: 205 MB a worker), and logits times 1/temperature must stay
# finite in float64 and tell characters apart.
MAX_CHARS = 100_000
MAX_SAMPLES = 10_000_000  # a plan's blocks are held in memory: ~0.4 GB at this many
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6


class GenerateJob(BulkJob):
    name, verb, done_word = "generate", "generating", "generated"
    key_columns = ["id"]
    actor = gen.Generator

    def __init__(self, opts: GenerateOptions, loaded, sampling: SamplingSettings, where=None):
        super().__init__(opts, loaded, where)
        self.table = gen.read_prompts(opts.prompts, opts.num_samples)  # bad UTF-8: by line
        self.stats = gen.table_prompt_stats(self.table, loaded.vocab, sampling.max_prompt_chars)
        self.kernels = None
        if not opts.gpu:  # the CPU kernels, decided here once for every worker of the job
            self.kernels = self.cpu_kernels(sampling)
            sampling = replace(sampling, precision=self.kernels.products,
                               gates=self.kernels.gates)
        self.s = sampling

    def cpu_kernels(self, sampling: SamplingSettings):
        """The form every worker steps in (models.kernels): an interrupted output's own where
        nothing set says otherwise (and, here, this CPU can take it); where the workers may
        run on other machines' CPUs, which this process cannot time, the first form unless
        set; else the fastest on this machine, whose CPUs its threads, its processes and a
        Ray started here alike step on, so that the rows are the same every way."""
        from kiln.models import kernels

        model, precision, gates = self.loaded.model, sampling.precision, sampling.gates
        was = {} if self.opts.overwrite else read_job(self.opts.output) or {}
        if was.get("job") == "generate" and "gates" not in was:
            raise OutputError(f"{redact(self.opts.output)} was written by an earlier kiln, which "
                              "did not record the kernels its texts were sampled in: finish it "
                              "with that kiln, or pass --overwrite to start it over")
        form = (was.get("gates"), was.get("precision"))
        remote = on_other_cpus(self.opts)
        if was.get("job") == "generate" and kernels.resumable(form, precision, gates) and (
                remote or form in kernels.candidates(model, precision, gates)):
            return kernels.Kernels(*form, how="resumed")
        if remote:
            return kernels.fixed(model, precision, gates)
        return kernels.choose(model, precision, sampling.lanes, gates=gates)

    @property
    def rate_per_cpu(self) -> float:
        """Characters a local core steps a second, at the precision this job samples in."""
        return CHARS_PER_CPU_S * (BF16_SPEEDUP if self.s.precision == "bf16" else 1.0)

    def identity(self) -> dict:
        """`prompts_digest`: a hash of the prompt rows, so an edited file is not resumed."""
        o, s = self.opts, self.s
        return {"model": self.loaded.id, "prompts": o.prompts,
                "prompts_digest": gen.prompts_digest(self.table), "num_samples": o.num_samples,
                "max_chars": s.max_chars, "temperature": s.temperature, "top_k": s.top_k,
                "seed": o.seed, "stop": s.stop, "lanes": s.lanes,
                "max_prompt_chars": s.max_prompt_chars, "precision": s.precision,
                "gates": s.gates}

    def plan(self, written: Written) -> Plan:
        held = written.column("id")  # every written row's id, one Arrow array, not a set
        blocks = gen.plan_blocks(self.table, held, self.block_rows(self.table.num_rows -
                                                                   len(held)))
        return Plan([pack(b) for b in blocks], sum(b.num_rows for b in blocks),
                    gen.characters_to_step(blocks, self.s))

    def block_rows(self, rows: int) -> int:
        """Rows per block (and Parquet part): --batch-size; else the lanes, or an equal share
        of the rows for each of --actors, or of this machine's CPUs, when that is fewer, so
        that a job of fewer rows than lanes per CPU keeps every one stepping: 300 prompts on
        2 CPUs are two blocks of 150, not 256 and 44 (a text does not depend on its block).
        A cluster's CPUs are not known before Ray starts: there, and with --gpu, the lanes
        unless --actors says."""
        o = self.opts
        if o.batch_size:
            return o.batch_size
        known = not (self.where.gpu or self.where.cluster)
        shares = o.actors or (self.where.cpus if known else 1)
        return max(1, min(self.s.lanes, -(-rows // shares)))

    def describe(self, plan: Plan, written: Written) -> str:
        kernels = f"; kernels: {self.kernels.describe()}" if self.kernels else ""
        return (f"kiln generate: {self.table.num_rows:,} prompts, {written.rows:,} already "
                f"written, {plan.rows:,} to go; model {self.loaded.id}{kernels}")

    def settings(self, out, layout) -> gen.GenerateSettings:
        return gen.GenerateSettings(model=self.opts.model, model_id=self.loaded.id,
                                    output=out.uri, run_id=out.run_id, sampling=self.s,
                                    seed=self.opts.seed, gpu=self.opts.gpu,
                                    threads=layout.threads)

    def summary(self, written: Written, parts: dict[str, dict], common: dict) -> dict:
        # No row fails: bad prompts are handled by the policy counted here.
        chars = sum(p["chars"] for p in parts.values())
        elapsed = common["elapsed_s"]
        st = self.stats
        return {"rows_in_output": common["rows_in"], "empty_prompts": st.empty,
                "truncated_prompts": st.truncated, "prompts_with_unknown_chars": st.with_unknown,
                "unknown_chars": st.unknown_chars, "chars_generated": chars,
                "chars_per_s": round(chars / elapsed, 1) if elapsed > 0 else 0.0,
                "kernels": dataclasses.asdict(self.kernels) if self.kernels else None}

    def totals(self, summary: dict) -> str:
        chars = summary["chars_generated"]
        return (f"[bold]done:[/] generated {summary['rows_written']:,} rows ({chars:,} chars) "
                f"in {summary['elapsed_s']:.1f} s: {summary['rows_per_s']:,.1f} rows/s, "
                f"{summary['chars_per_s']:,.0f} "
                f"chars/s; {summary['rows_in_output']:,}/{self.table.num_rows:,} rows in "
                f"{redact(self.opts.output)}; {self.stats.unknown_chars:,} unknown chars in "
                f"{self.stats.with_unknown:,} prompts")


def on_other_cpus(opts) -> bool:
    """Whether the job's workers may run on CPUs other than this machine's: a cluster named by
    --address or RAY_ADDRESS (which Ray Jobs sets for kiln submit's jobs), or a Ray this
    process joined that has more than one node."""
    import os
    import sys

    if opts.address or os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return sum(1 for n in ray.nodes() if n.get("Alive")) > 1


def sampling_of(opts: GenerateOptions) -> SamplingSettings:
    """The sampling settings; a bad value fails here, before anything runs."""
    if (opts.prompts is None) == (opts.num_samples is None):
        raise ValueError("give exactly one of --prompts or --num-samples")
    if opts.num_samples is not None and not 1 <= opts.num_samples <= MAX_SAMPLES:
        raise ValueError(f"--num-samples must be from 1 to {MAX_SAMPLES:,}, got "
                         f"{opts.num_samples:,}; for more, run several jobs with other --seed")
    if not 1 <= opts.max_chars <= MAX_CHARS:
        raise ValueError(f"--max-chars must be from 1 to {MAX_CHARS:,}, got {opts.max_chars:,}"
                         " (a lane holds its text while it samples: 256 lanes of this many)")
    t = opts.temperature
    if not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
        raise ValueError(f"--temperature must be 0 (greedy) or from {MIN_TEMPERATURE:g} to "
                         f"{MAX_TEMPERATURE:g}, got {t}: beyond, the logits divided by it "
                         "overflow or every character is as likely as any other")
    if opts.top_k < 0:
        raise ValueError(f"--top-k must be at least 0 (0 keeps every character), got "
                         f"{opts.top_k}")
    if opts.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got "
                         f"{opts.precision!r}")
    if opts.precision == "bf16" and not opts.gpu and not opts.address:
        from kiln.models.stepper import bf16_linear

        if not bf16_linear():
            raise ValueError("--precision bf16: this CPU has no bf16 matrix kernels "
                             "(oneDNN's); use auto or fp32")
    return SamplingSettings(max_chars=opts.max_chars, temperature=opts.temperature,
                            top_k=opts.top_k, stop=opts.stop or None,
                            lanes=GPU_LANES if opts.gpu else LANES, precision=opts.precision)


def run_generate(opts: GenerateOptions, console: Console | None = None) -> dict:
    """Runs the job; returns the summary that it also writes to OUTPUT/summary.json."""
    console = console or connect.console()
    where = check_options(opts)
    sampling = sampling_of(opts)
    opts = replace(opts, output=check_output(opts.output, [opts.prompts, opts.model]),
                   prompts=storage.absolute(opts.prompts) if opts.prompts else None)
    prepare_process(where)  # before the prompts are read into Arrow
    loaded = storage.load_model(opts.model, expect_kind="rnn")  # a CNN fails here, clearly
    if opts.top_k > len(loaded.vocab.chars):
        raise ValueError(f"--top-k {opts.top_k:,} is more than the model's "
                         f"{len(loaded.vocab.chars):,} characters: give at most that, or 0 "
                         "to keep every character")
    return run_bulk(GenerateJob(opts, loaded, sampling, where), console)
