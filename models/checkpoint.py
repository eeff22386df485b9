"""The model folder's format: `config.json` (what to build, how to feed it, how it did) and
`weights.safetensors` (the state dict), and beside them for resume the optimizer's state, all
as {file name: bytes}. Loading never unpickles. No disk or storage I/O here: reading and
writing folders, and finding the model folder of a run, is pipelines.storage's."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .cnn import build_cnn
from .rnn import CharRNN
from .vocab import CharVocab

FORMAT = "kiln-model"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "weights.safetensors"
KINDS = ("cnn", "rnn")


class ModelFolderError(ValueError):
    """A model folder that is missing, corrupt, or not what the caller needs."""


@dataclass
class CNNSpec:
    arch: str
    classes: list[str]
    channels: int = 1
    image_size: int = 28
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])


@dataclass
class RNNSpec:
    vocab: list[str]
    cell: str = "lstm"
    embed: int = 64
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.0


SPECS = {"cnn": CNNSpec, "rnn": RNNSpec}


def build_model(kind: str, spec: CNNSpec | RNNSpec) -> torch.nn.Module:
    if kind == "cnn":
        return build_cnn(spec.arch, len(spec.classes), spec.channels, spec.image_size)
    if kind == "rnn":
        return CharRNN(len(CharVocab(spec.vocab)), spec.cell, spec.embed, spec.hidden,
                       spec.layers, spec.dropout)
    raise ModelFolderError(f"unknown model kind {kind!r}; expected one of {KINDS}")


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
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = st_save(state, metadata={"format": FORMAT})
    from . import __version__

    name = spec.arch if kind == "cnn" else f"char-{spec.cell}"
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kiln_version": __version__,
        "kind": kind,
        "id": f"{name}-{hashlib.sha256(weights).hexdigest()[:12]}",
        "spec": asdict(spec),
        **(extra or {}),
    }
    return {CONFIG_FILE: json.dumps(config, indent=2).encode(), WEIGHTS_FILE: weights}


def parse_config(config_bytes: bytes, where: str = "config.json") -> dict:
    try:
        config = json.loads(config_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = f"{where} is not valid JSON ({e}); the model folder is corrupt"
        raise ModelFolderError(msg) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFolderError(f"{where} is not a kiln model config (no \"format\": \"{FORMAT}\")")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFolderError(
            f"{where} has format version {config['format_version']}; this kiln reads up to "
            f"{FORMAT_VERSION}: upgrade kiln"
        )
    if config.get("kind") not in KINDS:
        raise ModelFolderError(f"{where} names kind {config.get('kind')!r}; expected {KINDS}")
    return config


def model_from_bytes(config_bytes: bytes, weights_bytes: bytes, expect_kind: str | None = None,
                     where: str = "model folder") -> LoadedModel:
    config = parse_config(config_bytes, f"{where}/{CONFIG_FILE}")
    kind = config["kind"]
    if expect_kind and kind != expect_kind:
        raise ModelFolderError(
            f"{where} holds a {kind.upper()} model, but this command needs a "
            f"{expect_kind.upper()} model"
        )
    try:
        spec = SPECS[kind](**config["spec"])
        model = build_model(kind, spec)
    except (TypeError, KeyError, ValueError) as e:
        msg = f"{where}/{CONFIG_FILE} does not describe a buildable model: {e}"
        raise ModelFolderError(msg) from None
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
