"""The registry of model families: a family's object (kiln.train.cnn, kiln.train.rnn, each a
kiln.train.family.Family) owns everything that differs by family above the model folder's
format (whose own registry is kiln.models.checkpoint.SPECS). A third family is its spec class
there, its family object and its workers' task here, and one line below."""

from __future__ import annotations

from kiln.train.cnn import CNNFamily
from kiln.train.rnn import RNNFamily

FAMILIES = {f.kind: f for f in (CNNFamily, RNNFamily)}


def family(kind: str):
    """The family object of a model kind ("cnn", "rnn")."""
    try:
        return FAMILIES[kind]
    except KeyError:
        raise ValueError(f"kind must be one of {', '.join(FAMILIES)}, got {kind!r}") from None
