"""The image classifier family (kiln train cnn): everything about training, measuring and
describing a CNN that differs from a char-RNN, on the driver's side: defaults, option checks,
data planning, the metric, --init's details, the model card's rows, what a search may vary,
and what kiln eval measures it on. Its worker's side is kiln.train.tasks.CNNTask; the registry,
kiln.train.families. Importing it imports no torch (the CLI reads `tunable`)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

from kiln.options import one_of
from kiln.train.family import Family, Prepared

if TYPE_CHECKING:  # the family's driver side imports no torch until a method needs it
    from kiln.models import CNNSpec
    from kiln.train.tasks import WorkerConfig

TRAIN_CACHE_BYTES = 512 * 1024 * 1024  # a training set up to this size is held by each worker
# The ResNets' label smoothing: far better test accuracy on the team's photos after a short
# run, both seeds, and no worse after a longer one (BENCHMARKS.md, Photo recipe section).
LABEL_SMOOTHING = 0.1
MAX_IMAGE_SIZE = 2048  # beyond it one decoded image alone would take tens of megabytes


class CNNFamily(Family):
    kind = "cnn"
    metric, mode = "val_accuracy", "max"  # what picks the best validation, and which way
    metric_key = "val_accuracy"  # the curve beside the loss
    evaluates = "images"  # kiln eval's input: labeled images
    # The options a search (kiln tune) may vary, and their types.
    tunable = {"lr": float, "batch_size": int, "image_size": int, "arch": str,
               "optimizer": str, "augment": str, "label_smoothing": float}

    batch_size = 128  # images a step, all workers together
    adamw_lr = 2e-3  # the Keras MNIST net's

    @staticmethod
    def task(spec, cfg):
        """The worker's side: a kiln.train.tasks.CNNTask."""
        from kiln.train.tasks import CNNTask

        return CNNTask(spec, cfg)

    @staticmethod
    def auto(opts) -> dict:
        """What --optimizer auto and an unset --label-smoothing mean for the architecture:
        ResNets and torchvision networks train with SGD + Nesterov (the standard recipe) and
        label smoothing, the Keras MNIST net with AdamW and none."""
        keras = opts.arch == "mnist_cnn"
        return {"optimizer": "adamw" if keras else "sgd",
                "label_smoothing": 0.0 if keras else LABEL_SMOOTHING}

    @staticmethod
    def check_options(opts) -> None:
        from kiln.models import CNN_ARCHS
        from kiln.models.cnn import TORCHVISION_ARCHS
        from kiln.pipelines.transforms import choose_augment

        one_of("--arch", opts.arch, sorted(CNN_ARCHS))
        if opts.channels not in (1, 3):
            raise ValueError("--channels must be 1 or 3")
        if not 8 <= opts.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"--image-size must be between 8 and {MAX_IMAGE_SIZE}, got "
                             f"{opts.image_size}")
        if opts.arch in TORCHVISION_ARCHS and opts.image_size < 32:
            raise ValueError(f"--arch {opts.arch} needs --image-size of at least 32, got "
                             f"{opts.image_size}")
        choose_augment(opts.augment, opts.channels)
        if not 0 <= opts.label_smoothing < 1:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {opts.label_smoothing}")

    @staticmethod
    def worker_options(opts) -> dict:
        """The WorkerConfig fields of the family's own, as the workers take them."""
        from kiln.pipelines.transforms import choose_augment

        return {"augment": choose_augment(opts.augment, opts.channels),
                "label_smoothing": opts.label_smoothing}

    @staticmethod
    def held(cfg: WorkerConfig) -> tuple[bool, list[str]]:
        """(whether the workers hold the data, as object refs; the datasets split among
        them). Images are split only when the training set is too large for every worker to
        hold it; then they stream through Ray Train's ingest."""
        whole = cfg.feed.whole_train
        return whole and cfg.feed.cache_val, ["val"] + ([] if whole else ["train"])

    @staticmethod
    def placeholder_spec(opts, known: dict | None) -> CNNSpec:
        """The run's spec before its data is read: the options' architecture, the classes
        `known` from an --init source where it has them (only the head depends on them)."""
        from kiln.models import CNNSpec

        classes = (known or {}).get("classes") or ["a", "b"]
        return CNNSpec(opts.arch, list(classes), opts.channels, opts.image_size)

    @staticmethod
    def start_from(spec: CNNSpec, source_spec: dict | None) -> CNNSpec:
        """The run's spec, started from a kiln model's: one of the same channels keeps its
        input normalization, which its layers were trained on."""
        if source_spec and source_spec.get("channels") == spec.channels:
            return replace(spec, mean=list(source_spec["mean"]), std=list(source_spec["std"]))
        return spec

    @staticmethod
    def init_hint(s: dict) -> str:
        """What to pass for a run to fit the kiln model `s` (its spec) it starts from."""
        return (f"the source is a {s['arch']} for {s['channels']} x {s['image_size']} px "
                f"images: pass --arch {s['arch']} --image-size {s['image_size']} --channels "
                f"{s['channels']}")

    @staticmethod
    def card_rows(spec: CNNSpec) -> list[tuple[str, str]]:
        shown = ", ".join(spec.classes[:20]) + (" ..." if len(spec.classes) > 20 else "")
        return [("architecture", spec.arch),
                ("input", f"{spec.channels} x {spec.image_size} x {spec.image_size}, "
                          f"mean {spec.mean}, std {spec.std}"),
                ("classes", f"{len(spec.classes)}: {shown}")]

    @staticmethod
    def summary_line(rec: dict) -> str:
        return f"val_loss {rec['val_loss']:.4f}  val_accuracy {rec['val_accuracy']:.4f}"

    @staticmethod
    def rank(rec: dict) -> tuple[float, float]:
        """Accuracy, then loss: on a small validation set epochs often tie on accuracy, and
        the first of them is seldom the best model."""
        return rec["val_accuracy"], -rec["val_loss"]

    @staticmethod
    def noise(rec: dict, now: dict) -> float:
        """One standard error of the validation accuracy `rec` (binomial, over its images;
        a line of an older kiln has no count, the run's current line gives it): two
        validations closer than a few of these are not told apart by it. The accuracy is
        taken as (correct + 1) / (images + 2), so that a perfect score is not noiseless."""
        n = rec.get("val_images") or now.get("val_images") or 0
        if not n:
            return 0.0
        p = (rec["val_accuracy"] * n + 1) / (n + 2)
        return math.sqrt(p * (1 - p) / n)

    @staticmethod
    def check_data(opts) -> dict:
        """Before Ray starts: the data and validation sources are image sets laid out by
        class, with enough images for a batch."""
        from kiln.pipelines.train_data import check_image_source

        units, known = check_image_source(opts.data)
        val_units = check_image_source(opts.val)[0] if opts.val else []
        if known is not None and known < opts.batch_size:
            raise ValueError(f"{opts.data} holds {known} images, less than one batch of "
                             f"{opts.batch_size}: lower --batch-size")
        return {"units": units, "val_units": val_units}  # planned once

    @staticmethod
    def prepare(opts, early: dict) -> Prepared:
        """Decoded to uint8 on Ray Data; normalized by the workers with the training set's own
        mean and std."""
        from kiln.models import CNNSpec
        from kiln.pipelines.train_data import image_dataset
        from kiln.pipelines.transforms import ImagePreset

        preset = ImagePreset(opts.image_size, opts.channels)
        data = image_dataset(opts.data, preset, opts.val_fraction, seed=opts.seed,
                             shuffle_above=TRAIN_CACHE_BYTES, val_uri=opts.val,
                             units=early["units"], val_units=early["val_units"])
        spec = CNNSpec(opts.arch, data.classes, opts.channels, opts.image_size, data.mean,
                       data.std)
        rows = data.train.count()
        skipped = "".join(f"\n  skipped {bad}" for bad in data.skipped[:5])
        return CNNFamily.for_options(opts, Prepared(
            data.train, data.val, spec, rows,
            summary=f"{rows:,} train / {data.val.count():,} val images, "
                    f"{len(data.classes)} classes, {len(data.skipped)} skipped{skipped}",
            whole_train=data.train.size_bytes() <= TRAIN_CACHE_BYTES))

    @staticmethod
    def data_key(opts) -> tuple:
        """The options prepare() depends on: runs that agree on them share prepared data."""
        return opts.image_size, opts.channels

    @staticmethod
    def for_options(opts, data: Prepared) -> Prepared:
        """Prepared data as a run with these options takes it: its architecture, its steps an
        epoch."""
        from kiln.train.batches import image_steps

        per_epoch = image_steps(data.train_rows, opts.batch_size, opts.workers,
                                data.whole_train)
        if per_epoch < 1:
            raise ValueError(f"{data.train_rows} training images are less than one batch "
                             f"of {opts.batch_size}: lower --batch-size")
        return replace(data, spec=replace(data.spec, arch=opts.arch), steps_per_epoch=per_epoch)

