"""kiln.api: the commands as functions, on a Ray the caller started; examples/notebook.py runs
through it."""

from __future__ import annotations

import inspect
import json
import runpy
import sys

import pytest

from kiln import api
from kiln.options import LabelOptions
from tests.conftest import ROOT


def test_each_function_takes_its_commands_options_and_checks_them_first(tmp_path):
    sig = inspect.signature(api.label)
    options = {f for f in LabelOptions.__dataclass_fields__ if f != "debug"}
    assert set(sig.parameters) == options
    assert sig.parameters["top_k"].default == 5
    assert sig.parameters["top_k"].kind is inspect.Parameter.KEYWORD_ONLY
    assert {"epochs", "lr", "arch", "hidden"} <= set(inspect.signature(api.train).parameters)
    with pytest.raises(TypeError, match="unknown option.*topk"):
        api.label(model="m", inputs=["x.tar"], output=str(tmp_path / "o"), topk=3)
    # The command's own checks, before anything starts: the same one-line errors.
    with pytest.raises(ValueError, match="--epochs must be at least 1"):
        api.train("cnn", data=str(tmp_path / "data"), out=str(tmp_path / "run"), epochs=0)
    with pytest.raises(ValueError, match="cannot be searched"):
        api.tune("cnn", data=str(tmp_path / "data"), out=str(tmp_path / "s"),
                 space={"workers": "1,2"})


def test_the_notebook_example_trains_labels_evaluates_and_generates(ray_local, tmp_path,
                                                                    capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["notebook.py", str(tmp_path)])
    runpy.run_path(str(ROOT / "examples" / "notebook.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "labeled: 600 rows" in out and "generated: 4 samples" in out
    summary = json.loads((tmp_path / "labels" / "summary.json").read_text())
    assert summary["rows_written"] == 600
    card = api.info(str(tmp_path / "digits-run"))
    assert card["kind"] == "cnn" and card["metrics"]["val_accuracy"] > 0.3
    assert (tmp_path / "samples" / "summary.json").exists()
    assert (tmp_path / "chars-run" / "model" / "weights.safetensors").exists()
