"""The character-level language model family (kiln train rnn, the char-rnn family):
everything about training, measuring and describing a char-RNN that differs from a CNN, on the
driver's side: defaults, option checks, data planning, the metric, --init's details, the model
card's rows, what a search may vary, and what kiln eval measures it on. Its worker's side is
kiln.train.tasks.RNNTask; the registry, kiln.train.families. Importing it imports no torch."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from kiln.options import one_of
from kiln.train.family import Family, Prepared

if TYPE_CHECKING:  # the family's driver side imports no torch until a method needs it
    from kiln.models import RNNSpec

VAL_STREAMS_PER_WORKER = 4


class RNNFamily(Family):
    kind = "rnn"
    metric, mode = "val_loss", "min"  # what picks the best validation, and which way
    metric_key = "bits_per_char"  # the curve beside the loss
    evaluates = "text"  # kiln eval's input: text
    # The options a search (kiln tune) may vary, and their types.
    tunable = {"lr": float, "batch_size": int, "hidden": int, "layers": int, "embed": int,
               "dropout": float, "seq_len": int, "cell": str, "optimizer": str}

    batch_size = 64  # streams of text a step, all workers together
    # AdamW at 4e-3, held for 70% of the run, then decayed: a 2x256 LSTM's loss ends lower
    # than with char-rnn's constant 2e-3 (measured: BENCHMARKS.md, Training section).
    adamw_lr = 4e-3
    # --optimizer auto is AdamW, and there is no label smoothing (Family.auto).

    @staticmethod
    def task(spec, cfg):
        """The worker's side: a kiln.train.tasks.RNNTask."""
        from kiln.train.tasks import RNNTask

        return RNNTask(spec, cfg)

    @staticmethod
    def check_options(opts) -> None:
        from kiln.models import CELLS

        one_of("--cell", opts.cell, sorted(CELLS))
        for name, value in (("--layers", opts.layers), ("--hidden", opts.hidden),
                            ("--embed", opts.embed), ("--seq-len", opts.seq_len)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0 <= opts.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {opts.dropout}")

    @staticmethod
    def worker_options(opts) -> dict:
        """The WorkerConfig fields of the family's own, as the workers take them."""
        return {"seq_len": opts.seq_len}

    # Text streams are always held by the workers and never split: each worker picks its
    # own by number (Family.held).

    @staticmethod
    def placeholder_spec(opts, known: dict | None) -> RNNSpec:
        """The run's spec before its data is read: the options' architecture, the vocabulary
        `known` from an --init source where it has one (only the head depends on it)."""
        from kiln.models import RNNSpec

        vocab = (known or {}).get("vocab") or ["a", "b"]
        return RNNSpec(list(vocab), opts.cell, opts.embed, opts.hidden, opts.layers,
                       opts.dropout)

    @staticmethod
    def init_hint(s: dict) -> str:
        """What to pass for a run to fit the kiln model `s` (its spec) it starts from."""
        return (f"the source is {s['layers']} x {s['cell']} {s['hidden']} (embedding "
                f"{s['embed']}): pass --cell {s['cell']} --layers {s['layers']} --hidden "
                f"{s['hidden']} --embed {s['embed']}")

    @staticmethod
    def card_rows(spec: RNNSpec) -> list[tuple[str, str]]:
        return [("architecture", f"{spec.layers} x {spec.cell.upper()} {spec.hidden}, "
                                 f"embedding {spec.embed}, dropout {spec.dropout}"),
                ("vocabulary", f"{len(spec.vocab)} characters + UNK")]

    @staticmethod
    def summary_line(rec: dict) -> str:
        return (f"val_loss {rec.get('val_loss', float('nan')):.4f} nats/char  "
                f"{rec.get('bits_per_char', float('nan')):.4f} bits/char")

    # The best validation is the lowest loss (Family.rank).

    @staticmethod
    def noise(rec: dict, now: dict) -> float:
        """A mean over every character of the validation text: its noise is not measured,
        and is small next to a char-RNN's overfitting (the best validation is kept)."""
        return 0.0

    @staticmethod
    def check_data(opts) -> dict:
        """Before Ray starts: the text read, the vocabulary built, and the streams sized."""
        import numpy as np

        from kiln.models import CharVocab, RNNSpec
        from kiln.pipelines.train_data import read_text

        text = read_text(opts.data)
        if opts.val:
            train_text, val_text = text, read_text(opts.val)
        else:
            cut = int(len(text) * (1 - opts.val_fraction))
            train_text, val_text = text[:cut], text[cut:]
        vocab = CharVocab.build(train_text, min_count=2 if len(train_text) > 100_000 else 1)
        ids = np.asarray(vocab.encode(train_text), dtype=np.int64)
        # One stream per sequence of the global batch, unless the text is too short for each
        # to hold two chunks.
        streams = max(opts.workers, min(opts.batch_size, (len(ids) - 1) // (2 * opts.seq_len)))
        if (len(ids) - 1) // streams < 2 * opts.seq_len - 1:
            raise ValueError(f"the training text ({len(ids):,} characters) is too short for "
                             f"--seq-len {opts.seq_len} on {opts.workers} workers")
        val_ids = np.asarray(vocab.encode(val_text), dtype=np.int64)
        val_streams = min(opts.workers * VAL_STREAMS_PER_WORKER, len(val_ids) - 1)
        if val_streams < opts.workers:
            raise ValueError(f"the validation text ({len(val_ids):,} characters) is too short")
        note = f" ({streams} streams: the text is short)" if streams < opts.batch_size else ""
        return {"ids": ids, "streams": streams, "val_ids": val_ids,
                "val_streams": val_streams - val_streams % opts.workers,
                "spec": RNNSpec(vocab.chars, opts.cell, opts.embed, opts.hidden, opts.layers,
                                opts.dropout),
                "summary": f"{len(train_text):,} train / {len(val_text):,} val characters, "
                           f"vocabulary {len(vocab)}{note}"}

    @staticmethod
    def prepare(opts, early: dict) -> Prepared:
        from kiln.pipelines.train_data import text_streams
        from kiln.train.batches import text_steps

        length = (len(early["ids"]) - 1) // early["streams"]
        return RNNFamily.for_options(opts, Prepared(
            text_streams(early["ids"], early["streams"]).materialize(),
            text_streams(early["val_ids"], early["val_streams"]).materialize(),
            early["spec"], early["streams"], early["summary"],
            steps_per_epoch=text_steps(length, opts.seq_len)))

    @staticmethod
    def data_key(opts) -> tuple:
        """The options the text streams depend on (the streams are the batch)."""
        return opts.batch_size, opts.seq_len, opts.workers

    @staticmethod
    def for_options(opts, data: Prepared) -> Prepared:
        """Prepared data as a run with these options takes it: its architecture (the streams
        are the same for every width and depth)."""
        return replace(data, spec=replace(data.spec, cell=opts.cell, embed=opts.embed,
                                          hidden=opts.hidden, layers=opts.layers,
                                          dropout=opts.dropout))

