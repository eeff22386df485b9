"""Bulk text generation on Ray Data: prompts are read by the driver, cut into blocks of
--batch-size rows, and go through an actor pool; each actor loads the char-RNN once, samples a
whole block with models.sample (256 lanes advanced together per step on a CPU, 1,024 on a
GPU; fewer for a small block or a block's last sequences, where that changes no bits), writes
the block's rows straight to the output as one Parquet part, and hands back only a small stats
row for the driver's progress and summary.

A part's name is the block's place in this run's order, so a task that Ray retries overwrites
its own part; a later run skips every id already written. A row's text depends only on the
model, its prompt, its seed (from the run's --seed and the row's id) and the settings.

Prompt inputs and their ids:
- a text file, UTF-8, one prompt a line: the id is the 1-based line number (int64);
  a trailing newline ends the last line, "\\r\\n" endings are accepted, a blank line is an
  empty prompt;
- Parquet with a string `prompt` column and an optional `id` column (integer or string,
  unique, no nulls); without `id`, the 0-based row number;
- --num-samples N: ids 0..N-1, empty prompts.

Bad prompts never fail a row: an empty or null prompt is primed with a newline (an
unconditional sample); characters the vocabulary lacks are fed as the unknown token UNK
(models/vocab.py) and counted; a prompt longer than `max_prompt_chars` keeps its last
characters and is counted."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kiln.models import CharVocab, SamplingSettings, row_seed, sample
from kiln.models.checkpoint import ModelFolderError

from . import sink, storage
from .bulk import BulkActor

PARQUET_SUFFIXES = (".parquet", ".pq")
SCHEMA = pa.schema([
    ("id", pa.int64()),  # or string, as the input's ids
    ("prompt", pa.string()),
    ("text", pa.string()),  # the continuation alone
    ("seed", pa.int64()),  # the row's own seed: row_seed(--seed, id)
    ("temperature", pa.float64()),
    ("top_k", pa.int32()),
    ("max_chars", pa.int32()),
    ("unknown_chars", pa.int32()),  # prompt characters the vocabulary lacks (fed as UNK)
    ("model", pa.string()),
])


class PromptError(ValueError):
    """A prompt input that cannot be read as prompts; the message names the line or column."""


# --- reading prompts (driver) -------------------------------------------------------------

def read_prompts(uri: str | None, num_samples: int | None = None) -> pa.Table:
    """(id, prompt) rows from a prompt file, or `num_samples` empty prompts."""
    if uri is None:
        if num_samples is None or num_samples < 1:
            raise PromptError("--num-samples must be >= 1")
        return pa.table({"id": pa.array(np.arange(num_samples, dtype=np.int64)),
                         "prompt": pa.array([""] * num_samples, pa.string())})
    data = storage.read_bytes(uri)
    if uri.lower().endswith(PARQUET_SUFFIXES) or data[:4] == b"PAR1":
        table = parquet_prompts(uri, data)
    else:
        table = text_prompts(uri, data)
    if table.num_rows == 0:
        raise PromptError(f"{uri} holds no prompts")
    return table


def text_prompts(uri: str, data: bytes) -> pa.Table:
    """One prompt a line; a line that is not UTF-8 stops the job with its number."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte order mark is not part of the first prompt
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise PromptError(
            f"{uri}: line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x} at column "
            f"{column}); prompt files must be UTF-8 text: convert it, e.g. with "
            "`iconv -f latin1 -t utf-8`"
        ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    lines = [s[:-1] if s.endswith("\r") else s for s in lines]
    return pa.table({"id": pa.array(np.arange(1, len(lines) + 1, dtype=np.int64)),
                     "prompt": pa.array(lines, pa.string())})


def parquet_prompts(uri: str, data: bytes) -> pa.Table:
    try:
        pf = pq.ParquetFile(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise PromptError(f"{uri} is not a readable Parquet file: {e}") from None
    names = pf.schema_arrow.names
    if "prompt" not in names:
        raise PromptError(f"{uri} has no `prompt` column (it has: {', '.join(names)})")
    table = pf.read(columns=[c for c in ("id", "prompt") if c in names])
    prompt = table.column("prompt")
    if not (pa.types.is_string(prompt.type) or pa.types.is_large_string(prompt.type)):
        raise PromptError(f"{uri}: the `prompt` column must hold strings, not {prompt.type}")
    prompt = prompt.cast(pa.string()).combine_chunks()
    if "id" not in names:
        ids = pa.array(np.arange(table.num_rows, dtype=np.int64))
    else:
        ids = table.column("id").combine_chunks()
        if pa.types.is_integer(ids.type):
            ids = ids.cast(pa.int64())
        elif pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
            ids = ids.cast(pa.string())
        else:
            raise PromptError(f"{uri}: the `id` column must hold integers or strings, not "
                              f"{ids.type}")
        if ids.null_count:
            raise PromptError(f"{uri}: the `id` column has {ids.null_count} null(s); every "
                              "row needs an id")
        counts = pc.value_counts(ids)
        dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        if len(dup):
            raise PromptError(f"{uri}: the `id` column repeats {dup[0].as_py()!r} (and "
                              f"{len(dup) - 1} more); ids must be unique to resume by them")
    return pa.table({"id": ids, "prompt": prompt})


def prompts_digest(table: pa.Table) -> str:
    """A short hash of the (id, prompt) rows: what a resumed run must find unchanged."""
    h = hashlib.sha256()
    for i, p in zip(table.column("id").to_pylist(), table.column("prompt").to_pylist(),
                    strict=True):
        h.update(f"{i!r}\x00{p!r}\x00".encode())
    return h.hexdigest()[:16]


@dataclass
class PromptStats:
    """What the vocabulary policy did to the prompts (counted once, over every input row)."""

    empty: int = 0  # empty or null: sampled unconditionally
    truncated: int = 0  # longer than max_prompt_chars: their last characters kept
    with_unknown: int = 0  # rows holding characters the vocabulary lacks
    unknown_chars: int = 0  # those characters, fed as UNK


def prompt_stats(prompts: list[str | None], vocab: CharVocab, max_prompt_chars: int
                 ) -> tuple[PromptStats, list[int]]:
    """The counts, and each row's unknown characters (within the part of it that is fed)."""
    stats, unknown = PromptStats(), []
    known = vocab.stoi
    for p in prompts:
        if not p:
            stats.empty += 1
            unknown.append(0)
            continue
        if len(p) > max_prompt_chars:
            stats.truncated += 1
            p = p[-max_prompt_chars:]
        n = sum(1 for c in p if c not in known)
        unknown.append(n)
        stats.with_unknown += n > 0
        stats.unknown_chars += n
    return stats, unknown


def table_prompt_stats(table: pa.Table, vocab: CharVocab, max_prompt_chars: int,
                       rows: int = 65_536) -> PromptStats:
    """prompt_stats' counts over a whole prompt table, `rows` prompts at a time as Python
    strings (a million prompts at once would hold them all)."""
    total = PromptStats()
    for start in range(0, table.num_rows, rows):
        prompts = table.column("prompt").slice(start, rows).to_pylist()
        part, _ = prompt_stats(prompts, vocab, max_prompt_chars)
        for f in dataclasses.fields(PromptStats):
            setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))
    return total


def plan_blocks(table: pa.Table, held, batch_size: int) -> list[pa.Table]:
    """The rows still to write, as blocks of batch_size rows, longest prompts first; `held`:
    the ids written already (an Arrow array).

    Each block is sampled in one call; similar lengths together waste fewer steps, and the
    long ones starting early keeps the last blocks short. Order changes no row's text."""
    if len(held):  # compared in held's type: string ids past 2 GiB are large_string there
        ids = table.column("id").cast(held.type)
        table = table.filter(pc.invert(pc.is_in(ids, value_set=held)))
    lengths = pc.fill_null(pc.utf8_length(table.column("prompt")), 0).to_numpy()
    order = np.argsort(-lengths, kind="stable")
    blocks = []
    for i in range(0, len(order), batch_size):
        # take(): a block of its own buffers. A slice would pickle (as a task) with the whole
        # table's, and a million prompts' plan would grow with its square.
        block = table.take(pa.array(order[i : i + batch_size]))
        seq = pa.array(np.arange(i, i + block.num_rows, dtype=np.int64))
        blocks.append(block.append_column("_seq", seq))
    return blocks


def characters_to_step(blocks: list[pa.Table], s: SamplingSettings) -> int:
    """The job's size in sampling steps of one lane: every prompt character is fed, then
    every generated one (an empty prompt is one newline)."""
    total = 0
    for block in blocks:
        lengths = pc.fill_null(pc.utf8_length(block.column("prompt")), 0).to_numpy()
        total += int(np.clip(lengths, 1, s.max_prompt_chars).sum()) + block.num_rows * s.max_chars
    return total


# --- the actor -----------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerateSettings:
    """What every actor needs; the driver fills it from the job's options."""

    model: str  # model URI (run folder or model/ folder)
    model_id: str  # what the driver loaded; an actor that finds another model stops
    output: str  # output folder URI
    run_id: str  # this run's part-name suffix (sink.OutputDir.run_id)
    sampling: SamplingSettings
    seed: int = 0
    gpu: bool = False
    threads: int = 1  # torch intra-op threads per actor (CPU)


class Generator(BulkActor):
    """The actor (of a Ray Data pool, or in the command's own threads or forked processes:
    kiln.bulk.executors): loads the model once, then samples a whole block of prompts per
    task into one part."""

    forks = True  # sampling's steps are too short to leave the GIL to threads

    def __init__(self, settings: GenerateSettings, loaded=None):
        """`loaded`: the model's LoadedModel when the caller has it already (in-process)."""
        import torch

        from kiln.models.runtime import keep_freed_memory

        self.torch, self.s = torch, settings
        torch.set_num_threads(max(1, settings.threads))
        keep_freed_memory()  # a step's buffers are reused, not page-faulted in again
        loaded = loaded or storage.load_model(settings.model, expect_kind="rnn")
        if loaded.id != settings.model_id:
            raise ModelFolderError(f"{settings.model} changed during the run (now "
                                   f"{loaded.id}, was {settings.model_id})")
        self.device = torch.device("cuda" if settings.gpu else "cpu")
        self.model = loaded.model.to(self.device).eval()
        self.vocab, self.model_id = loaded.vocab, loaded.id
        self.parts = sink.Parts(settings.output, settings.run_id)

    def _prompts_and_seeds(self, block: pa.Table) -> tuple[list[str], list[int]]:
        prompts = [p or "" for p in block.column("prompt").to_pylist()]
        return prompts, [row_seed(self.s.seed, i) for i in block.column("id").to_pylist()]

    def compute(self, block: pa.Table) -> list[str]:
        """The text of every row of a block: the compute alone (no I/O), which
        `pipelines.bulk.run_in_processes` runs in forked workers."""
        s = self.s.sampling
        prompts, seeds = self._prompts_and_seeds(block)
        with self.torch.autocast(self.device.type, dtype=self.torch.bfloat16,
                                 enabled=self.s.gpu and s.precision != "fp32"):
            return sample(self.model, self.vocab, prompts, seeds, s, self.device)

    def finish(self, block: pa.Table, texts: list[str]) -> Iterator[dict]:
        """Writes a block's rows with their texts as one part; yields its stats."""
        s = self.s.sampling
        prompts, seeds = self._prompts_and_seeds(block)
        _, unknown = prompt_stats(prompts, self.vocab, s.max_prompt_chars)
        table = output_table(block, texts, seeds, unknown, s, self.model_id)
        name = f"{pc.min(block.column('_seq')).as_py():010d}"
        stats = {"part": name, "rows": block.num_rows, "errors": {},
                 "chars": sum(len(t) for t in texts)}
        # A block is no unit of the input (blocks regroup on resume): its rows' ids tell.
        self.parts.write(name, table, {"unit": None, "last": False, "stats": stats})
        yield stats


def output_table(batch: pa.Table, texts: list[str], seeds: list[int], unknown: list[int],
                 s: SamplingSettings, model_id: str) -> pa.Table:
    n = batch.num_rows
    schema = SCHEMA.set(0, pa.field("id", batch.column("id").type))
    return pa.table({
        "id": batch.column("id"),
        "prompt": batch.column("prompt"),
        "text": pa.array(texts, pa.string()),
        "seed": pa.array(seeds, pa.int64()),
        "temperature": pa.array([s.temperature] * n, pa.float64()),
        "top_k": pa.array([s.top_k] * n, pa.int32()),
        "max_chars": pa.array([s.max_chars] * n, pa.int32()),
        "unknown_chars": pa.array(unknown, pa.int32()),
        "model": pa.array([model_id] * n, pa.string()),
    }, schema=schema)
