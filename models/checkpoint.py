"""The model folder's format: `config.json` (what to build, how to feed it, how it did) and
`weights.safetensors` (the state dict), and beside them for resume the optimizer's state, all
as {file name: bytes}. Loading never unpickles. No disk or storage I/O here: reading and
writing folders, and finding the model folder of a run, is pipelines.storage's."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from dataclasses import fields as fields_of
from typing import ClassVar

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.overrides import TorchFunctionMode

from .cnn import build_cnn
from .rnn import CharRNN
from .vocab import CharVocab

FORMAT = "kiln-model"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "weights.safetensors"


class ModelFolderError(ValueError):
    """A model folder that is missing, corrupt, or not what the caller needs."""


# A model family, as the model folder knows it, is its spec class: the `kind` it is saved
# under, how to build its network, the names its head is over (`labels`, which --init
# carries across by name), and the checks a config.json's spec must pass. Everything else
# that differs by family lives in the family's object one floor up (kiln.train.families).


@dataclass
class CNNSpec:
    kind: ClassVar[str] = "cnn"
    label_field: ClassVar[str] = "classes"
    head_offset: ClassVar[int] = 0  # the head's rows before the labels'
    arch: str
    classes: list[str]
    channels: int = 1
    image_size: int = 28
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])

    @property
    def name(self) -> str:
        return self.arch

    def build(self) -> torch.nn.Module:
        return build_cnn(self.arch, len(self.classes), self.channels, self.image_size)

    def head_names(self, model: torch.nn.Module) -> list[str]:
        """The tensors that depend on the classes: the last linear layer's."""
        last = None
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                last = name
        if last is None:
            raise ModelFolderError("this architecture has no linear head to replace")
        return [f"{last}.{k}" for k, _ in model.get_submodule(last).named_parameters()]

    @staticmethod
    def check(f: SpecFields) -> None:
        f.names("classes", LIMITS["classes"], 2)
        if not isinstance(f.spec.get("arch"), str):
            raise f.bad("arch must be a string")
        f.whole("channels", 1, 3)
        f.whole("image_size", 1, LIMITS["image_size"])
        channels = f.spec.get("channels", 1)
        # Pixels are 0..1: a mean or std far outside it is a mistake, and (x - mean) / std
        # must stay finite in float32 (std 1e-308 gave NaN confidences).
        for name, low, high in (("mean", -100.0, 100.0), ("std", 1e-4, 100.0)):
            v = f.spec.get(name, [0.5])
            if not isinstance(v, list) or len(v) not in (1, channels) or not all(
                    isinstance(x, int | float) and not isinstance(x, bool)
                    and low <= x <= high for x in v):
                raise f.bad(f"{name} must be {channels} number(s) from {low:g} to {high:g}, "
                            f"got {str(v)[:100]}")


@dataclass
class RNNSpec:
    kind: ClassVar[str] = "rnn"
    label_field: ClassVar[str] = "vocab"
    head_offset: ClassVar[int] = 1  # the unknown token's row
    vocab: list[str]
    cell: str = "lstm"
    embed: int = 64
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.0

    @property
    def name(self) -> str:
        return f"char-{self.cell}"

    def build(self) -> torch.nn.Module:
        return CharRNN(len(CharVocab(self.vocab)), self.cell, self.embed, self.hidden,
                       self.layers, self.dropout)

    def head_names(self, model: torch.nn.Module) -> list[str]:
        """The tensors that depend on the vocabulary: the embedding's and the output's."""
        return ["embed.weight", "head.weight", "head.bias"]

    @staticmethod
    def check(f: SpecFields) -> None:
        f.names("vocab", LIMITS["vocab"], 1)
        if not isinstance(f.spec.get("cell", "lstm"), str):
            raise f.bad("cell must be a string")
        for name in ("embed", "hidden", "layers"):
            f.whole(name, 1, LIMITS[name])
        d = f.spec.get("dropout", 0.0)
        if not isinstance(d, int | float) or isinstance(d, bool) or not 0 <= d < 1:
            raise f.bad(f"dropout must be a number in [0, 1), got {d!r}")


SPECS = {spec.kind: spec for spec in (CNNSpec, RNNSpec)}  # the registry of model families
KINDS = tuple(SPECS)


def build_model(kind: str, spec: CNNSpec | RNNSpec) -> torch.nn.Module:
    if kind not in SPECS:
        raise ModelFolderError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    if kind != spec.kind:
        raise ModelFolderError(f"a {type(spec).__name__} builds a {spec.kind} model, not a "
                               f"{kind} one")
    return spec.build()


def labels(spec: CNNSpec | RNNSpec) -> list[str]:
    """The names a model's head is over: a CNN's classes, a char-RNN's vocabulary."""
    return list(getattr(spec, spec.label_field))


@dataclass
class LoadedModel:
    kind: str
    spec: CNNSpec | RNNSpec
    model: torch.nn.Module
    config: dict  # the whole config.json, metrics and training settings included

    @property
    def id(self) -> str:
        return self.config["id"]

    @property
    def vocab(self) -> CharVocab:
        return CharVocab(self.spec.vocab)


def model_to_bytes(model: torch.nn.Module, kind: str, spec, extra: dict | None = None
                   ) -> dict[str, bytes]:
    """{file name: bytes} of the model folder. `extra` (metrics, training settings) joins the
    config; the id is the architecture plus a hash of the weights."""
    if kind != spec.kind:
        raise ModelFolderError(f"a {type(spec).__name__} describes a {spec.kind} model, not a "
                               f"{kind} one")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = st_save(state, metadata={"format": FORMAT})
    from . import __version__

    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kiln_version": __version__,
        "kind": kind,
        "id": f"{spec.name}-{hashlib.sha256(weights).hexdigest()[:12]}",
        "spec": asdict(spec),
        **(extra or {}),
    }
    return {CONFIG_FILE: json.dumps(config, indent=2).encode(), WEIGHTS_FILE: weights}


def parse_config(config_bytes: bytes, where: str = "config.json") -> dict:
    try:
        config = json.loads(config_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        msg = f"{where} is not valid JSON ({str(e)[:200]}); the model folder is corrupt"
        raise ModelFolderError(msg) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFolderError(f"{where} is not a kiln model config (no \"format\": \"{FORMAT}\")")
    version = config.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFolderError(f"{where}: format_version must be a whole number, got "
                               f"{version!r}; the model folder is corrupt")
    if version > FORMAT_VERSION:
        raise ModelFolderError(
            f"{where} has format version {config['format_version']}; this kiln reads up to "
            f"{FORMAT_VERSION}: upgrade kiln"
        )
    if config.get("kind") not in KINDS:
        raise ModelFolderError(f"{where} names kind {config.get('kind')!r:.100}; expected "
                               f"{KINDS}")
    model_id = config.get("id")
    if not isinstance(model_id, str) or not 0 < len(model_id) <= 200:
        raise ModelFolderError(f"{where}: \"id\" must be text of 1 to 200 characters (every "
                               "output row carries it); the model folder is corrupt")
    return config


class _NoInit(TorchFunctionMode):
    """torch.nn.init's initializers left out: on meta tensors each goes through a reference
    implementation whose first call imports torch._dynamo (1.6 s of a command's start)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def shapes_only():
    """Models built inside take no memory for their tensors (the meta device) and run no
    initializer: their shapes alone, before a model folder's weights are read. Torch function
    modes are per thread, so a model another thread builds meanwhile is initialized as ever."""
    with torch.device("meta"), _NoInit():
        yield


def model_from_bytes(config_bytes: bytes, weights_bytes: bytes, expect_kind: str | None = None,
                     where: str = "model folder") -> LoadedModel:
    config = parse_config(config_bytes, f"{where}/{CONFIG_FILE}")
    kind = config["kind"]
    if expect_kind and kind != expect_kind:
        raise ModelFolderError(
            f"{where} holds a {kind.upper()} model, but this command needs a "
            f"{expect_kind.upper()} model"
        )
    spec = parse_spec(kind, config.get("spec"), f"{where}/{CONFIG_FILE}")
    try:
        with shapes_only():
            expected = build_model(kind, spec).state_dict()
    except (TypeError, KeyError, ValueError) as e:
        msg = f"{where}/{CONFIG_FILE} does not describe a buildable model: {e}"
        raise ModelFolderError(msg) from None
    check_weights(weights_bytes, expected, f"{where}/{WEIGHTS_FILE}")
    model = build_model(kind, spec)
    try:
        state = st_load(weights_bytes)
    except Exception as e:  # the Rust parser raises several kinds
        raise ModelFolderError(f"{where}/{WEIGHTS_FILE} is corrupt or truncated: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFolderError(
            f"{where}/{WEIGHTS_FILE} does not match {CONFIG_FILE}: {str(e).splitlines()[0]} ..."
        ) from None
    model.eval()
    return LoadedModel(kind, spec, model, config)


# What a config.json may ask kiln to build: a hand-edited or hostile one must not take the
# machine's memory before its weights are compared with it (layers: 10**6 would be ~34 GB of
# modules). The sizes are far above what kiln trains.
LIMITS = {"classes": 100_000, "image_size": 2048, "vocab": 100_000, "embed": 16_384,
          "hidden": 16_384, "layers": 64}
HEADER_LIMIT = 16 * 1024 * 1024  # a safetensors header (JSON) of at most this many bytes
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1}


class SpecFields:
    """A config.json's spec (a dict) and the checks its family's fields take (`check`)."""

    def __init__(self, spec: dict, where: str):
        self.spec, self.where = spec, where

    def bad(self, why: str) -> ModelFolderError:
        return ModelFolderError(f"{self.where}: {why}; the model folder is corrupt or "
                                "hand-edited wrongly")

    def whole(self, name: str, low: int, high: int) -> None:
        v = self.spec.get(name)
        if name in self.spec and (not isinstance(v, int) or isinstance(v, bool)
                                  or not low <= v <= high):
            raise self.bad(f"{name} must be a whole number from {low} to {high:,}, got {v!r}")

    def names(self, name: str, limit: int, low: int) -> list:
        v = self.spec.get(name)
        if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
            raise self.bad(f"{name} must be a list of strings")
        if not low <= len(v) <= limit or len(set(v)) != len(v):
            raise self.bad(f"{name} must hold {low} to {limit:,} distinct names, got "
                           f"{len(v):,}")
        return v


def parse_spec(kind: str, spec, where: str) -> CNNSpec | RNNSpec:
    """The spec of a config.json, each field checked for its type and bounds (LIMITS)."""
    fields = SpecFields(spec, where)
    if not isinstance(spec, dict):
        raise fields.bad("\"spec\" must be an object")
    known = {f.name for f in fields_of(SPECS[kind])}
    if set(spec) - known:
        raise fields.bad(f"\"spec\" has unknown fields: {', '.join(sorted(set(spec) - known))}")
    SPECS[kind].check(fields)
    try:
        return SPECS[kind](**spec)
    except TypeError as e:
        raise fields.bad(str(e)) from None


def check_weights(data: bytes, expected: dict, where: str) -> None:
    """The safetensors header of `data` against the tensors the config builds (`expected`, a
    state dict of meta tensors): the same names and shapes, each tensor's bytes inside the
    file. Before any tensor is made: a mismatch costs no memory."""
    def bad(why: str) -> ModelFolderError:
        return ModelFolderError(f"{where} does not match {CONFIG_FILE}: {why}")

    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < n <= min(HEADER_LIMIT, len(data) - 8):
        raise ModelFolderError(f"{where} is corrupt or truncated: no safetensors header")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFolderError(f"{where} is corrupt: its header is not JSON") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{where} is corrupt: its header is not a table of tensors")
    header.pop("__metadata__", None)
    if not all(isinstance(v, dict) for v in header.values()):
        raise ModelFolderError(f"{where} is corrupt: its header is not a table of tensors")
    missing = [k for k in expected if k not in header]
    extra = [k for k in header if k not in expected]
    if missing or extra:
        raise bad("; ".join(p for p in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(extra[:3])}" if extra else "") if p))
    body = len(data) - 8 - n
    for name, t in expected.items():
        entry = header[name]
        shape, dtype = entry.get("shape"), entry.get("dtype")
        if shape != list(t.shape):
            raise bad(f"{name} is {shape}, the config builds {list(t.shape)}")
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(x, int) for x in offsets)) or dtype not in DTYPE_BYTES:
            raise ModelFolderError(f"{where} is corrupt at {name}")
        start, end = offsets
        if end - start != math.prod(shape) * DTYPE_BYTES[dtype] or not 0 <= start <= end <= body:
            raise ModelFolderError(f"{where} is corrupt or truncated at {name}")


def weights_limit(config: dict, where: str = CONFIG_FILE) -> int:
    """The most bytes a model folder's weights file may have for its config (its tensors in
    float64, and the largest header); a config that builds nothing is its error here, before
    the weights are read."""
    kind = config["kind"]
    spec = parse_spec(kind, config.get("spec"), where)
    try:
        with shapes_only():
            numel = sum(t.numel() for t in build_model(kind, spec).state_dict().values())
    except (TypeError, KeyError, ValueError) as e:
        raise ModelFolderError(f"{where} does not describe a buildable model: {e}") from None
    return 8 + HEADER_LIMIT + 8 * numel


OPTIMIZER_FILE, STATE_FILE = "optimizer.safetensors", "trainer_state.json"


def training_state_to_bytes(optimizer: torch.optim.Optimizer, state: dict
                            ) -> dict[str, bytes]:
    """{file name: bytes} of what resume needs beside the model folder: the optimizer's
    tensors as safetensors, its settings and the trainer's progress (`state`, JSON-able) as
    JSON. Resume reads these back, no pickle."""
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in opt["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    meta = {"trainer": state, "param_groups": opt["param_groups"], "scalars": scalars}
    return {OPTIMIZER_FILE: st_save(tensors), STATE_FILE: json.dumps(meta, indent=1).encode()}


def training_state_from_bytes(files: dict[str, bytes], optimizer: torch.optim.Optimizer | None,
                              where: str = "checkpoint") -> dict:
    """Restores the optimizer (when given) and returns the trainer's progress."""
    try:
        saved = json.loads(files[STATE_FILE])
        tensors = st_load(files[OPTIMIZER_FILE])
    except (KeyError, ValueError) as e:
        raise ModelFolderError(f"{where}: the training checkpoint is incomplete: {e}") from None
    if optimizer is not None:
        state: dict = {}
        for name, value in list(tensors.items()) + list(saved["scalars"].items()):
            idx, key = name.split(".", 1)
            state.setdefault(int(idx), {})[key] = value
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    return saved["trainer"]
