"""Ray Train: a CNN learns real digits from Parquet on S3 through a killed worker, a char-RNN
learns real text on S3, the models label and generate there, a killed run resumes, and colour
photos train under a time limit."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from kiln import embedded
from kiln.options import TrainOptions
from kiln.pipelines import storage
from kiln.pipelines.sink import OutputDir
from kiln.pipelines.train_data import read_text
from kiln.pipelines.transforms import ImagePreset, augment_batch, choose_augment, decode
from kiln.train.job import run_train
from kiln.train.schedule import SGD_WARMUP, Budget, lr_at, warmup_steps

pytestmark = pytest.mark.slow


def held_out_accuracy(run: str, images: list[bytes], labels: list[str]) -> float:
    loaded = storage.load_model(run, expect_kind="cnn")
    preset = ImagePreset.from_spec(loaded.spec)
    x = torch.from_numpy(np.stack([decode(b, preset) for b in images]))
    with torch.no_grad():
        pred = loaded.model(x).argmax(1).tolist()
    return float(np.mean([loaded.spec.classes[p] == y for p, y in zip(pred, labels,
                                                                        strict=True)]))


def metrics(run: str) -> list[dict]:
    text = storage.read_bytes(storage.join(run, "metrics.jsonl")).decode()
    return [json.loads(x) for x in text.splitlines()]


def upload(local, uri: str) -> str:
    storage.write_bytes(uri, Path(local).read_bytes())
    return uri


def train_workers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]


def test_cnn_learns_digits_from_parquet_on_s3_survives_a_killed_worker_and_labels_there(
        ray_local, s3_bucket, digits_files, tmp_path):
    """Every URI is s3://: Parquet data in, checkpoints, the model folder, then a label job
    with that model over an archive on S3 into an output on S3. A training worker is killed
    once an epoch is checkpointed: the run goes on from the checkpoint."""
    b = s3_bucket
    data = upload(digits_files["parquet"], f"{b}/data/digits.parquet")
    run = f"{b}/runs/digits"
    opts = TrainOptions("cnn", data, run, epochs=8, batch_size=64, workers=2)
    box = {}
    t0 = time.monotonic()
    thread = threading.Thread(target=lambda: box.update(out=run_train(opts)))
    thread.start()
    killed = None
    while thread.is_alive() and killed is None:
        time.sleep(0.5)
        if storage.exists(f"{run}/metrics.jsonl") and train_workers():
            killed = train_workers()[-1]
            killed.send_signal(signal.SIGKILL)
    thread.join()
    wall = time.monotonic() - t0
    assert killed is not None, "the run ended before a worker could be killed"
    assert "out" in box, "training did not finish after losing a worker"
    rows = metrics(run)
    assert [m["epoch"] for m in rows] == list(range(1, 9))  # none lost or repeated
    for key in ("train_loss", "val_loss", "val_accuracy", "samples_per_s", "elapsed_s"):
        assert key in rows[-1]
    assert storage.read_bytes(f"{run}/curves.png")[:4] == b"\x89PNG"
    assert storage.exists(f"{run}/checkpoints")
    # elapsed_s is training time so far: it grows by at least each epoch's training time and
    # never passes the run's wall time.
    for a, b_ in zip(rows, rows[1:], strict=False):
        assert b_["elapsed_s"] - a["elapsed_s"] >= 0.9 * b_["train_s"]
    assert rows[-1]["elapsed_s"] < wall
    acc = held_out_accuracy(run, digits_files["test_images"], digits_files["test_labels"])
    assert acc >= 0.95, f"held-out accuracy {acc:.3f}"
    cfg = storage.load_model(run).config
    assert cfg["spec"]["classes"] == [str(i) for i in range(10)]
    assert cfg["train"]["augment"] == "shift"  # no flips for digits
    # model/ holds the final weights where they validate as well as the best within noise,
    # else the best validation's.
    from kiln.train.cnn import CNNFamily
    from kiln.train.loop import within_noise

    best = max(rows, key=CNNFamily.rank)
    final = within_noise(CNNFamily, rows[-1], rows)
    assert cfg["metrics"]["step"] == (rows[-1] if final else best)["step"]

    from kiln.bulk.label import run_label
    from kiln.options import LabelOptions

    pngs = digits_files["test_images"][:50]
    local = embedded.write_flat_archive(tmp_path / "x.zip", pngs,
                                        [f"{i}.png" for i in range(len(pngs))])
    summary = run_label(LabelOptions(run, [upload(local, f"{b}/in/x.zip")], f"{b}/labels",
                                     top_k=2))
    assert summary["rows_written"] == 50
    labeled = OutputDir(f"{b}/labels", {}).read_table().to_pylist()
    assert len(labeled) == 50 and all(r["label"] is not None for r in labeled)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in storage.read_bytes(
        f"{b}/labels/summary.json").decode()


def test_rnn_learns_python_source_on_s3_and_generates_there(ray_local, s3_bucket):
    b = s3_bucket
    corpus = f"{b}/data/corpus.txt"
    storage.write_bytes(corpus, embedded.stdlib_corpus(300_000).encode())
    run = f"{b}/runs/chars"
    run_train(TrainOptions("rnn", corpus, run, max_steps=150, batch_size=64, workers=2,
                           hidden=128, layers=2, seq_len=64, lr=4e-3))
    loaded = storage.load_model(run, expect_kind="rnn")
    uniform = np.log(len(loaded.vocab))
    last = metrics(run)[-1]
    assert last["step"] == 150
    assert last["val_loss"] < 0.6 * uniform, f"{last['val_loss']:.3f} vs uniform {uniform:.3f}"
    assert last["bits_per_char"] == pytest.approx(last["val_loss"] / np.log(2))

    from kiln.bulk.generate import run_generate
    from kiln.options import GenerateOptions

    prompts = f"{b}/data/prompts.txt"
    storage.write_bytes(prompts, b"def \nclass \nimport \n")
    run_generate(GenerateOptions(run, f"{b}/gen", prompts=prompts, max_chars=20))
    gen = OutputDir(f"{b}/gen", {}).read_table().to_pylist()
    assert sorted(r["prompt"] for r in gen) == ["class ", "def ", "import "]
    assert all(len(r["text"]) == 20 for r in gen)


def kiln(*args):
    return [sys.executable, "-m", "kiln", *args]


def test_resume_continues_a_killed_run(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(embedded.stdlib_corpus(100_000))
    run = str(tmp_path / "run")
    args = ["train", "rnn", "--data", str(corpus), "--out", run, "--epochs", "40",
            "--hidden", "32", "--layers", "1", "--seq-len", "32", "--batch-size", "16"]
    proc = subprocess.Popen(kiln(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if os.path.exists(os.path.join(run, "metrics.jsonl")) and len(metrics(run)) >= 2:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(metrics(run))
    assert 2 <= done_before < 40, "the run must be killed part-way"

    refused = subprocess.run(kiln(*args), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = subprocess.run(kiln(*args[:-10], "--epochs", "6", *args[-8:], "--resume"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = metrics(run)
    assert [m["epoch"] for m in history] == list(range(1, len(history) + 1))
    assert len(history) == max(6, done_before)
    steps = [m["step"] for m in history]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert "epoch   1 " not in resumed.stderr  # it did not start over
    # Resumed again once done (or killed after its last checkpoint): nothing more is trained.
    again = subprocess.run(kiln(*args[:-10], "--epochs", "6", *args[-8:], "--resume"),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert metrics(run) == history


def test_a_workers_threads_are_its_share_and_never_more_than_its_nodes_cpus():
    """The driver shares the run's CPUs out (a cluster's in all); a worker takes no more
    threads than its own node's CPUs over the run's workers on that node."""
    from kiln.train.loop import worker_threads

    assert worker_threads(share=2, cpus=2, on_node=1) == 2  # a lone worker, a small machine
    assert worker_threads(share=24, cpus=16, on_node=2) == 8  # 48 CPUs in all, 16 here
    assert worker_threads(share=1, cpus=16, on_node=1) == 1  # a search's trial keeps its share
    assert worker_threads(share=4, cpus=1, on_node=2) == 1  # never none


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 1000, 1.0, warmup_steps(1000)) for s in range(1000)]
    assert lrs[0] < lrs[19] == pytest.approx(1.0)
    assert lrs[-1] < 0.002 and all(a >= b for a, b in zip(lrs[20:], lrs[21:], strict=False))
    assert lr_at(1000, 1000, 1.0) == 0.0
    # Warm-up, stable, decay: the peak held until the last 30%, then a line to zero.
    wsd = [lr_at(s, 1000, 1.0, 20, cooldown=0.3) for s in range(1001)]
    assert wsd[20] == wsd[690] == 1.0 and 0.4 < wsd[860] < 0.6 and wsd[1000] == 0.0
    # SGD (the ResNets) warms up over the standard recipe's 200 steps, a tenth of a short run.
    assert [warmup_steps(t, *SGD_WARMUP) for t in (100_000, 1_200, float("inf"))] == [200, 120,
                                                                                      200]
    # Under a time limit, before the step rate is measured, the rate holds at the peak.
    assert lr_at(19, float("inf"), 1.0) == pytest.approx(1.0) == lr_at(5000, float("inf"), 1.0)


def test_model_keeps_the_final_weights_unless_an_earlier_validation_is_better_beyond_noise():
    """model/ under an annealed schedule: the last validation's weights where they are as good
    as the best within two standard errors of its accuracy (on 1,000 images, 2.4 points near
    0.83), the best otherwise; a char-RNN's loss over every character keeps its best."""
    from kiln.train.cnn import CNNFamily
    from kiln.train.loop import within_noise
    from kiln.train.rnn import RNNFamily

    def rec(acc, n=1000, loss=0.5):
        return {"val_accuracy": acc, "val_loss": loss, "val_images": n}

    history = [rec(0.80), rec(0.83), rec(0.82)]
    assert within_noise(CNNFamily, history[-1], history)  # 1 point under: noise
    assert not within_noise(CNNFamily, rec(0.79), [*history[:2], rec(0.79)])  # 4 points: not
    assert not within_noise(CNNFamily, rec(0.82, n=100_000), [rec(0.83, n=100_000),
                                                            rec(0.82, n=100_000)])
    assert within_noise(CNNFamily, rec(0.83, loss=0.6), [rec(0.83), rec(0.83, loss=0.6)])
    # A perfect score on 359 images is not noiseless; a line of an older kiln has no count.
    assert within_noise(CNNFamily, rec(0.997, n=359), [rec(1.0, n=359), rec(0.997, n=359)])
    old = {"val_accuracy": 0.83, "val_loss": 0.5}
    assert within_noise(CNNFamily, rec(0.82), [old, rec(0.82)])
    assert not within_noise(CNNFamily, rec(0.79), [old, rec(0.79)])
    lm = [{"val_loss": 0.80}, {"val_loss": 0.86}]
    assert not within_noise(RNNFamily, lm[-1], lm) and within_noise(RNNFamily, lm[0], lm[:1])


def test_label_smoothing_spreads_the_target_over_every_class():
    """The loss with smoothing e: (1 - e) of the true class's cross-entropy plus e of the mean
    over every class's; 0.1 by default for the ResNets, none for the Keras MNIST net."""
    from kiln.models import CNNSpec
    from kiln.train.job import resolve
    from kiln.train.tasks import CNNTask, Schedule, WorkerConfig

    spec = CNNSpec("mnist_cnn", list("abc"))
    cfg = WorkerConfig(kind="cnn", spec=spec, out="", data="", augment="none",
                       label_smoothing=0.1, schedule=Schedule(
                           batch=4, lr=0.1, optimizer="sgd", cooldown=1.0, epochs=1,
                           max_steps=1, time_limit_s=None))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 3))
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 1])
    loss, n = CNNTask(spec, cfg).loss(model, {"x": x, "y": y})
    logp = model(x).log_softmax(1)  # (4, 3)
    expected = (0.9 * -logp[torch.arange(4), y] + 0.1 * -logp.mean(1)).mean()
    assert n == 4 and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() != pytest.approx(-logp[torch.arange(4), y].mean().item(), rel=1e-3)
    smoothing = {arch: resolve(TrainOptions("cnn", "d", "o", arch=arch)).label_smoothing
                 for arch in ("resnet20", "resnet18", "mnist_cnn")}
    assert smoothing == {"resnet20": 0.1, "resnet18": 0.1, "mnist_cnn": 0.0}
    assert resolve(TrainOptions("cnn", "d", "o", label_smoothing=0.0)).label_smoothing == 0.0


def test_precise_bn_makes_batch_norm_statistics_the_mean_over_training_images():
    """Before the final validation each batch norm's running mean becomes the mean over a
    fixed sample of the (unaugmented, normalized) training images, not an average of the last
    few batches; its momentum is restored; a frozen norm (eval mode) keeps its statistics."""
    import contextlib
    from types import SimpleNamespace

    from kiln.models import CNNSpec
    from kiln.train.batches import ImageBatches
    from kiln.train.loop import PRECISE_BN_IMAGES, precise_bn
    from kiln.train.tasks import CNNTask, Schedule, WorkerConfig

    spec = CNNSpec("resnet20", list("ab"), channels=3, image_size=8, mean=[0.5] * 3,
                   std=[0.25] * 3)
    cfg = WorkerConfig(kind="cnn", spec=spec, out="", data="", schedule=Schedule(
        batch=64, lr=0.1, optimizer="sgd", cooldown=1.0, epochs=1, max_steps=1,
        time_limit_s=None))
    task = CNNTask(spec, cfg)
    gen = torch.Generator().manual_seed(0)
    rows = {"x": torch.randint(0, 256, (3000, 3, 8, 8), generator=gen, dtype=torch.uint8),
            "y": torch.randint(0, 2, (3000,), generator=gen)}
    train = ImageBatches(None, task, cfg, rank=0, workers=1)
    train.rows = rows
    live, frozen = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    model = torch.nn.Sequential(live, frozen)
    model.train()
    frozen.eval()
    with torch.no_grad():  # an EMA of a few batches of other images, as training leaves it
        for _ in range(5):
            model(torch.randn(64, 3, 8, 8) * 3 + 5)
    kept = frozen.running_mean.clone()
    w = SimpleNamespace(raw=model, task=task, autocast=contextlib.nullcontext(),
                        device=torch.device("cpu"), layout=torch.preserve_format, workers=1)
    precise_bn(w, train, seconds=60)
    batches = list(train.unaugmented(PRECISE_BN_IMAGES))
    assert len(batches) == 3000 // 64
    assert next(train.unaugmented(100))["x"].equal(batches[0]["x"])
    x = torch.cat([task.to_device(b, w.device, w.layout)["x"] for b in batches])
    assert torch.allclose(live.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(live.running_var, x.var((0, 2, 3)), rtol=0.02)
    assert live.momentum == 0.1 and torch.equal(frozen.running_mean, kept)


def test_a_time_budget_is_estimated_in_steps_and_validated_towards_its_end():
    budget = Budget(max_steps=None, time_s=100.0)
    assert budget.by_time and budget.total == float("inf")
    for step in range(1, 40):  # 10 steps a second of training
        budget.total = budget.estimate(step, step / 10, step / 10)
    assert budget.total == pytest.approx(1000, rel=0.01)  # 100 s at 10 steps/s
    marks = budget.milestones()
    gaps = [b - a for a, b in zip([0.0, *marks], marks, strict=False)]
    assert marks[-1] == 1.0 and all(a > b for a, b in zip(gaps, gaps[1:], strict=False))
    due = [s for s in range(1, 1001) if budget.eval_due(s)]
    assert due[0] == int(marks[0] * 1000 + 0.999)
    budget.record_eval(2.0, due[0])  # a validation takes 2 s: 5 fit in 10% of 100 s
    assert budget.planned_evals() == 5 and not budget.eval_due(due[0] + 1)
    # The time the remaining validations will take is kept out of the training steps, and
    # the schedule is never behind the clock: 500 steps in 55 s of 100, with 4 validations of
    # 2 s to come, is at most 63% of the way.
    assert budget.estimate(500, 50.0, 55.0) == pytest.approx(min(500 + 10 * (45 - 4 * 2),
                                                                 500 / 0.63), rel=0.02)
    assert budget.estimate(500, 50.0, 92.0) == pytest.approx(500)  # the clock has run out
    # --epochs and --time-limit: whichever ends first.
    both = Budget(max_steps=300, time_s=100.0)
    for step in range(1, 40):
        assert both.estimate(step, step / 10, step / 10) <= 300
    assert not both.by_time and not both.eval_due(299)


def crops_of(out: torch.Tensor, x: torch.Tensor, pad: int, mode: str, mirror: bool
             ) -> list[tuple[int, int, bool]]:
    """For each output image, the one (dy, dx, mirrored) such that it is the S x S crop at
    (dy, dx) of its input padded by `pad` (NumPy's pad `mode`: edge values, or reflected),
    mirrored left-right if so; fails if an image is no such crop."""
    s = x.shape[-1]
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode=mode)

    def crop(i: int, dy: int, dx: int, m: bool) -> np.ndarray:
        window = padded[i, :, dy : dy + s, dx : dx + s]
        return window[..., ::-1] if m else window

    found = []
    for i, img in enumerate(out.numpy()):
        hits = [(dy, dx, m) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                for m in ((False, True) if mirror else (False,))
                if np.array_equal(img, crop(i, dy, dx, m))]
        assert len(hits) == 1, f"image {i} is not a crop of its padded input: {hits}"
        found.append(hits[0])
    return found


def test_augment_shifts_or_flips_but_keeps_shape_and_pixels():
    torch.manual_seed(0)
    b, c, s = 64, 3, 32
    # Distinct nonzero values: each crop is unambiguous and zero padding tells from pixels.
    x = torch.arange(1, b * c * s * s + 1, dtype=torch.float32).reshape(b, c, s, s)

    shifted = augment_batch(x, "shift")
    assert shifted.shape == x.shape
    pad = max(1, s // 14)
    offsets = crops_of(shifted, x, pad, "edge", mirror=False)
    assert sum((dy, dx) != (pad, pad) for dy, dx, _ in offsets) > 40  # most images moved
    assert {dy for dy, _, _ in offsets} == {dx for _, dx, _ in offsets} == set(range(2 * pad + 1))

    flipped = augment_batch(x, "flip")
    assert flipped.shape == x.shape
    pad = max(1, s // 8)
    offsets = crops_of(flipped, x, pad, "reflect", mirror=True)
    assert sum((dy, dx) != (pad, pad) for dy, dx, _ in offsets) > 40
    assert {0, 2 * pad} <= {dy for dy, _, _ in offsets} & {dx for _, dx, _ in offsets}
    mirrored = sum(m for _, _, m in offsets)
    assert 15 < mirrored < 49  # about half the images, each way
    assert not (flipped == 0).any()  # reflect: every pixel is one of the image's own

    assert torch.equal(augment_batch(x, "none"), x)


def test_flips_are_chosen_for_colour_photos_not_for_grayscale():
    assert choose_augment("auto", 3) == "flip" and choose_augment("auto", 1) == "shift"
    assert choose_augment("none", 3) == "none" and choose_augment("flip", 1) == "flip"
    with pytest.raises(ValueError, match="choose one of auto, flip, shift, none"):
        choose_augment("mirror", 3)


def test_non_utf8_text_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nstill fine\nbro\xffken\n")
    with pytest.raises(ValueError, match=r"bad.txt: not UTF-8 text \(line 3"):
        read_text(str(bad))


def test_colour_photos_under_a_time_limit_flip_and_label_with_their_own_statistics(
        ray_local, tmp_path):
    """--time-limit alone sets the run: it trains past the default 10 epochs and anneals its
    learning rate to the floor by the end. Colour photos get flips; the training set's own
    mean and std go into config.json, and labeling normalizes with them."""
    from PIL import Image

    from kiln.bulk.label import run_label
    from kiln.options import LabelOptions

    train_imgs, train_labels = embedded.photos(12, size=16)
    val_imgs, val_labels = embedded.photos(3, size=16, part="test")
    train_tar = embedded.write_flat_archive(tmp_path / "train.tar", train_imgs, [
        f"{c}/{i}.jpg" for i, c in enumerate(train_labels)])
    val_tar = embedded.write_flat_archive(tmp_path / "val.tar", val_imgs, [
        f"{c}/{i}.jpg" for i, c in enumerate(val_labels)])
    run = str(tmp_path / "run")
    budget_min = 0.3
    run_train(TrainOptions("cnn", str(train_tar), run, val=str(val_tar), time_limit=budget_min,
                           batch_size=24, arch="resnet8", image_size=16, channels=3))
    rows = metrics(run)
    last = rows[-1]
    assert last["epoch"] > 10  # no --epochs: the budget, not the default, ends the run
    cfg = storage.load_model(run).config
    # Annealed to (nearly) zero by the end: the schedule reaches its end when the clock does,
    # unless a validation runs slower than the ones before it and ends the run a few percent
    # early (seen at 5.3% of the peak on a loaded machine); a run that did not anneal would
    # end at its peak.
    assert last["lr"] < 0.1 * cfg["train"]["lr"]
    # It ends within one validation of its budget (and training time is what it counts).
    assert last["elapsed_s"] <= budget_min * 60 + max(r["val_s"] for r in rows) + 5
    assert cfg["train"]["augment"] == "flip" and cfg["train"]["optimizer"] == "sgd"

    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), np.float64) / 255
                       for b in train_imgs])  # (N, 16, 16, 3)
    assert cfg["spec"]["mean"] == pytest.approx(pixels.mean((0, 1, 2)).tolist(), abs=1e-5)
    assert cfg["spec"]["std"] == pytest.approx(pixels.std((0, 1, 2)).tolist(), abs=1e-5)
    assert not np.allclose(cfg["spec"]["mean"], 0.5, atol=0.02)  # not the old fixed 0.5

    loaded = storage.load_model(run)
    x = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), np.float32)
                  for b in val_imgs]).transpose(0, 3, 1, 2) / 255
    mean = np.asarray(cfg["spec"]["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(cfg["spec"]["std"], np.float32).reshape(1, 3, 1, 1)
    with torch.no_grad():
        x = torch.from_numpy((x - mean) / std)
        once = loaded.model(x).softmax(1)  # (N, classes)
        mirrored = loaded.model(x.flip(3)).softmax(1)
    # --tta auto on a model trained on mirrored photos: flip averaging, each row's scores the
    # mean of the two forward passes', one row an image; by default, none.
    from kiln.pipelines.label import flip_tta

    assert flip_tta("auto", cfg) and not flip_tta("auto", {"train": {"augment": "shift"}})
    for tta, probs in (("auto", (once + mirrored) / 2), ("none", once)):
        out = tmp_path / f"labels-{tta}"
        run_label(LabelOptions(run, [str(val_tar)], str(out), top_k=1, tta=tta))
        labeled = {r["path"]: r["confidence"] for r in OutputDir(str(out)).read_table().to_pylist()}
        assert len(labeled) == len(val_labels)
        top = probs.max(1).values
        for i, c in enumerate(val_labels):
            assert labeled[f"{c}/{i}.jpg"] == pytest.approx(float(top[i]), abs=1e-4)
    from kiln.pipelines.sink import OutputError

    with pytest.raises(OutputError, match="differs in: tta"):  # one output, one kind of score
        run_label(LabelOptions(run, [str(val_tar)], str(tmp_path / "labels-auto"), top_k=1))


def test_a_workers_error_is_one_line_and_not_retried(ray_local, tmp_path):
    """A worker's own exception ends the run at once, as one line with its type and message;
    FailureConfig's retries are kept for lost workers (the killed-worker test above)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.util.queue import Queue
    from rich.console import Console

    from kiln.train.cnn import CNNFamily
    from kiln.train.fit import MAX_FAILURES, TrainingError, trainer_class, with_epoch_lines

    attempts = tmp_path / "attempts"

    def loop(config):
        with open(config["attempts"], "a") as f:
            f.write("x")
        raise ValueError("row 7 has no label")

    trainer = trainer_class()(
        loop, train_loop_config={"attempts": str(attempts)},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="t", storage_path=str(tmp_path / "st"),
                             failure_config=FailureConfig(max_failures=MAX_FAILURES)))
    lines = Queue(actor_options={"num_cpus": 0})
    try:
        with pytest.raises(TrainingError) as e:
            with_epoch_lines(trainer.fit, lines, CNNFamily, Console(file=io.StringIO()))
    finally:
        lines.shutdown()
    assert str(e.value) == "training failed: worker 0 raised ValueError: row 7 has no label"
    assert attempts.read_text() == "x"  # one attempt: not retried
