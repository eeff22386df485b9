"""`kiln train --init URI`: where the starting weights come from (a kiln run or model folder,
a .safetensors file, a .pt/.pth state dict; local or s3://), checked against the run's
architecture before Ray starts and fitted to its classes or vocabulary once the data is known
(models/init.py)."""

from __future__ import annotations

import functools

from kiln.pipelines import storage
from kiln.train.families import family

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


def fitted(source, model, spec):
    """fit_init, its error saying which options would fit where the source is a kiln model."""
    from kiln.models.checkpoint import ModelFolderError
    from kiln.models.init import InitMismatch, fit_init

    try:
        return fit_init(source, model, spec)
    except InitMismatch as e:
        if e.source_spec is None:
            raise
        raise ModelFolderError(f"{e}; {family(spec.kind).init_hint(e.source_spec)}") from None


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

    source = read_init(opts.init)
    # The run's spec before its data is read: only the head depends on the data.
    spec = family(opts.kind).placeholder_spec(
        opts, source.spec if source.kind == opts.kind else None)
    fitted(source, build_model(opts.kind, spec), spec)


def fit_for_run(opts, spec, source=None):
    """(the run's spec, InitFit, InitSource) once the data has made the spec, which the
    family may start from the source's (a CNN keeps its input normalization).
    `source`: the InitSource where the caller read it already (a search's trial actors may
    run on nodes that cannot see the driver's files)."""
    import torch

    from kiln.models import build_model

    source = source or read_init(opts.init)
    if source.kind == opts.kind:
        spec = family(opts.kind).start_from(spec, source.spec)
    with torch.random.fork_rng():  # a carried head's new rows: the same for the same --seed
        torch.manual_seed(opts.seed)
        model = build_model(opts.kind, spec)
    return spec, fitted(source, model, spec), source


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
    return {"card": saved, "spec": config["spec"]}


def resumed_layout(spec, prior: dict) -> tuple:
    """(spec, head, freeze, scale) of a resumed run, as its start chose them."""
    card = prior["card"]
    spec = family(spec.kind).start_from(spec, prior["spec"])
    return spec, card["head"], card["freeze_backbone"], card["backbone_lr_scale"] or 1.0


def card(opts, fit, source) -> dict:
    """The model card's record of where the weights started."""
    from kiln.redact import redact

    return {"from": redact(opts.init), "model": source.model_id, "loaded": fit.describe(),
            "head": fit.head, "fresh": fit.fresh, "freeze_backbone": opts.freeze_backbone,
            "backbone_lr_scale": None if opts.freeze_backbone else opts.backbone_lr_scale}
