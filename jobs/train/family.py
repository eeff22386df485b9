"""What a model family is to kiln above the model folder: the Family interface that each
family's object fills (kiln.train.cnn, kiln.train.rnn; registered in kiln.train.families), and
the Prepared data a family hands from the driver to the trainer. A family's object is a class
of static methods and values, never instantiated; importing one imports no torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Prepared:
    """A run's data as its family prepared it (`prepare`, then `for_options`)."""

    train: object  # a Ray Dataset: decoded uint8 images with their labels, or text streams
    val: object  # the same, for validation
    spec: object  # the model's spec (kiln.models CNNSpec | RNNSpec), for the run's options
    train_rows: int  # training images, or text streams
    summary: str  # one line for the console: sizes, classes or vocabulary, what was skipped
    steps_per_epoch: int = 0  # for the run's options (batch size, workers)
    whole_train: bool = True  # every worker holds the whole training set (else a split)
    init_source: object = None  # --init's InitSource, read once for every trial (kiln tune)
    resumed_init: dict | None = None  # where a resumed run started (train.init.resumed_init)


class Family:
    """The interface: what differs between model families on the driver's side. The defaults
    here are those of a family that has nothing to say on the matter."""

    kind = ""  # the model folder's kind (kiln.models.checkpoint.SPECS)
    metric, mode = "val_loss", "min"  # what picks the best validation, and which way
    metric_key = "val_loss"  # the curve drawn beside the loss
    evaluates = ""  # what kiln eval measures it on: "images" | "text"
    tunable: Mapping = MappingProxyType({})  # the options a search (kiln tune) may vary, and
    # their types
    batch_size = 64  # the default global batch: samples a step, all workers together
    adamw_lr = 1e-3  # the default peak rate with AdamW (SGD's is 0.1 per 128 samples)

    @staticmethod
    def task(spec, cfg):
        """The worker's side (a kiln.train.tasks object): batches, loss, validation."""
        raise NotImplementedError

    @staticmethod
    def auto(opts) -> dict:
        """{"optimizer", "label_smoothing"}: what --optimizer auto and an unset
        --label-smoothing mean for these options."""
        return {"optimizer": "adamw", "label_smoothing": 0.0}

    @staticmethod
    def check_options(opts) -> None:
        """Raises the one line that names a family option's mistake."""

    @staticmethod
    def worker_options(opts) -> dict:
        """The WorkerConfig fields of the family's own, as the workers take them."""
        return {}

    @staticmethod
    def held(cfg) -> tuple[bool, list[str]]:
        """(whether the workers hold the data, as object refs; the datasets split among them
        rather than read whole by each)."""
        return True, []

    @staticmethod
    def placeholder_spec(opts, known: dict | None):
        """The run's spec before its data is read, from the options and what an --init
        source `known` (its spec) says: only the head may still change."""
        raise NotImplementedError

    @staticmethod
    def start_from(spec, source_spec: dict | None):
        """The run's spec, started from a kiln model's spec `source_spec` (--init, or the
        start of a resumed run)."""
        return spec

    @staticmethod
    def init_hint(source_spec: dict) -> str:
        """What to pass for a run to fit the kiln model it starts from."""
        return ""

    @staticmethod
    def card_rows(spec) -> list[tuple[str, str]]:
        """The model card's rows of the family's own."""
        return []

    @staticmethod
    def summary_line(rec: dict) -> str:
        """A validation record, in one line."""
        return f"val_loss {rec['val_loss']:.4f}"

    @staticmethod
    def rank(rec: dict) -> tuple:
        """A validation record's rank: higher is better, compared as a tuple."""
        return (-rec["val_loss"],)

    @staticmethod
    def noise(rec: dict, now: dict) -> float:
        """One standard error of the first of `rank(rec)`: validations closer than a few of
        these are not told apart. `now`: the run's current record."""
        return 0.0

    @staticmethod
    def check_data(opts) -> dict:
        """Before Ray starts: the data read or planned, its mistakes raised; handed to
        `prepare` (and planned once)."""
        raise NotImplementedError

    @staticmethod
    def prepare(opts, early: dict) -> Prepared:
        """The data, prepared for training (on Ray Data)."""
        raise NotImplementedError

    @staticmethod
    def data_key(opts) -> tuple:
        """The options `prepare` depends on: runs that agree on them share prepared data."""
        raise NotImplementedError

    @staticmethod
    def for_options(opts, data: Prepared) -> Prepared:
        """Prepared data as a run with these options takes it."""
        return data
