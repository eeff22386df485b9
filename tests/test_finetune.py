"""`kiln train --init`: a model of digits 0-4 fine-tuned onto 0-9 beats the same budget from
scratch, --freeze-backbone trains the head alone, torchvision's own state dicts load by name,
a char-RNN's rows follow its characters, and pickled code or a mismatched model is refused
before Ray starts."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from kiln import embedded
from kiln.models import CharVocab, CNNSpec, ModelFolderError, RNNSpec, build_model, model_to_bytes
from kiln.models.init import InitSource, fit_init
from kiln.options import TrainOptions
from kiln.pipelines import storage
from kiln.train.init import fit_for_run, read_init
from kiln.train.job import resolve, run_train, validate
from tests.plain_fit import fit


def kiln(*args):
    env = {**os.environ, "COLUMNS": "300"}  # the card's rows unwrapped
    return subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.fixture(scope="module")
def digit_tars(tmp_path_factory):
    pngs, labels = embedded.digits(28)
    return {"all": embedded.write_class_tar(tmp_path_factory.mktemp("ft") / "all.tar", pngs,
                                            labels)}


def five_digit_model(folder) -> str:
    """An MnistNet trained on digits 0-4 alone (two passes of plain PyTorch, through the
    decode that training uses), saved as a kiln run folder with its data's statistics."""
    from kiln.pipelines.transforms import ImagePreset, decode_uint8

    torch.manual_seed(0)
    pngs, labels = embedded.digits(28)
    keep = [i for i, c in enumerate(labels) if int(c) < 5]
    preset = ImagePreset(28, 1)
    x = torch.from_numpy(np.stack([decode_uint8(pngs[i], preset) for i in keep])).float()
    mean, std = float(x.mean() / 255), float(x.std() / 255)
    y = torch.tensor([int(labels[i]) for i in keep])
    spec = CNNSpec("mnist_cnn", ["0", "1", "2", "3", "4"], 1, 28, [mean], [std])
    net = build_model("cnn", spec)
    xs = (x / 255 - mean) / std
    fit(net, xs, y)
    with torch.no_grad():
        assert (net(xs).argmax(1) == y).float().mean() > 0.9  # it knows its five digits
    storage.save_model(str(folder / "model"), model_to_bytes(net, "cnn", spec))
    return str(folder)


def initial_accuracy(opts: TrainOptions) -> float:
    """Accuracy on every digit of the model a run starts from, before its first step."""
    from kiln.pipelines.transforms import ImagePreset, decode

    pngs, labels = embedded.digits(28)
    spec = CNNSpec("mnist_cnn", [str(i) for i in range(10)])
    spec, fit, _ = fit_for_run(opts, spec)  # the source's normalization, the carried head
    model = build_model("cnn", spec)
    model.load_state_dict(fit.state, strict=False)
    x = torch.from_numpy(np.stack([decode(b, ImagePreset.from_spec(spec)) for b in pngs]))
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    return (pred == torch.tensor([int(c) for c in labels])).float().mean().item()


def metrics(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def best(run: str) -> dict:
    return storage.read_model_config(run)["metrics"]


@pytest.mark.slow
def test_fine_tuning_from_five_digits_beats_scratch_and_freezing_keeps_the_backbone(
        ray_local, digit_tars, tmp_path):
    low = five_digit_model(tmp_path / "low")
    # Before any step: the carried head already knows digits 0-4 (chance is a tenth).
    start = initial_accuracy(TrainOptions("cnn", str(digit_tars["all"]), "-", init=low))
    assert start > 0.4, f"the grown model starts at {start}"
    budget = dict(max_steps=8, batch_size=64, workers=1, val_fraction=0.25)
    tuned, scratch, frozen = (str(tmp_path / n) for n in ("tuned", "scratch", "frozen"))
    run_train(TrainOptions("cnn", str(digit_tars["all"]), tuned, init=low, **budget))
    run_train(TrainOptions("cnn", str(digit_tars["all"]), scratch, **budget))
    run_train(TrainOptions("cnn", str(digit_tars["all"]), frozen, init=low,
                           freeze_backbone=True, **budget))
    a, b, f = (best(r)["val_accuracy"] for r in (tuned, scratch, frozen))
    assert a > 0.5, f"fine-tuned: {a} after 8 steps (chance is 0.1)"
    assert a > b, f"fine-tuned {a} vs scratch {b}"
    assert f > 0.3, f"frozen: {f} after 8 steps"
    # The card says where the weights started; the new head has ten classes.
    tuned_cfg = storage.read_model_config(tuned)
    init = tuned_cfg["train"]["init"]
    assert init["from"] == low and init["fresh"] == ["fc2.weight", "fc2.bias"]
    assert "rows of 5 of 10 classes" in init["loaded"]
    assert init["model"] == storage.read_model_config(low)["id"]
    assert len(tuned_cfg["spec"]["classes"]) == 10
    # kept: the source's input normalization, which its layers were trained on
    assert tuned_cfg["spec"]["mean"] == storage.read_model_config(low)["spec"]["mean"]
    card = kiln("info", tuned)
    assert card.returncode == 0 and "started from" in card.stdout and low in card.stdout
    assert "random weights" in kiln("info", scratch).stdout
    # Frozen: every backbone tensor is the source's, bit for bit; the head moved.
    src = storage.load_model(low).model.state_dict()
    got = storage.load_model(frozen).model.state_dict()
    for k in ("conv1.weight", "conv2.bias", "fc1.weight"):
        assert torch.equal(src[k], got[k]), k
    assert got["fc2.weight"].shape == (10, 128)
    fine = storage.load_model(tuned).model.state_dict()
    assert not torch.equal(src["conv1.weight"], fine["conv1.weight"])  # fine-tuned: it moved
    # --resume continues from the run's checkpoint in the layout it started with, without
    # --init: the backbone stays frozen, the card still says where it started.
    run_train(TrainOptions("cnn", str(digit_tars["all"]), frozen, resume=True,
                           **{**budget, "max_steps": 12}))
    again = storage.load_model(frozen).model.state_dict()
    assert torch.equal(src["conv1.weight"], again["conv1.weight"])
    assert [m["step"] for m in metrics(frozen)] == [8, 12]
    assert storage.read_model_config(frozen)["train"]["init"]["freeze_backbone"] is True
    with pytest.raises(ValueError, match="started from random weights"):
        run_train(TrainOptions("cnn", str(digit_tars["all"]), scratch, resume=True, init=low,
                               **budget))


def test_torchvision_state_dicts_load_by_name(digit_tars, tmp_path):
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18().state_dict()
    pt, st = tmp_path / "resnet18.pth", tmp_path / "resnet18.safetensors"
    torch.save(theirs, pt)
    save_file({k: v.contiguous() for k, v in theirs.items()}, str(st))
    ddp = tmp_path / "ddp.pt"  # a checkpoint as a training script saves it, DDP-wrapped
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in theirs.items()}}, ddp)
    for source, channels in ((pt, 3), (st, 1), (ddp, 3)):
        opts = resolve(TrainOptions("cnn", str(digit_tars["all"]), str(tmp_path / "r"),
                                    arch="resnet18", image_size=32, channels=channels,
                                    init=str(source), workers=1))
        validate(opts)  # checks the source against the architecture
        spec = CNNSpec("resnet18", [str(i) for i in range(10)], channels, 32)
        _, fit, _ = fit_for_run(opts, spec)
        prefix = "net." if channels == 1 else ""
        assert sorted(fit.fresh) == [f"{prefix}fc.bias", f"{prefix}fc.weight"]
        model = build_model("cnn", spec)
        model.load_state_dict(fit.state, strict=False)
        mine = model.state_dict()
        for k, v in theirs.items():
            if not k.startswith("fc."):
                assert torch.equal(mine[prefix + k], v), (source, k)
    # Another architecture: one error naming the keys that differ.
    opts = resolve(TrainOptions("cnn", str(digit_tars["all"]), str(tmp_path / "r"),
                                arch="resnet34", image_size=32, channels=3, init=str(pt),
                                workers=1))
    with pytest.raises(ModelFolderError, match="missing from the source: layer1.2"):
        validate(opts)


class Payload:
    def __reduce__(self):
        return (open, ("PWNED_MARKER", "w"))


def test_pickled_code_and_mismatched_models_are_refused_before_ray(digit_tars, tmp_path):
    evil = tmp_path / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload()}, evil)
    r = subprocess.run([sys.executable, "-m", "kiln", "train", "cnn", "--data",
                        str(digit_tars["all"]), "--out", str(tmp_path / "run"), "--init",
                        str(evil)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "refused" in r.stderr and "weights_only" in r.stderr
    assert not (tmp_path / "PWNED_MARKER").exists()  # the payload never ran
    assert "Ray" not in r.stderr
    # A kiln model of another architecture: the keys that differ, and what to pass.
    spec = CNNSpec("resnet8", ["a", "b"], 3, 32)
    folder = tmp_path / "resnet8"
    storage.save_model(str(folder / "model"), model_to_bytes(build_model("cnn", spec), "cnn",
                                                             spec))
    r = kiln("train", "cnn", "--data", str(digit_tars["all"]), "--out", str(tmp_path / "r2"),
             "--init", str(folder))
    assert r.returncode == 2
    assert "does not fit this model" in r.stderr and "--arch resnet8" in r.stderr
    r = kiln("train", "cnn", "--data", str(digit_tars["all"]), "--out", str(tmp_path / "r3"),
             "--freeze-backbone")
    assert r.returncode == 2 and "--freeze-backbone needs --init" in r.stderr
    r = kiln("train", "cnn", "--data", str(digit_tars["all"]), "--out", str(tmp_path / "r3"),
             "--init", str(folder), "--arch", "resnet8", "--channels", "3", "--image-size",
             "32", "--freeze-backbone", "--backbone-lr-scale", "0.1")
    assert r.returncode == 2 and "does not apply with --freeze-backbone" in r.stderr
    r = kiln("train", "cnn", "--data", str(digit_tars["all"]), "--out", str(tmp_path / "r4"),
             "--init", str(tmp_path / "nothing.pt"))
    assert r.returncode == 2 and "not found" in r.stderr
    r = kiln("train", "rnn", "--data", str(digit_tars["all"]), "--out", str(tmp_path / "r5"),
             "--init", str(folder))
    assert r.returncode == 2 and "holds a CNN model" in r.stderr


def test_a_char_rnn_carries_its_rows_character_by_character(tmp_path):
    torch.manual_seed(0)
    old = RNNSpec(CharVocab.build("abcdef").chars, "lstm", 8, 16, 2)
    new = RNNSpec(CharVocab.build("cdefgh").chars, "lstm", 8, 16, 2)
    src_model = build_model("rnn", old)
    folder = tmp_path / "chars"
    storage.save_model(str(folder), model_to_bytes(src_model, "rnn", old))
    fit = fit_init(read_init(str(folder)), build_model("rnn", new), new)
    assert fit.carried == list("cdef") and fit.of == 6
    model = build_model("rnn", new)
    model.load_state_dict(fit.state)
    a, b = CharVocab(old.vocab), CharVocab(new.vocab)
    for c in "cdef\ufffd":
        i, j = a.stoi.get(c, 0), b.stoi.get(c, 0)
        assert torch.equal(model.embed.weight[j], src_model.embed.weight[i])
        assert torch.equal(model.head.bias[j], src_model.head.bias[i])
    assert torch.equal(model.rnn.weight_hh_l1, src_model.rnn.weight_hh_l1)
    # A raw state dict of another width: the keys and shapes, and no hint to guess from.
    other = RNNSpec(new.vocab, "lstm", 8, 32, 2)
    with pytest.raises(ModelFolderError, match=r"shapes differ at rnn.weight_ih_l0 \(source "
                       r"\(64, 8\), model \(128, 8\)\)"):
        fit_init(InitSource("raw.pt", dict(src_model.state_dict())), build_model("rnn", other),
                 other)


def test_a_mismatch_raised_in_a_worker_keeps_its_message_and_source():
    """InitMismatch travels pickled from a Ray worker (a kiln tune trial) to the driver."""
    import pickle

    from kiln.models.init import InitMismatch

    back = pickle.loads(pickle.dumps(InitMismatch("does not fit", {"arch": "resnet8"})))
    assert str(back) == "does not fit" and back.source_spec == {"arch": "resnet8"}


def test_backbone_lr_scale_is_checked():
    opts = TrainOptions("cnn", "d", "o", init="x.pt", backbone_lr_scale=0)
    with pytest.raises(ValueError, match="--backbone-lr-scale"):
        validate(resolve(replace(opts, workers=1)))
