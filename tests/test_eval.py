"""`kiln eval`: its figures against scikit-learn's on a small labeled set, bad images as error
rows, classes the model never saw, the Ray path giving the same figures as the in-process one,
and a char-RNN's nats per character against a plain pass over the text."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from kiln import embedded
from kiln.bulk.eval import EvalOptions, run_eval, text_loss
from kiln.models import CharVocab, CNNSpec, RNNSpec, build_model, model_to_bytes
from kiln.pipelines import storage
from kiln.pipelines.sink import OutputDir, OutputError
from kiln.reports.eval import ECE_BINS
from tests.image_cases import BAD_TAR_KINDS, bad_tar
from tests.plain_fit import fit

CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An MnistNet trained for one pass in plain PyTorch on part of the digits: right often,
    wrong often enough for every figure to mean something."""
    from kiln.pipelines.transforms import ImagePreset, decode

    torch.manual_seed(0)
    pngs, labels = embedded.digits(28)
    spec = CNNSpec("mnist_cnn", CLASSES)
    preset = ImagePreset.from_spec(spec)
    x = torch.from_numpy(np.stack([decode(b, preset) for b in pngs[:300]]))
    y = torch.tensor([int(c) for c in labels[:300]])
    net = build_model("cnn", spec)
    fit(net, x, y, passes=1, lr=1e-3, batch=32, max_batches=5)
    folder = tmp_path_factory.mktemp("evalmodel") / "model"
    storage.save_model(str(folder), model_to_bytes(net, "cnn", spec))
    return str(folder)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """A class-per-folder tar of 400 held-out digits, every bad member kind of image_cases,
    and 7 images of a class the model never saw ("x")."""
    pngs, labels = embedded.digits(28)
    pairs = zip(pngs[1000:1400], labels[1000:1400], strict=True)
    goods = {f"{c}/{i:04d}.png": b for i, (b, c) in enumerate(pairs)}
    goods.update({f"x/{i}.png": pngs[i] for i in range(7)})
    return bad_tar(tmp_path_factory.mktemp("evaldata") / "labeled.tar", goods)


def rows(output) -> list[dict]:
    return OutputDir(output, {}).read_table().to_pylist()


def test_eval_figures_equal_sklearn_and_bad_images_are_error_rows(model, labeled, tmp_path):
    out = str(tmp_path / "eval")
    summary = run_eval(EvalOptions(model, str(labeled), out))
    got = json.loads(storage.read_bytes(storage.join(out, "eval.json")))
    table = rows(out)
    errors = {r["path"]: r["error"].split(":")[0] for r in table if r["error"]}
    assert errors == BAD_TAR_KINDS
    assert summary["error_rows"] == len(BAD_TAR_KINDS)
    good = [r for r in table if not r["error"]]
    assert len(good) == got["images"] == 407
    y, p = [r["path"].split("/")[0] for r in good], [r["label"] for r in good]
    assert [r["truth"] for r in good] == y
    assert 0.3 < got["accuracy"] < 0.99  # the figures below are not all trivially 0 or 1
    assert got["accuracy"] == pytest.approx(np.mean(np.array(y) == np.array(p)))
    assert got["top5_accuracy"] == pytest.approx(
        np.mean([t in r["top_labels"] for t, r in zip(y, good, strict=True)]))
    labels = CLASSES + ["x"]
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
    by = {r["class"]: r for r in got["per_class"]}
    assert list(by) == labels
    for i, c in enumerate(labels):
        assert by[c]["precision"] == pytest.approx(prec[i])
        assert by[c]["recall"] == pytest.approx(rec[i])
        assert by[c]["f1"] == pytest.approx(f1[i])
        assert by[c]["support"] == sup[i]
    assert got["macro"]["f1"] == pytest.approx(f1_score(y, p, labels=labels, average="macro",
                                                        zero_division=0))
    assert got["confusion"]["labels"] == labels
    assert got["confusion"]["matrix"] == confusion_matrix(y, p, labels=labels).tolist()
    # Expected calibration error by hand: equal-width bins of the top-1 probability.
    conf = np.array([r["confidence"] for r in good], np.float64)
    hit = np.array(y) == np.array(p)
    ece = 0.0
    for b in range(ECE_BINS):
        m = (conf >= b / ECE_BINS) & ((conf < (b + 1) / ECE_BINS) if b < ECE_BINS - 1 else True)
        if m.any():
            ece += m.sum() / len(conf) * abs(hit[m].mean() - conf[m].mean())
    assert got["ece"] == pytest.approx(ece, abs=1e-6)
    # The class the model never saw is reported, never right, and named on the page.
    assert got["unseen_classes"] == {"x": 7}
    assert by["x"]["recall"] == 0 and not by["x"]["seen_in_training"]
    page = storage.read_bytes(storage.join(out, "eval.html")).decode()
    assert "not a class of the model" in page and "Confusion matrix" in page
    assert page.count("data:image/png") == min(32, int((~hit).sum()))  # the mistakes' sheet


def test_eval_on_ray_gives_the_in_process_figures(ray_local, model, labeled, tmp_path):
    """The same counts, classes and matrix; the same scores but for the last bits of a
    probability, which follow the torch threads an actor gets (1 or 2 here, as the CPUs
    an earlier actor held are free or not yet)."""
    here, there = str(tmp_path / "here"), str(tmp_path / "ray")
    run_eval(EvalOptions(model, str(labeled), here))
    run_eval(EvalOptions(model, str(labeled), there, actors=1))  # --actors: on Ray Data
    a, b = (json.loads(storage.read_bytes(storage.join(o, "eval.json"))) for o in (here, there))
    assert same_figures({k: v for k, v in a.items() if k != "data"},
                        {k: v for k, v in b.items() if k != "data"})


def same_figures(a, b) -> bool:
    """Equal, floats to 1e-6 of each other (float32 scores summed in another order)."""
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-6, abs=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_figures(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_figures(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_eval_resumes_and_refuses_another_job(model, labeled, tmp_path):
    out = str(tmp_path / "eval")
    first = run_eval(EvalOptions(model, str(labeled), out))
    again = run_eval(EvalOptions(model, str(labeled), out))  # finished: nothing to redo
    assert again["rows_resumed"] == first["rows_in"] and again["rows_written"] == 0
    assert again["eval"] == first["eval"]
    other = embedded.write_class_tar(tmp_path / "other.tar", *embedded.digits(28))
    with pytest.raises(OutputError, match="different job"):
        run_eval(EvalOptions(model, str(other), out))


def test_eval_takes_parquet_labels_of_any_type_one_class_and_refuses_nothing_to_score(
        model, tmp_path):
    pngs, labels = embedded.digits(28)
    pq_path = tmp_path / "ints.parquet"
    pa_table = pa.table({"image": pngs[:60], "label": [int(c) for c in labels[:60]]})
    pq.write_table(pa_table.append_column("path", pa.array([f"r{i}" for i in range(60)])),
                   pq_path)
    got = run_eval(EvalOptions(model, str(pq_path), str(tmp_path / "ints")))["eval"]
    truth = [r["truth"] for r in rows(str(tmp_path / "ints"))]
    assert got["images"] == 60 and sorted(set(truth)) == sorted(set(labels[:60]))
    threes = [b for b, c in zip(pngs, labels, strict=True) if c == "3"][:20]
    one = embedded.write_class_tar(tmp_path / "threes.tar", threes, ["3"] * len(threes))
    got = run_eval(EvalOptions(model, str(one), str(tmp_path / "threes")))["eval"]
    assert got["images"] == 20  # one class is a set to measure, not a mistake
    bad = embedded.write_class_tar(tmp_path / "bad.tar", [b"not a png"] * 3, ["3"] * 3)
    with pytest.raises(ValueError, match="nothing to score: every row .* is an error row"):
        run_eval(EvalOptions(model, str(bad), str(tmp_path / "bad")))


def char_model(tmp_path, text: str) -> tuple[str, object]:
    torch.manual_seed(0)
    spec = RNNSpec(CharVocab.build(text).chars, "lstm", 16, 32, 2)
    net = build_model("rnn", spec).eval()
    folder = tmp_path / "chars"
    storage.save_model(str(folder), model_to_bytes(net, "rnn", spec))
    return str(folder), net


def test_rnn_eval_is_the_plain_pass_over_the_text(tmp_path):
    text = embedded.stdlib_corpus(30_000)
    folder, net = char_model(tmp_path, text[:20_000])
    ids = torch.tensor(CharVocab.build(text[:20_000]).encode(text))
    with torch.no_grad():  # char-rnn's way: one stream, the state carried throughout
        logits, _ = net(ids[None, :-1])
        plain = F.cross_entropy(logits[0], ids[1:]).item()
    # Short texts are read as one stream: exactly the plain pass.
    nats, chars, streams = text_loss(net, ids[:15_000].tolist())
    with torch.no_grad():
        lg, _ = net(ids[None, :14_999])
    assert streams == 1 and chars == 14_999
    assert nats == pytest.approx(F.cross_entropy(lg[0], ids[1:15_000]).item(), rel=1e-5)
    # Through the command: two streams and the leftover tail, every character counted.
    corpus = tmp_path / "text.txt"
    corpus.write_text(text, encoding="utf-8")
    summary = run_eval(EvalOptions(folder, str(corpus), str(tmp_path / "out")))
    got = summary["eval"]
    assert got["characters"] == len(ids) - 1 and got["streams"] == 2
    assert got["nats_per_char"] == pytest.approx(plain, rel=0.01)
    assert got["bits_per_char"] == pytest.approx(got["nats_per_char"] / math.log(2))
    assert got["unknown_chars"] == CharVocab.build(text[:20_000]).count_unknown(text)


def test_rnn_eval_refuses_non_utf8_text(tmp_path):
    folder, _ = char_model(tmp_path, "hello world, hello kiln")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text"):
        run_eval(EvalOptions(folder, str(bad), str(tmp_path / "out")))


def test_rnn_eval_runs_here_and_says_so(tmp_path):
    """A char-RNN's evaluation runs in the command's own process: --actors is refused before
    anything is written; a cluster address (RAY_ADDRESS, as Ray Jobs sets it for a job's
    driver) is not an error, and the command says it does not use the cluster."""
    spec = RNNSpec(list("ab"), "lstm", 4, 8, 1)
    storage.save_model(str(tmp_path / "lm"), model_to_bytes(build_model("rnn", spec), "rnn", spec))
    (tmp_path / "t.txt").write_text("abba" * 50)
    with pytest.raises(ValueError, match="--actors does not apply"):
        run_eval(EvalOptions(str(tmp_path / "lm"), str(tmp_path / "t.txt"),
                             str(tmp_path / "out"), actors=2))
    assert not (tmp_path / "out").exists()
    res = subprocess.run([sys.executable, "-m", "kiln", "eval", "--model", str(tmp_path / "lm"),
                          "--data", str(tmp_path / "t.txt"), "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})  # nothing there
    assert res.returncode == 0, res.stderr
    assert "does not use the Ray cluster" in res.stdout + res.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["eval"]["characters"] == 199
