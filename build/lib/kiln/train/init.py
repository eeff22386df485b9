"""`kiln train --init URI`: where the starting weights come from (a kiln run or model folder,
a .safetensors file, a .pt/.pth state dict; local or s3://), checked against the run's
architecture before Ray starts and fitted to its classes or vocabulary once the data is known
(models/init.py)."""

from __future__ import annotations

import functools
from dataclasses import replace

from kiln.pipelines import storage

STATE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@functools.lru_cache(maxsize=4)
def read_init(uri: str):
    """The InitSource at a URI: read once per process (a search's trials share it)."""
    from dataclasses import asdict

    from kiln.models.checkpoint import CONFIG_FILE
    from kiln.models.init import InitSource, state_from_bytes

    if storage.exists(storage.join(storage.model_dir(uri), CONFIG_FILE)):  # a kiln model
        loaded = storage.load_model(uri)
        return InitSource(uri, dict(loaded.model.state_dict()), loaded.kind,
                          asdict(loaded.spec), loaded.id)
    if not uri.lower().endswith(STATE_SUFFIXES):
        raise ValueError(f"--init {uri}: not a kiln run or model folder, nor a weights file "
                         f"({', '.join(STATE_SUFFIXES)})")
    if not storage.exists(uri):
        raise storage.StorageError(f"--init {uri}: not found")
    return InitSource(uri, state_from_bytes(storage.read_bytes(uri), uri))


def placeholder_spec(opts, source):
    """The run's spec before its data is read: the architecture is the options', the classes
    or vocabulary the source's where it has them (only the head depends on them)."""
    from kiln.models import CNNSpec, RNNSpec

    known = source.spec if source.kind == opts.kind else None
    if opts.kind == "cnn":
        classes = (known or {}).get("classes") or ["a", "b"]
        return CNNSpec(opts.arch, list(classes), opts.channels, opts.image_size)
    vocab = (known or {}).get("vocab") or ["a", "b"]
    return RNNSpec(list(vocab), opts.cell, opts.embed, opts.hidden, opts.layers, opts.dropout)


def check_init(opts) -> None:
    """Before Ray starts: the source is readable and fits the architecture (the head aside)."""
    from kiln.options import BACKBONE_LR_SCALE

    scaled = opts.backbone_lr_scale != BACKBONE_LR_SCALE
    if opts.init is None:
        for given, flag in ((opts.freeze_backbone, "--freeze-backbone"),
                            (scaled, "--backbone-lr-scale")):
            if given:
                raise ValueError(f"{flag} needs --init: a backbone to start from")
        return
    if not 0 < opts.backbone_lr_scale <= 1:
        raise ValueError(f"--backbone-lr-scale must be in (0, 1], got {opts.backbone_lr_scale}")
    if scaled and opts.freeze_backbone:
        raise ValueError("--backbone-lr-scale does not apply with --freeze-backbone (the "
                         "backbone does not train): give one of them")
    from kiln.models import build_model
    from kiln.models.init import fit_init

    source = read_init(opts.init)
    spec = placeholder_spec(opts, source)
    fit_init(source, build_model(opts.kind, spec), opts.kind, spec)


def fit_for_run(opts, spec, source=None):
    """(the run's spec, InitFit, InitSource) once the data has made the spec. A CNN from a
    kiln model of the same channels keeps that model's input normalization: its layers were
    trained on it.
    `source`: the InitSource where the caller read it already (a search's trial actors may
    run on nodes that cannot see the driver's files)."""
    import torch

    from kiln.models import build_model
    from kiln.models.init import fit_init

    source = source or read_init(opts.init)
    if opts.kind == "cnn" and source.kind == "cnn" and source.spec and \
            source.spec.get("channels") == spec.channels:
        spec = replace(spec, mean=list(source.spec["mean"]), std=list(source.spec["std"]))
    with torch.random.fork_rng():  # a carried head's new rows: the same for the same --seed
        torch.manual_seed(opts.seed)
        model = build_model(opts.kind, spec)
    return spec, fit_init(source, model, opts.kind, spec), source


def resumed_init(opts) -> dict | None:
    """Where a run that --resume continues started: its model card's record, and (a CNN) the
    normalization it trains with. Its checkpoint holds the weights, so the source is not read
    again; --init added to a run that started from random weights is refused."""
    try:
        config = storage.read_model_config(opts.out)
    except (storage.StorageError, ValueError):
        return None  # no model card yet: nothing to keep
    saved = (config.get("train") or {}).get("init")
    if opts.init and not saved:
        raise ValueError(f"{opts.out} started from random weights; --init applies to a new "
                         "run: drop it to resume, or choose another --out")
    if not saved:
        return None
    return {"card": saved, "mean": config["spec"].get("mean"),
            "std": config["spec"].get("std")}


def resumed_layout(spec, prior: dict) -> tuple:
    """(spec, head, freeze, scale) of a resumed run, as its start chose them."""
    card = prior["card"]
    if prior.get("mean") is not None and hasattr(spec, "mean"):
        spec = replace(spec, mean=list(prior["mean"]), std=list(prior["std"]))
    return spec, card["head"], card["freeze_backbone"], card["backbone_lr_scale"] or 1.0


def card(opts, fit, source) -> dict:
    """The model card's record of where the weights started."""
    from kiln.redact import redact

    return {"from": redact(opts.init), "model": source.model_id, "loaded": fit.describe(),
            "head": fit.head, "fresh": fit.fresh, "freeze_backbone": opts.freeze_backbone,
            "backbone_lr_scale": None if opts.freeze_backbone else opts.backbone_lr_scale}
