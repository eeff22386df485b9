"""The kiln command line, run as a user runs it."""

import subprocess
import sys

from models import CNNSpec, build_model, save_folder


def kiln(*args, **kw):
    return subprocess.run([sys.executable, "-m", "jobs", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def test_help_lists_every_command():
    out = kiln("--help").stdout
    for cmd in ("train", "label", "generate", "info", "submit", "status", "logs", "stop", "list",
                "demo"):
        assert cmd in out
    assert "--data" in kiln("train", "cnn", "--help").stdout


def test_info_prints_the_model_card(tmp_path):
    spec = CNNSpec("resnet8", ["cat", "dog", "eel"], 3, 32)
    save_folder(tmp_path / "run" / "model", build_model("cnn", spec), "cnn", spec,
                {"metrics": {"val_accuracy": 0.9312}})
    res = kiln("info", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr
    assert "resnet8" in res.stdout and "cat, dog, eel" in res.stdout and "0.9312" in res.stdout


def test_info_on_a_bad_folder_is_one_clear_line(tmp_path):
    res = kiln("info", str(tmp_path))
    assert res.returncode == 2
    assert "config.json is missing" in res.stderr and "Traceback" not in res.stderr
