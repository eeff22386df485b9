"""The settings of each job, as typed dataclasses with their defaults. The CLI fills them from
flags; the job functions take them as they are and read no flags or environment. TrainOptions'
fields carry their command-line help (opt): kiln.cli builds `kiln train` and `kiln tune` from
them, so an option added here is on both commands, with its help."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field

# The loaded layers' share of the learning rate with --init: 1 measured best, ahead of 0.3
# and 0.1 (ResNet-8 on photos; measured: BENCHMARKS.md, Fine-tuning section)
BACKBONE_LR_SCALE = 1.0


def one_of(flag: str, value, choices) -> None:
    """Raises the one line that names a flag's value that is not among its `choices`."""
    if value not in choices:
        raise ValueError(f"unknown {flag} {value!r}; choose one of {', '.join(choices)}")


def opt(default=MISSING, help: str | dict = "", *, envvar: str | None = None,
        family: str | None = None, flag: str | None = None):
    """An option's field: its default, and its command-line help (a dict: a help for each
    model family's command), the environment variable it also reads, the one family whose
    command has it (None: every family's) and its flag where it is not the field's name.
    kiln.cli builds its job commands from these fields."""
    return field(default=default, metadata={"help": help, "envvar": envvar, "family": family,
                                            "flag": flag})


# The options several commands share, said once.
ADDRESS_HELP = "Ray cluster address; default: a local Ray for this command."
FORWARD_HELP = ("Give the cluster's processes this shell's AWS_* variables (in a package Ray "
                "uploads but never logs or shows); by default a cluster uses its own "
                "credentials.")
GPU_ACTOR_HELP = "One GPU per actor, bf16 autocast."
OVERWRITE_HELP = "Discard an existing output."
ACTORS_HELP = "Model replicas; default: fits the cluster."
TTA_HELP = ("flip: each image's scores averaged with its mirror image's (one row an image; "
            "twice the model's work); auto: flip where the model trained with flips (--augment "
            "flip, colour images' default); none.")


@dataclass
class TrainOptions:
    """kiln train's options; kiln tune's trials take them too (TuneOptions.train)."""

    kind: str  # the model family: "cnn" or "rnn" (kiln.train.families)
    data: str = opt(help={"cnn": "Parquet (image, label) or a class-per-folder dir/archive.",
                          "rnn": "UTF-8 text file(s) or Parquet with a `text` column."})
    out: str = opt(help={"cnn": "Run folder: model/, metrics.jsonl, curves.png.",
                         "rnn": "Run folder."})
    val: str | None = opt(None, {"cnn": "Validation data; default: hold out --val-fraction.",
                                 "rnn": "Validation text; default: hold out --val-fraction."})
    val_fraction: float = opt(0.1, {"cnn": "Share of --data held out for validation.",
                                    "rnn": "Share of the text held out (its end)."})
    # CNN
    arch: str = opt("mnist_cnn", "mnist_cnn, resnet8, resnet20, or a torchvision name such as "
                    "resnet18.", family="cnn")
    image_size: int = opt(28, "Images are resized to SIZE x SIZE.", family="cnn")
    channels: int = opt(1, "1 (grayscale) or 3 (RGB).", family="cnn")
    augment: str = opt("auto", "auto (pad-and-crop plus horizontal flips for 3 channels, shifts "
                       "for 1), flip, shift or none.", family="cnn")
    label_smoothing: float | None = opt(None, "The target's share spread evenly over the "
                                        "classes; default 0.1 for ResNets and torchvision "
                                        "networks, 0 for mnist_cnn.", family="cnn")
    # RNN
    cell: str = opt("lstm", "lstm, gru or rnn.", family="rnn")
    layers: int = opt(2, "Recurrent layers.", family="rnn")
    hidden: int = opt(256, "Hidden units per layer.", family="rnn")
    embed: int = opt(64, "Character embedding size.", family="rnn")
    dropout: float = opt(0.0, "Dropout between layers and before the output.", family="rnn")
    seq_len: int = opt(100, "Characters per chunk: the text is read in chunks, the hidden state "
                       "carried from one to the next (truncated BPTT length).", family="rnn")
    # How long, how fast
    epochs: int | None = opt(None, "Passes over the training data; default 10 unless "
                             "--time-limit or --max-steps sets the length.")
    max_steps: int | None = opt(None, "Stop after this many steps in total.")
    time_limit: float | None = opt(None, "Minutes of training and validation (start-up "
                                   "excluded). Alone, it sets the run's length: the learning "
                                   "rate anneals to zero by its end. With --epochs or "
                                   "--max-steps, whichever ends first.")
    batch_size: int | None = opt(None, {
        "cnn": "Global batch: images (default 128) per step, all workers together (each takes "
               "its share).",
        "rnn": "Global batch: text streams (default 64) per step, all workers together (each "
               "takes its share)."})
    lr: float | None = opt(None, "Peak learning rate; default 0.1 per 128 images for SGD, 2e-3 "
                           "for AdamW (4e-3 for char-RNNs).")
    optimizer: str = opt("auto", "auto (SGD with Nesterov momentum for ResNets and torchvision "
                         "networks, AdamW for mnist_cnn and char-RNNs), sgd or adamw.")
    workers: int = opt(2, "Ray Train workers (DDP).")
    gpu: bool = opt(False, "One GPU per worker, bf16 autocast.")
    resume: bool = opt(False, "Continue from the last checkpoint.")
    seed: int = opt(0, "Random seed.")
    init: str | None = opt(None, "Start from these weights: a kiln run or model folder, a "
                           ".safetensors file or a PyTorch state dict (.pt/.pth, read with "
                           "weights_only). When the classes (vocabulary) differ, the head is "
                           "replaced: a kiln model's rows of shared classes are carried, new "
                           "ones start fresh.")
    freeze_backbone: bool = opt(False, "With --init: train the head alone.")
    backbone_lr_scale: float = opt(BACKBONE_LR_SCALE, "With --init: the loaded layers' share "
                                   "of the learning rate (the head takes all of it).")
    address: str | None = opt(None, ADDRESS_HELP, envvar="RAY_ADDRESS")
    forward_credentials: bool = opt(False, FORWARD_HELP)
    debug: bool = False  # `kiln --debug`: tracebacks and Ray's own output on the console


@dataclass
class LabelOptions:
    model: str = opt(help="A trained CNN: the run folder or its model/ folder.")
    inputs: list[str] = opt(help="Directories, archives (.tar .tar.gz .tgz .zip), Parquet with "
                            "`image`, or globs; repeatable.", flag="--input")
    output: str = opt(help="Output folder: Parquet parts + summary.json.")
    top_k: int = opt(5, "Class names and scores kept per image.")
    batch_size: int = opt(128, "Images per forward pass.")
    gpu: bool = opt(False, GPU_ACTOR_HELP)
    overwrite: bool = opt(False, OVERWRITE_HELP)
    report: bool = opt(False, "Also write report.html beside it.")
    actors: int | None = opt(None, ACTORS_HELP)  # None: one per 1 CPU (or GPU) there is
    address: str | None = opt(None, ADDRESS_HELP, envvar="RAY_ADDRESS")
    debug: bool = False
    forward_credentials: bool = opt(False, FORWARD_HELP)
    tta: str = opt("none", TTA_HELP)


@dataclass
class GenerateOptions:
    model: str = opt(help="A trained char-RNN: run folder or model/ folder.")
    output: str = opt(help="Output folder: Parquet parts + summary.json.")
    prompts: str | None = opt(None, "UTF-8 text file, one prompt a line (id: the line number), "
                              "or Parquet with `prompt` (and optional `id`).")
    num_samples: int | None = opt(None, "Unconditional samples, when no --prompts.")
    max_chars: int = opt(200, "Characters generated per row.")
    temperature: float = opt(1.0, "Sampling temperature; 0 is greedy.")
    top_k: int = opt(0, "Sample among the K likeliest characters; 0: all.")
    seed: int = opt(0, "Each row is seeded from (seed, row id).")
    stop: str | None = opt(None, "Cut each text before this string.")
    batch_size: int | None = opt(None, "Rows per block and Parquet part; default: the sampling "
                                 "lanes (256 sequences stepped together on a CPU, 1024 on a "
                                 "GPU), or fewer: each local CPU's (or actor's) equal share of "
                                 "the rows.")  # GenerateJob.block_rows
    gpu: bool = opt(False, GPU_ACTOR_HELP)
    overwrite: bool = opt(False, OVERWRITE_HELP)
    actors: int | None = opt(None, ACTORS_HELP)
    address: str | None = opt(None, ADDRESS_HELP, envvar="RAY_ADDRESS")
    debug: bool = False
    precision: str = opt("auto", "The recurrent layers' matrix products: auto (bf16 on a GPU; "
                         "on a CPU, whichever of fp32 and bf16 is faster there, timed once and "
                         "cached), fp32 or bf16. The state stays fp32.")  # SamplingSettings
    forward_credentials: bool = opt(False, FORWARD_HELP)


@dataclass
class EvalOptions:
    model: str = opt(help="A trained model: the run folder or its model/ folder.")
    data: str = opt(help="CNN: labeled images in a training format (class-per-folder dir or "
                    "archive, Parquet with image and label). char-RNN: UTF-8 text or Parquet "
                    "`text`.")
    output: str = opt(help="Output folder: eval.json, eval.html, the scored rows as Parquet "
                      "parts, summary.json.")
    batch_size: int = opt(128, "Images per forward pass.")
    gpu: bool = opt(False, GPU_ACTOR_HELP)
    overwrite: bool = opt(False, OVERWRITE_HELP)
    actors: int | None = opt(None, ACTORS_HELP)
    address: str | None = opt(None, ADDRESS_HELP, envvar="RAY_ADDRESS")
    debug: bool = False
    forward_credentials: bool = opt(False, FORWARD_HELP)
    tta: str = opt("none", TTA_HELP)


@dataclass
class ReviewOptions:
    labels: str = opt(help="A kiln label output folder (or a kiln eval output).")
    model: str | None = opt(None, "The model whose classes the page offers; default: the one "
                            "that labeled the output.")
    export: str | None = opt(None, "Write the final labels (the person's where reviewed, else "
                             "the model's) to this .parquet or .csv file, and exit.")
    host: str = opt("127.0.0.1", "The address to serve on; another than this machine's own "
                    "lets others on the network review (and save decisions).")
    port: int = opt(8765, "The port to serve on; 0 picks a free one.")
    reviewer: str | None = opt(None, "The name each saved decision carries; default: the "
                               "user's login name.")
    debug: bool = False


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
