"""The settings of each job, as typed dataclasses with their defaults. The CLI fills them from
flags; the job functions take them as they are and read no flags or environment."""

from __future__ import annotations

from dataclasses import dataclass, field

# The loaded layers' share of the learning rate with --init: 1 measured best, ahead of 0.3
# and 0.1 (ResNet-8 on photos; measured: BENCHMARKS.md, Fine-tuning section)
BACKBONE_LR_SCALE = 1.0


def one_of(flag: str, value, choices) -> None:
    """Raises the one line that names a flag's value that is not among its `choices`."""
    if value not in choices:
        raise ValueError(f"unknown {flag} {value!r}; choose one of {', '.join(choices)}")


@dataclass
class TrainOptions:
    kind: str  # "cnn" or "rnn"
    data: str  # training data URI
    out: str  # run folder URI
    val: str | None = None  # validation data URI; else a --val-fraction of data is held out
    val_fraction: float = 0.1
    epochs: int | None = None  # None: 10, unless --max-steps or --time-limit set the length
    max_steps: int | None = None  # stop after this many optimizer steps in total
    time_limit: float | None = None  # minutes of training and validation; alone, it sets the
    # run's length and the learning rate anneals by its end
    batch_size: int | None = None  # global (all workers); None: 128 images or 64 streams
    lr: float | None = None  # peak; None: 0.1 per 128 images for SGD, else AdamW 2e-3 (CNN) or
    # 4e-3 (char-RNN)
    workers: int = 2
    gpu: bool = False
    resume: bool = False
    seed: int = 0
    optimizer: str = "auto"  # auto (SGD + Nesterov for ResNets, else AdamW) | sgd | adamw
    init: str | None = None  # starting weights: a kiln run/model folder, .safetensors, .pt
    freeze_backbone: bool = False  # with --init: train the head alone
    backbone_lr_scale: float = BACKBONE_LR_SCALE  # with --init: the loaded layers' share of
    # the learning rate
    # CNN
    arch: str = "mnist_cnn"
    image_size: int = 28
    channels: int = 1
    augment: str = "auto"  # auto | flip | shift | none (auto: flip for 3 channels)
    label_smoothing: float | None = None  # the target's share spread evenly over the classes;
    # None: 0.1 for the ResNets and torchvision networks (bench/recipe.py), 0 for mnist_cnn
    # RNN
    cell: str = "lstm"
    layers: int = 2
    hidden: int = 256
    embed: int = 64
    dropout: float = 0.0
    seq_len: int = 100
    address: str | None = None
    forward_credentials: bool = False  # a cluster's processes get this shell's AWS variables
    debug: bool = False  # --debug: tracebacks and Ray's own output on the console


@dataclass
class LabelOptions:
    model: str
    inputs: list[str]
    output: str
    top_k: int = 5
    batch_size: int = 128
    gpu: bool = False
    overwrite: bool = False
    report: bool = False
    actors: int | None = None  # None: one per 1 CPU (or GPU) the cluster has
    address: str | None = None
    debug: bool = False
    forward_credentials: bool = False  # a cluster's processes get this shell's AWS variables
    tta: str = "none"  # none | flip | auto (flip where the model trained on mirrored images)


@dataclass
class GenerateOptions:
    model: str
    output: str
    prompts: str | None = None  # a text file (one prompt a line) or Parquet with `prompt`
    num_samples: int | None = None  # unconditional samples when no prompts are given
    max_chars: int = 200
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: str | None = None
    batch_size: int | None = None  # rows per block and Parquet part; None: the lanes (256 on
    # a CPU, 1024 on a GPU), or each CPU's or actor's share of the rows (GenerateJob.block_rows)
    gpu: bool = False
    overwrite: bool = False
    actors: int | None = None
    address: str | None = None
    debug: bool = False
    precision: str = "auto"  # the recurrent products: auto, fp32 or bf16 (SamplingSettings)
    forward_credentials: bool = False  # a cluster's processes get this shell's AWS variables


@dataclass
class SubmitOptions:
    entrypoint: list[str]
    address: str | None = None
    gpus: float = 0
    cpus: float = 1
    wait: bool = True
    working_dir: str = "."
    env: dict[str, str] = field(default_factory=dict)
    forward_credentials: bool = False  # the job's processes get this shell's AWS variables


@dataclass
class TuneOptions:
    train: TrainOptions  # the options every trial shares; `out` is the search folder
    spaces: dict[str, str | None] = field(default_factory=dict)  # searchable option -> its
    # text as typed: a value, a list "64,128" or a range "1e-4:1e-2:log" (jobs/tune/space.py)
    trials: int | None = None  # None: the whole grid of lists, or 8 points with a range
    concurrent: int | None = None  # None: what the cluster's CPUs (GPUs) hold at --workers
    scheduler: str = "asha"  # asha | fifo
    search_time_limit: float | None = None  # minutes for the whole search
