"""The model folder: round trips locally and through S3, and clear errors for bad folders."""

import json

import pytest
import torch

from kiln.models import CNNSpec, ModelFolderError, RNNSpec, build_model
from kiln.models.checkpoint import model_to_bytes
from kiln.pipelines import storage


def cnn():
    spec = CNNSpec("mnist_cnn", [str(i) for i in range(10)], 1, 28)
    return build_model("cnn", spec), spec


def rnn():
    spec = RNNSpec(list("abc \n"), "gru", 8, 16, 2)
    return build_model("rnn", spec), spec


@pytest.mark.parametrize("make", [cnn, rnn])
def test_local_round_trip(tmp_path, make):
    model, spec = make()
    kind = "cnn" if isinstance(spec, CNNSpec) else "rnn"
    cfg = storage.save_model(str(tmp_path / "m"),
                             model_to_bytes(model, kind, spec, {"metrics": {"val_loss": 1.5}}))
    loaded = storage.load_model(str(tmp_path / "m"))
    assert loaded.spec == spec and loaded.id == cfg["id"]
    assert loaded.config["metrics"] == {"val_loss": 1.5}
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.model.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b)


def test_run_folder_resolves_to_model(tmp_path):
    model, spec = cnn()
    storage.save_model(str(tmp_path / "run" / "model"), model_to_bytes(model, "cnn", spec))
    assert storage.load_model(str(tmp_path / "run")).kind == "cnn"
    assert storage.model_dir(str(tmp_path / "run")) == str(tmp_path / "run" / "model")


def test_s3_round_trip(s3_bucket):
    model, spec = rnn()
    uri = f"{s3_bucket}/runs/r1/model"
    storage.save_model(uri, model_to_bytes(model, "rnn", spec))
    loaded = storage.load_model(f"{s3_bucket}/runs/r1", expect_kind="rnn")
    assert loaded.spec == spec
    x = torch.randint(0, 6, (2, 5))
    torch.testing.assert_close(loaded.model(x)[0], model.eval()(x)[0])


def test_corrupt_weights_give_a_clear_error(tmp_path):
    model, spec = cnn()
    storage.save_model(str(tmp_path), model_to_bytes(model, "cnn", spec))
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelFolderError, match="weights.safetensors is corrupt or truncated"):
        storage.load_model(str(tmp_path))
    weights.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFolderError, match="corrupt or truncated"):
        storage.load_model(str(tmp_path))


def test_wrong_kind_and_mismatched_config(tmp_path):
    model, spec = rnn()
    storage.save_model(str(tmp_path), model_to_bytes(model, "rnn", spec))
    with pytest.raises(ModelFolderError, match="holds a RNN model, but this command needs a CNN"):
        storage.load_model(str(tmp_path), expect_kind="cnn")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["spec"]["hidden"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match="does not match config.json"):
        storage.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        storage.load_model(str(tmp_path))
    cfg["kind"] = "transformer"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match="names kind 'transformer'"):
        storage.load_model(str(tmp_path))


def test_missing_files(tmp_path):
    with pytest.raises(ModelFolderError, match="config.json is missing"):
        storage.load_model(str(tmp_path))
    with pytest.raises(ModelFolderError, match="is missing"):
        storage.load_model(str(tmp_path))


def test_weights_are_never_unpickled(tmp_path):
    """A pickle in place of the weights is refused, not executed."""
    import pathlib
    import pickle

    class Hostile:  # unpickling it creates `marker`
        def __init__(self, marker: pathlib.Path):
            self.marker = marker

        def __reduce__(self):
            return pathlib.Path.touch, (self.marker,)

    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Hostile(probe)))
    assert probe.exists()  # the payload does run wherever it is unpickled

    marker, folder = tmp_path / "unpickled", tmp_path / "model"
    model, spec = cnn()
    storage.save_model(str(folder), model_to_bytes(model, "cnn", spec))
    (folder / "weights.safetensors").write_bytes(pickle.dumps(Hostile(marker)))
    with pytest.raises(ModelFolderError, match="corrupt or truncated"):
        storage.load_model(str(folder))
    assert not marker.exists()


def test_reading_a_model_folder_builds_shapes_only_and_imports_no_compiler(tmp_path):
    """The shapes check before the weights are read runs no initializer: on meta tensors
    torch.nn.init's first call imports torch._dynamo, seconds of every command's start. A
    model another thread builds meanwhile is initialized as ever (torch function modes are
    per thread)."""
    import subprocess
    import sys
    import threading

    from kiln.models import CharVocab, RNNSpec, build_model, model_to_bytes
    from kiln.models.checkpoint import shapes_only
    from kiln.pipelines import storage

    vocab = CharVocab.build("abcdefgh \n")
    spec = RNNSpec(vocab.chars, "lstm", embed=8, hidden=16, layers=2)
    storage.save_model(str(tmp_path / "model"), model_to_bytes(build_model("rnn", spec), "rnn",
                                                               spec))
    code = ("import sys; from kiln.pipelines import storage; "
            f"m = storage.load_model({str(tmp_path)!r}); "
            "assert m.model.embed.weight.abs().sum() > 0; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]

    built: dict = {}
    with shapes_only():
        meta = build_model("rnn", spec)
        thread = threading.Thread(target=lambda: built.update(m=build_model("rnn", spec)))
        thread.start()
        thread.join()
    assert meta.embed.weight.is_meta
    other = built["m"].embed.weight
    assert not other.is_meta and float(other.detach().std()) > 0.5  # N(0, 1), as built outside
