"""Human-readable views of results: the model card."""

from __future__ import annotations

from rich.table import Table

from kiln.models import LoadedModel
from kiln.train.families import family


def model_card(loaded: LoadedModel) -> Table:
    cfg, spec = loaded.config, loaded.spec
    n_params = sum(p.numel() for p in loaded.model.parameters())
    table = Table(title=f"kiln model {loaded.id}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("kind", loaded.kind)
    for name, value in family(loaded.kind).card_rows(spec):
        table.add_row(name, value)
    table.add_row("parameters", f"{n_params:,}")
    for key, value in (cfg.get("metrics") or {}).items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    tuned = cfg.get("tune")
    if tuned:
        spaces = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in tuned["spaces"].items())
        table.add_row("tuned", f"trial {tuned['trial']}, the best of {tuned['trials']} "
                      f"(kiln tune {spaces})")
    init = (cfg.get("train") or {}).get("init")
    if init:
        how = ("the head alone trained" if init["freeze_backbone"] else
               f"loaded layers at {init['backbone_lr_scale']:g}x the learning rate")
        named = f" ({init['model']})" if init.get("model") else ""
        table.add_row("started from", f"{init['from']}{named}: {init['loaded']}; {how}")
    else:
        table.add_row("started from", "random weights")
    for key in ("trained_on", "created", "kiln_version"):
        if key in cfg:
            table.add_row(key.replace("_", " "), str(cfg[key]))
    return table
