"""A training run's data as its family prepared it (the family's `prepare` and
`for_options`), handed from the driver to the trainer: one typed record instead of a dict
whose keys depend on the family."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prepared:
    train: object  # a Ray Dataset: decoded uint8 images with their labels, or text streams
    val: object  # the same, for validation
    spec: object  # the model's spec (kiln.models CNNSpec | RNNSpec), for the run's options
    train_rows: int  # training images, or text streams
    summary: str  # one line for the console: sizes, classes or vocabulary, what was skipped
    steps_per_epoch: int = 0  # for the run's options (batch size, workers)
    whole_train: bool = True  # every worker holds the whole training set (else a split)
    init_source: object = None  # --init's InitSource, read once for every trial (kiln tune)
    resumed_init: dict | None = None  # where a resumed run started (train.init.resumed_init)
