"""Starting weights for `kiln train --init`: a state dict read without unpickling code (a kiln
model folder's safetensors, a .safetensors file, or a .pt/.pth file through
torch.load(weights_only=True)) fitted to the model a run builds.

The head is what depends on the classes (a CNN's last linear layer) or on the vocabulary (a
char-RNN's embedding and output layer). Every other tensor must be in the source under its own
name and with its own shape, or the fit is one error naming the first keys that differ. The
head is loaded whole when a kiln source has the same classes (characters) in the same order;
when they differ, the head is replaced, its rows carried over by name: the rows of classes
both know are the source's, new classes start fresh (so a model of digits 0-4 grown to 0-9
still knows 0-4 at its first step). A bare state dict's head is loaded where its shape fits,
else it starts fresh. torchvision's own key names fit
kiln's torchvision architectures as they are (a one-channel model wraps the network as
`net.`)."""

from __future__ import annotations

import io
import pickle
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load

from .checkpoint import ModelFolderError, labels

WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "module")  # checkpoints' keys
PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's


class InitMismatch(ModelFolderError):
    """The source's tensors do not fit the model outside its head. `source_spec`: the
    source's own spec where it is a kiln model (a caller can say which options would fit)."""

    def __init__(self, message: str, source_spec: dict | None = None):
        super().__init__(message)
        self.source_spec = source_spec

    def __reduce__(self):  # raised in a Ray worker, it travels pickled
        return type(self), (str(self), self.source_spec)


@dataclass
class InitSource:
    """Weights to start from. `kind` and `spec` are known for a kiln model folder only."""

    where: str
    state: dict[str, torch.Tensor]
    kind: str | None = None
    spec: dict | None = None
    model_id: str | None = None


@dataclass
class InitFit:
    """What a run loads: `state` (every tensor but the fresh ones) and the names of the
    head's tensors (`head`), of which `fresh` start from the model's own initialization."""

    state: dict[str, torch.Tensor]
    head: list[str]
    fresh: list[str] = field(default_factory=list)
    carried: list[str] | None = None  # the classes (characters) whose head rows are the
    # source's, where the head is carried row by row
    of: int = 0  # the run's classes (characters)

    def describe(self) -> str:
        if not self.fresh:
            return f"{len(self.state)} tensors, the head included"
        if self.carried is not None:
            return (f"{len(self.state)} tensors; the head's rows of {len(self.carried)} of "
                    f"{self.of} classes (characters) carried, the others fresh")
        return f"{len(self.state)} tensors; the head ({', '.join(self.fresh)}) fresh"


def state_from_bytes(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch.save file. A pickle that holds
    anything but tensors and plain containers is refused, never run."""
    if where.lower().endswith(".safetensors"):
        try:
            return dict(st_load(data))
        except Exception as e:  # the Rust parser raises several kinds
            raise ModelFolderError(f"{where}: not a readable safetensors file: {e}") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported (global|operand)[^.]*?(?= was not|\.|$)", str(e))
        detail = found.group(0) if found else ""
        raise ModelFolderError(
            f"{where}: refused: the file holds pickled objects other than tensors, which "
            f"torch.load(weights_only=True) will not run{f' ({detail})' if detail else ''}; "
            "save a state dict (model.state_dict()) or a .safetensors file") from None
    except Exception as e:  # a truncated or foreign file
        raise ModelFolderError(f"{where}: not a PyTorch state dict: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return unwrap(obj, where)


def unwrap(obj, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, found under a checkpoint's usual keys and stripped of
    DDP's and torch.compile's prefixes."""
    if isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        for key in WRAPPERS:
            if isinstance(obj.get(key), dict):
                return unwrap(obj[key], where)
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()
            if not isinstance(v, int | float | str | type(None))):
        raise ModelFolderError(f"{where}: holds no state dict (a mapping of names to tensors)")
    state = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def align(source: dict[str, torch.Tensor], target: dict) -> dict[str, torch.Tensor]:
    """Source names as the model's: torchvision's bare names into a one-channel model's
    `net.` wrapper, and back."""
    if target and all(k.startswith("net.") for k in target) and not any(
            k.startswith("net.") for k in source):
        return {f"net.{k}": v for k, v in source.items()}
    if source and all(k.startswith("net.") for k in source) and not any(
            k.startswith("net.") for k in target):
        return {k[4:]: v for k, v in source.items()}
    return source


def shown(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def fit_init(source: InitSource, model: torch.nn.Module, spec) -> InitFit:
    """The source's tensors fitted to `model` (built from `spec`), or one error naming the
    first keys that differ outside the head (InitMismatch)."""
    if source.kind is not None and source.kind != spec.kind:
        raise ModelFolderError(f"--init {source.where} holds a {source.kind.upper()} model; "
                               f"this run trains a {spec.kind.upper()}")
    target = model.state_dict()
    state = align(source.state, target)
    head = spec.head_names(model)
    body = [k for k in target if k not in head]
    missing = [k for k in body if k not in state]
    unexpected = [k for k in state if k not in target]
    differ = [k for k in body if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or differ:
        parts = []
        if differ:
            parts.append("shapes differ at " + ", ".join(
                f"{k} (source {shown(state[k].shape)}, model {shown(target[k].shape)})"
                for k in differ[:3]))
        if missing:
            parts.append("missing from the source: " + ", ".join(missing[:3]))
        if unexpected:
            parts.append("not in the model: " + ", ".join(unexpected[:3]))
        raise InitMismatch(f"--init {source.where} does not fit this model: "
                           + "; ".join(parts), source.spec)
    loaded = {k: state[k].to(target[k].dtype) for k in body}
    ours = labels(spec)
    # A bare state dict names no classes: its head is taken where its shape fits.
    theirs = ours if source.spec is None else list(source.spec.get(spec.label_field) or [])
    if theirs == ours and all(k in state and state[k].shape == target[k].shape for k in head):
        loaded.update({k: state[k].to(target[k].dtype) for k in head})
        return InitFit(loaded, head)
    if source.spec is None or not all(
            k in state and state[k].shape[1:] == target[k].shape[1:] for k in head):
        return InitFit(loaded, head, fresh=head)
    return _carry_rows(state, target, loaded, head, theirs, ours, spec.head_offset)


def _carry_rows(state: dict, target: dict, loaded: dict, head: list, theirs: list,
                ours: list, offset: int) -> InitFit:
    """The head's rows by name: the rows of classes (a char-RNN's characters, and the
    `offset` rows before them: its unknown token at row 0) that both the source and the run
    know are the source's, the others the model's own initialization."""
    src = {c: i + offset for i, c in enumerate(theirs)}
    shared = [c for c in ours if c in src]
    rows_to = list(range(offset)) + [i + offset for i, c in enumerate(ours) if c in src]
    rows_from = list(range(offset)) + [src[c] for c in shared]
    for k in head:
        t = target[k].clone()
        t[rows_to] = state[k][rows_from].to(t.dtype)
        loaded[k] = t
    return InitFit(loaded, head, fresh=head, carried=shared, of=len(ours))
