"""The kiln command line, run as a user runs it."""

import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kiln.cli import app
from kiln.models import CNNSpec, build_model
from kiln.models.checkpoint import model_to_bytes
from kiln.pipelines import storage

COMMANDS = {"train", "tune", "label", "generate", "eval", "info", "submit", "status", "logs",
            "stop", "list", "demo", "review"}
GROUPS = ("train", "tune")  # each has cnn and rnn


def kiln(*args, **kw):
    return subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def listed_commands(help_text: str) -> list[str]:
    """The first word of each row of the help's "Commands" box (rows that continue a wrapped
    description start with spaces)."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("╭─ Commands"))
    names = []
    for line in lines[start + 1:]:
        if line.startswith("╰"):
            return names
        row = line.strip("│")
        if row[1:2].strip():  # "│ name  description │"; a continuation is "│     more │"
            names.append(row.split()[0])
    raise AssertionError("the Commands box is not closed")


def test_help_lists_every_command():
    res = kiln("--help")
    assert res.returncode == 0, res.stderr
    top = listed_commands(res.stdout)
    assert sorted(top) == sorted(COMMANDS)  # each once, none missing, none extra
    runner = CliRunner()
    for group in GROUPS:
        sub = runner.invoke(app, [group, "--help"], prog_name="kiln")
        assert sub.exit_code == 0, sub.output
        assert sorted(listed_commands(sub.output)) == ["cnn", "rnn"]
    for cmd in [[c] for c in sorted(COMMANDS - set(GROUPS))] + [
            [g, k] for g in GROUPS for k in ("cnn", "rnn")]:
        res = runner.invoke(app, [*cmd, "--help"], prog_name="kiln")
        assert res.exit_code == 0, (cmd, res.output)
        usage = next(line.strip() for line in res.output.splitlines() if "Usage:" in line)
        assert usage.startswith(f"Usage: kiln {' '.join(cmd)} "), (cmd, usage)
        if cmd == ["train", "cnn"]:
            assert "--data" in res.output


def test_info_prints_the_model_card(tmp_path):
    spec = CNNSpec("resnet8", ["cat", "dog", "eel"], 3, 32)
    storage.save_model(str(tmp_path / "run" / "model"),
                       model_to_bytes(build_model("cnn", spec), "cnn", spec,
                                      {"metrics": {"val_accuracy": 0.9312}}))
    res = kiln("info", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr
    assert "resnet8" in res.stdout and "cat, dog, eel" in res.stdout and "0.9312" in res.stdout


def test_info_on_a_bad_folder_is_one_clear_line(tmp_path):
    res = kiln("info", str(tmp_path))
    assert res.returncode == 2
    assert "config.json is missing" in res.stderr and "Traceback" not in res.stderr


def mistake_inputs(tmp_path):
    """Real inputs for the mistakes below: a one-class archive, a text file, a char-RNN and
    a CNN."""
    import io
    import tarfile

    from kiln.models import CNNSpec, RNNSpec

    one_class = tmp_path / "one-class.tar"
    with tarfile.open(one_class, "w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"cats/{i}.png")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"\x89PNG"))
    (tmp_path / "notes.txt").write_text("a few words\n")
    spec = RNNSpec(list("ab \n"), "gru", 4, 8, 1)
    storage.save_model(str(tmp_path / "lm"), model_to_bytes(build_model("rnn", spec), "rnn", spec))
    spec = CNNSpec("mnist_cnn", ["cats", "dogs"])
    storage.save_model(str(tmp_path / "cnn"), model_to_bytes(build_model("cnn", spec), "cnn",
                                                             spec))
    return tmp_path


MISTAKES = {
    "text given to train cnn": (["train", "cnn", "--data", "{t}/notes.txt", "--out", "{t}/run"],
                                "notes.txt: not a directory, an archive or a Parquet file"),
    "an archive of one class": (["train", "cnn", "--data", "{t}/one-class.tar", "--out",
                                 "{t}/run"], "one class folder (cats)"),
    "a torchvision net on tiny images": (["train", "cnn", "--data", "{t}/one-class.tar",
                                          "--out", "{t}/run", "--arch", "resnet18"],
                                         "--arch resnet18 needs --image-size of at least 32"),
    "text shorter than two chunks": (["train", "rnn", "--data", "{t}/notes.txt", "--out",
                                      "{t}/run"], "too short for --seq-len 100"),
    "no characters to generate": (["generate", "--model", "{t}/lm", "--num-samples", "2",
                                   "--output", "{t}/gen", "--max-chars", "0"],
                                  "--max-chars must be from 1 to 100,000"),
    "more characters than a lane holds": (["generate", "--model", "{t}/lm", "--num-samples", "2",
                                           "--output", "{t}/gen", "--max-chars", "1000000000"],
                                          "--max-chars must be from 1 to 100,000"),
    "a top-k past the vocabulary": (["generate", "--model", "{t}/lm", "--num-samples", "2",
                                     "--output", "{t}/gen", "--top-k", "10000000000"],
                                    "is more than the model's 4 characters"),
    "an infinite temperature": (["generate", "--model", "{t}/lm", "--num-samples", "2",
                                 "--output", "{t}/gen", "--temperature", "inf"],
                                "--temperature must be 0 (greedy) or from 1e-06"),
    "a temperature whose inverse overflows": (["generate", "--model", "{t}/lm", "--num-samples",
                                               "2", "--output", "{t}/gen", "--temperature",
                                               "1e-320"], "--temperature must be 0 (greedy)"),
    "a training run in the home folder": (["train", "cnn", "--data", "{t}/one-class.tar",
                                           "--out", "~"], "is the home folder"),
    "a search folder of someone else's files": (["tune", "cnn", "--data", "{t}/one-class.tar",
                                                 "--out", "{t}", "--lr", "1e-3,1e-2"],
                                                "holds the input"),
    "a mistyped option": (["train", "cnn", "--data", "{t}/notes.txt", "--out", "{t}/run",
                           "--lrr", "0.1"], "No such option: --lrr (Possible options: --lr"),
    "an output that is a file": (["generate", "--model", "{t}/lm", "--num-samples", "2",
                                  "--output", "{t}/notes.txt"], "is a file"),
    "a search range the wrong way round": (["tune", "cnn", "--data", "{t}/one-class.tar",
                                            "--out", "{t}/run", "--lr", "1e-2:1e-4:log"],
                                           "--lr: a range's low end must be below its high"),
    "a search with nothing to search": (["tune", "rnn", "--data", "{t}/notes.txt", "--out",
                                         "{t}/run", "--hidden", "64"], "nothing to search"),
    "a trial that could not run": (["tune", "cnn", "--data", "{t}/one-class.tar", "--out",
                                    "{t}/run", "--batch-size", "0,32"],
                                   "(--batch-size 0): --batch-size must be at least 1"),
    "a search on data that cannot train": (["tune", "cnn", "--data", "{t}/one-class.tar",
                                            "--out", "{t}/run", "--lr", "1e-3,1e-2"],
                                           "one class folder (cats)"),
    "an unknown scheduler": (["tune", "cnn", "--data", "{t}/one-class.tar", "--out", "{t}/run",
                              "--lr", "1e-3,1e-2", "--scheduler", "pbt"],
                             "unknown --scheduler 'pbt'; choose one of asha, fifo"),
    "resuming a search never started": (["tune", "cnn", "--data", "{t}/one-class.tar", "--out",
                                         "{t}/run", "--lr", "1e-3,1e-2", "--resume"],
                                        "holds no search to resume"),
    "more trials at once than fit": (["tune", "cnn", "--data", "{t}/one-class.tar", "--out",
                                      "{t}/run", "--lr", "1e-3:1e-2", "--trials", "500",
                                      "--workers", "2", "--concurrent", "500"],
                                     "--concurrent 500 trials of --workers 2 do not fit"),
    "a CNN scored on text": (["eval", "--model", "{t}/cnn", "--data", "{t}/notes.txt",
                              "--output", "{t}/gen"],
                             "notes.txt: not a directory, an archive or a Parquet file"),
    "a char-RNN scored on missing text": (["eval", "--model", "{t}/lm", "--data",
                                           "{t}/missing.txt", "--output", "{t}/gen"],
                                          "missing.txt"),
    "a label smoothing of one": (["train", "cnn", "--data", "{t}/one-class.tar", "--out",
                                  "{t}/run", "--label-smoothing", "1"],
                                 "--label-smoothing must be in [0, 1), got 1.0"),
    "an unknown test-time augmentation": (["label", "--model", "{t}/cnn", "--input",
                                           "{t}/one-class.tar", "--output", "{t}/gen", "--tta",
                                           "sideways"], "unknown --tta 'sideways'"),
    "a text model scored with mirror images": (["eval", "--model", "{t}/lm", "--data",
                                                "{t}/notes.txt", "--output", "{t}/gen",
                                                "--tta", "flip"], "a text model has none"),
    "a Ray Jobs URL where the cluster's own address belongs": (
        ["label", "--model", "{t}/cnn", "--input", "{t}/one-class.tar", "--output", "{t}/gen",
         "--address", "http://127.0.0.1:8265"], "is a Ray Jobs URL, which kiln submit takes"),
    "a range on a choice": (["tune", "rnn", "--data", "{t}/notes.txt", "--out", "{t}/run",
                             "--cell", "lstm:gru"], "--cell takes a value or a list"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_mistake_is_one_clear_line_before_ray_starts(tmp_path, mistake):
    args, expected = MISTAKES[mistake]
    t = mistake_inputs(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = kiln(*[a.format(t=t) for a in args], env=env)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (t / "run").exists() and not (t / "gen").exists()  # nothing was started


def test_gpu_without_one_is_one_clear_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    t = mistake_inputs(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = kiln("generate", "--model", str(t / "lm"), "--num-samples", "2", "--output",
               str(t / "gen"), "--gpu", env=env)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "--gpu was given but this machine has no CUDA GPU" in res.stderr


def test_installed_kiln_leaves_a_users_own_models_and_jobs_packages_theirs(tmp_path):
    """`pip install .` adds one import name, kiln: from a folder that holds the user's own
    models/ and jobs/ packages (common in ML projects), `python -m kiln` and the kiln command
    run kiln's code, and `import models` is still the user's."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wheels, target, project = tmp_path / "wheels", tmp_path / "site", tmp_path / "project"
    source = tmp_path / "source"  # a copy: building in place would leave build/ in the checkout
    source.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(root, part), source / part)
    for part in ("jobs", "models", "pipelines"):
        shutil.copytree(os.path.join(root, part), source / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
                    str(wheels), str(source)], check=True, timeout=600)
    (wheel,) = wheels.glob("kiln-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith("-info")
                  and p.name != "bin") == ["kiln"]
    for own in ("models", "jobs"):
        (project / own).mkdir(parents=True)
        (project / own / "__init__.py").write_text(f"WHOSE = 'the user’s {own}'\n")
    spec = CNNSpec("mnist_cnn", ["a", "b"], 1, 28)
    storage.save_model(str(project / "model"), model_to_bytes(build_model("cnn", spec), "cnn",
                                                               spec))
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of this checkout's editable kiln
    for cmd in ([sys.executable, "-m", "kiln", "info", "model"], [target / "bin" / "kiln",
                                                                   "info", "model"]):
        res = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        assert "mnist_cnn" in res.stdout
    probe = ("import kiln, kiln.models, models, jobs; "
             "print(kiln.models.__file__); print(models.WHOSE, '/', jobs.WHOSE)")
    res = subprocess.run([sys.executable, "-c", probe], cwd=project, env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    kiln_models, whose = res.stdout.splitlines()
    assert kiln_models.startswith(str(target / "kiln" / "models"))
    assert whose == "the user’s models / the user’s jobs"
    # The package's files that are not Python (kiln review's page, a logging config) came too.
    probe = ("from importlib import resources; "
             "print(resources.files('kiln.review').joinpath('page.html').is_file(), "
             "resources.files('kiln.cluster').joinpath('ray_data_logging.yaml').is_file())")
    res = subprocess.run([sys.executable, "-c", probe], cwd=project, env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    assert res.stdout.split() == ["True", "True"]
