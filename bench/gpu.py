"""GPU checks and figures for the code that kiln's Ray workers and actors run on a GPU,
timed directly: the GPU machine lent to this project has PyTorch but not Ray.

- training: the train loop's own task objects and step (jobs/train/tasks.py CNNTask/RNNTask:
  to_device, loss under bf16 autocast, val_sums; make_optimizer's AdamW; jobs/train/schedule.py
  lr_at; jobs/train/loop.py train_step, gradient clipping), without Ray's data iterator and
  DDP; samples/s in fp32, bf16 and bf16 + channels-last; bf16 against fp32 on the same batch;
  the digits CNN to its held-out accuracy and a 2x256 LSTM for a fixed time on ~1 MB of stdlib;
- labeling: one label actor (pipelines/label.py LabelPredictor, gpu=True: JPEG batches
  decoded on the device) over a tar of the digits as PNGs [BENCH-2] and a tar of photo-sized
  JPEGs [BENCH-4], with 1 to 15 decode threads; the model alone; the batched device decode
  alone against one CPU thread's;
- generation: models.sample under bf16 autocast on the trained LSTM at several batch sizes;
  one step at 64-4,096 lanes eager against a CUDA graph's replay, beside the CPU side of a
  step (whether graphs would pay); a row's text alone against the same row in a batch.

    python bench/gpu.py [--quick] [--out DIR]    # --quick: tiny sizes, runs on a CPU too
Prints a Markdown summary last; writes gpu.json and gpu.md under --out."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import math
import os
import platform
import sys
import tarfile
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_kiln_from_checkout() -> None:
    """The GPU machine has PyTorch but no kiln installed: the import name kiln maps to this
    checkout as pyproject.toml's package-dir does (jobs/ is kiln; models/ and pipelines/, its
    sub-packages, sit beside jobs/ in the checkout's root)."""
    try:
        import kiln  # noqa: F401
    except ModuleNotFoundError:
        spec = importlib.util.spec_from_file_location(
            "kiln", ROOT / "jobs" / "__init__.py",
            submodule_search_locations=[str(ROOT / "jobs"), str(ROOT)])
        sys.modules["kiln"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_import_kiln_from_checkout()

from kiln import embedded  # noqa: E402
from kiln.models import CharVocab, SamplingSettings, build_model, row_seed, sample  # noqa: E402
from kiln.models.checkpoint import CNNSpec, RNNSpec, model_to_bytes  # noqa: E402
from kiln.pipelines import sources, storage  # noqa: E402
from kiln.pipelines.label import LabelPredictor, LabelSettings  # noqa: E402
from kiln.pipelines.transforms import ImagePreset, choose_augment, decode_uint8  # noqa: E402
from kiln.train.batches import TextStreams, ValBatches  # noqa: E402
from kiln.train.families import family  # noqa: E402
from kiln.train.loop import train_step  # noqa: E402
from kiln.train.schedule import lr_at  # noqa: E402
from kiln.train.tasks import (  # noqa: E402
    CNNTask,
    RNNTask,
    Schedule,
    WorkerConfig,
    make_optimizer,
)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RESULTS: dict = {}
LINES: list[str] = []


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(msg, flush=True)


def autocast(on: bool):
    """bf16 autocast on CUDA only: a CPU smoke run (--quick) measures fp32 in every column."""
    return torch.autocast("cuda", torch.bfloat16) if on and DEV.type == "cuda" else nullcontext()


# ---------------------------------------------------------------------------------- training
def config(kind: str, spec, batch: int, lr: float, augment: str = "none") -> WorkerConfig:
    """A worker's configuration as jobs/train/job.py fills it, for AdamW (weight decay 1e-4)."""
    return WorkerConfig(kind=kind, spec=spec, out="", data="", schedule=Schedule(
                            batch=batch, lr=lr, optimizer="adamw", cooldown=1.0, epochs=None,
                            max_steps=None, time_limit_s=None),
                        augment=choose_augment("auto", spec.channels) if kind == "cnn"
                        else augment)


def make_task(kind: str, spec, cfg: WorkerConfig):
    return family(kind).task(spec, cfg)


def cnn_case(arch, classes, channels, size, batch):
    """A uint8 batch as the workers' loaders give it (x normalized by task.to_device)."""
    spec = CNNSpec(arch=arch, classes=[str(i) for i in range(classes)], channels=channels,
                   image_size=size, mean=[0.5] * channels, std=[0.5] * channels)
    x = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, device=DEV)
    y = torch.randint(0, classes, (batch,), device=DEV)
    return "cnn", spec, {"x": x, "y": y}


def rnn_case(vocab, batch, seq):
    spec = RNNSpec(vocab=[chr(32 + i) for i in range(vocab - 1)])
    return "rnn", spec, {"ids": torch.randint(0, vocab, (batch, seq + 1), device=DEV),
                         "first": False}


def step_rate(kind, spec, batch, bf16: bool, channels_last: bool, steps: int) -> float:
    """Samples/s of the train loop's step on one device: task.to_device (normalization and
    layout; the batch already lies on the device, so no host-to-device copy) and train_step,
    the char-RNN's state carried from step to step as in an epoch."""
    torch.manual_seed(0)
    n_samples = len(next(iter(batch.values())))
    cfg = config(kind, spec, n_samples, 1e-3)
    task = make_task(kind, spec, cfg)
    model = build_model(kind, spec).to(DEV)
    layout = torch.channels_last if channels_last else torch.preserve_format
    if channels_last:
        model = model.to(memory_format=layout)
    opt = make_optimizer(model, cfg, 1e-4)
    task.begin_epoch()
    for i in range(steps + 5):
        if i == 5:
            sync()
            t0 = time.perf_counter()
        step = dict(batch, first=True) if kind == "rnn" and i == 0 else batch
        train_step(task, model, opt, task.to_device(step, DEV, layout), autocast(bf16))
    sync()
    return steps * n_samples / (time.perf_counter() - t0)


def val_of(kind, batch):
    """The validation object a task's val_sums reads, holding one batch."""
    if kind == "cnn":
        val = ValBatches(lambda: [batch], cache=True)
        val.load()
        return val
    val = TextStreams(None, 1000, 0, 1, seed=0)
    val.ids = batch["ids"]  # (streams, L + 1)
    return val


def bf16_error(kind, spec, batch) -> float:
    """|bf16 - fp32| / |fp32| of the validation loss sum on one batch and one set of weights."""
    torch.manual_seed(0)
    task = make_task(kind, spec, config(kind, spec, len(next(iter(batch.values()))), 1e-3))
    model = build_model(kind, spec).to(DEV).eval()
    val, layout = val_of(kind, batch), torch.preserve_format
    with torch.no_grad():
        ref = task.val_sums(model, val, DEV, layout, nullcontext())[0].double()
        got = task.val_sums(model, val, DEV, layout, autocast(True))[0].double()
    return float(abs(got - ref) / abs(ref))


def training_rates(quick: bool) -> None:
    cases = [
        ("MNIST net, 28x28x1", *cnn_case("mnist_cnn", 10, 1, 28, 64 if quick else 512)),
        ("resnet20, 32x32x3", *cnn_case("resnet20", 10, 3, 32, 16 if quick else 512)),
        ("resnet18, 224x224x3", *cnn_case("resnet18", 100, 3, 64 if quick else 224,
                                           4 if quick else 128)),
        ("2x256 LSTM, seq 128, batch 64", *rnn_case(98, 8 if quick else 64, 16 if quick else 128)),
        ("2x256 LSTM, seq 128, batch 256", *rnn_case(98, 8 if quick else 256,
                                                     16 if quick else 128)),
    ]
    steps = 3 if quick else 30
    LINES.extend(["", "### Training step (the train loop's task and step, one device)", "",
                  "| model | fp32 samples/s | bf16 | bf16 + channels-last | bf16 vs fp32 loss |",
                  "|---|---|---|---|---|"])
    for name, kind, spec, batch in cases:
        fp32 = step_rate(kind, spec, batch, False, False, steps)
        bf16 = step_rate(kind, spec, batch, True, False, steps)
        cl = step_rate(kind, spec, batch, True, True, steps) if kind == "cnn" else None
        err = bf16_error(kind, spec, batch)
        RESULTS.setdefault("train_step", {})[name] = {"fp32": fp32, "bf16": bf16, "bf16_cl": cl,
                                                      "bf16_rel_err": err}
        log(f"train step {name}: fp32 {fp32:,.0f}/s bf16 {bf16:,.0f}/s cl {cl} err {err:.2e}")
        LINES.append(f"| {name} | {fp32:,.0f} | {bf16:,.0f} ({bf16 / fp32:.2f}x) | "
                     + (f"{cl:,.0f} ({cl / fp32:.2f}x)" if cl else "-") + f" | {err:.1e} |")


def fit(task, model, cfg, batches, epochs=None, budget_s=None, total_steps=1000, on_epoch=None):
    """The train loop's inner step (on CUDA: bf16 autocast and channels-last where the task
    asks for them; task.to_device on every batch) over epochs or a time budget;
    batches(epoch) yields an epoch's batches; on_epoch(model, seconds) after each epoch, as
    the train loop validates."""
    cl = DEV.type == "cuda" and task.channels_last
    layout = torch.channels_last if cl else torch.preserve_format
    model = model.to(memory_format=layout) if cl else model
    opt = make_optimizer(model, cfg, 1e-4)
    step, epoch, start = 0, 0, time.perf_counter()
    while (epochs and epoch < epochs) or (budget_s and time.perf_counter() - start < budget_s):
        model.train()
        task.begin_epoch()
        for batch in batches(epoch):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, cfg.schedule.lr)
            train_step(task, model, opt, task.to_device(batch, DEV, layout),
                       autocast(task.bf16))
            step += 1
            if budget_s and step % 20 == 0 and time.perf_counter() - start > budget_s:
                break
        epoch += 1
        if on_epoch:
            on_epoch(model, time.perf_counter() - start)
            model.train()
    sync()
    return model.eval(), step, epoch, time.perf_counter() - start


def digits_tensors(pngs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """The digit PNGs as a (N, 1, 28, 28) uint8 tensor, as the workers' loaders hold them."""
    preset = ImagePreset()
    x = torch.from_numpy(np.stack([decode_uint8(p, preset) for p in pngs]))
    return x, torch.tensor([int(v) for v in labels])


def pixel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images in [0, 1], as kiln's training data records."""
    v = x.double().div(255).transpose(0, 1).reshape(x.shape[1], -1)  # (C, N * S * S)
    return v.mean(1).tolist(), v.std(1).clamp_min(1e-3).tolist()


def train_digits(work: Path, quick: bool) -> Path:
    pngs, labels = embedded.digits(28)
    tr, te = embedded.split(len(pngs), 0.2, seed=1)
    x, y = digits_tensors([pngs[i] for i in tr], [labels[i] for i in tr])
    tx, ty = digits_tensors([pngs[i] for i in te], [labels[i] for i in te])
    mean, std = pixel_stats(x)
    x, y, tx, ty = x.to(DEV), y.to(DEV), tx.to(DEV), ty.to(DEV)
    spec = CNNSpec(arch="mnist_cnn", classes=[str(i) for i in range(10)], mean=mean, std=std)
    epochs, bs = 2 if quick else 20, 64
    cfg = config("cnn", spec, bs, 2e-3)
    task = CNNTask(spec, cfg)

    def batches(epoch):
        perm = torch.randperm(len(x), device=DEV)
        for i in range(0, len(x) - bs + 1, bs):
            yield {"x": x[perm[i:i + bs]], "y": y[perm[i:i + bs]]}

    torch.manual_seed(0)
    model = build_model("cnn", spec).to(DEV)
    model, steps, _, secs = fit(task, model, cfg, batches, epochs=epochs,
                                total_steps=epochs * (len(x) // bs))
    val = ValBatches(lambda: [{"x": tx[i:i + 512], "y": ty[i:i + 512]}
                              for i in range(0, len(tx), 512)], cache=True)
    val.load()
    layout = torch.channels_last if DEV.type == "cuda" else torch.preserve_format
    with torch.no_grad():
        sums = task.val_sums(model, val, DEV, layout, autocast(DEV.type == "cuda"))
    acc = task.metrics(sums.tolist())["val_accuracy"]
    RESULTS["digits_cnn"] = {"epochs": epochs, "steps": steps, "seconds": secs, "accuracy": acc}
    log(f"digits CNN: {epochs} epochs in {secs:.1f} s, held-out accuracy {acc:.4f}")
    LINES.extend(["", "### Learning on the GPU (bf16 autocast, the train loop's step)", "",
                  f"- MNIST net on the digits (1,437 train / 360 held out, batch {bs}): "
                  f"{epochs} epochs in {secs:.1f} s, held-out accuracy **{acc:.4f}**."])
    folder = work / "digits_model"
    storage.save_model(str(folder), model_to_bytes(model.float().cpu(), "cnn", spec))
    return folder


def streams_of(ids: np.ndarray, streams: int, seq_len: int) -> TextStreams:
    """Encoded text cut into `streams` contiguous stretches of equal length L (+1 for the last
    target), as pipelines.train_data.text_streams lays them out, in a TextStreams on DEV."""
    length = (len(ids) - 1) // streams
    out = TextStreams(None, seq_len, 0, 1, seed=0)
    out.ids = torch.from_numpy(np.stack([ids[i * length : (i + 1) * length + 1]
                                         for i in range(streams)])).to(DEV)  # (streams, L + 1)
    return out


def train_lstm(work: Path, quick: bool, budget_s: float) -> Path:
    text = embedded.stdlib_corpus(100_000 if quick else 1_000_000)
    cut = int(len(text) * 0.9)
    vocab = CharVocab.build(text[:cut], min_count=2)
    ids = lambda s: np.asarray(vocab.encode(s), dtype=np.int64)  # noqa: E731
    bs, seq = 64, 100
    train, val = streams_of(ids(text[:cut]), bs, seq), streams_of(ids(text[cut:]), 4, 1000)
    spec = RNNSpec(vocab=list(vocab.chars))
    cfg = config("rnn", spec, bs, 2e-3)
    task = RNNTask(spec, cfg)

    curve: list[tuple[float, float]] = []  # (seconds, validation nats/char) per epoch
    best: dict = {}

    def validate(model, secs):
        model.eval()
        with torch.no_grad():
            sums = task.val_sums(model, val, DEV, torch.preserve_format, autocast(task.bf16))
        curve.append((round(secs, 1), task.metrics(sums.tolist())["val_loss"]))
        if not best or curve[-1][1] < best["nats"]:
            best.update(nats=curve[-1][1], secs=secs, epoch=len(curve),
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})

    torch.manual_seed(0)
    model = build_model("rnn", spec).to(DEV)
    model, steps, epochs, secs = fit(task, model, cfg, train.epoch, budget_s=budget_s,
                                     total_steps=math.inf, on_epoch=validate)
    model.load_state_dict(best["state"])
    nats = best["nats"]
    RESULTS["lstm"] = {"budget_s": budget_s, "steps": steps, "epochs": epochs,
                       "best_val_nats_per_char": nats, "best_epoch": best["epoch"],
                       "curve": curve}
    log(f"LSTM: {steps} steps ({epochs} epochs) in {secs:.1f} s, best val {nats:.3f} "
        f"nats/char at epoch {best['epoch']} ({best['secs']:.0f} s); curve {curve}")
    LINES.append(f"- 2x256 LSTM on {len(text) / 1e6:.1f} MB of stdlib source ({bs} streams, "
                 f"chunks of {seq}, state carried; constant peak LR after warm-up, validated "
                 f"every epoch on the whole held-out text): {steps:,} steps, "
                 f"{epochs} epochs in {secs:.0f} s; best validation **{nats:.3f} nats/char** "
                 f"({nats / math.log(2):.2f} bits/char) at epoch {best['epoch']}, "
                 f"{best['secs']:.0f} s in (CPU target: <= 1.60 in 15 min on 2 cores).")
    folder = work / "lstm_model"
    storage.save_model(str(folder), model_to_bytes(model.float().cpu(), "rnn", spec))
    return folder


def collectives() -> None:
    """The train loop's validation and its all-reduces under the process group a GPU worker
    gets (NCCL, which refuses CPU tensors), with a DDP-wrapped model: world size 1."""
    import torch.distributed as dist

    from kiln.train.loop import agree, all_sum

    if DEV.type != "cuda":
        LINES.append("\n- Collectives: skipped (no CUDA).")
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        spec = CNNSpec(arch="mnist_cnn", classes=[str(i) for i in range(10)])
        task = CNNTask(spec, config("cnn", spec, 32, 1e-3))
        model = torch.nn.parallel.DistributedDataParallel(build_model("cnn", spec).to(DEV))
        cache = [{"x": torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8),
                  "y": torch.randint(0, 10, (32,))} for _ in range(3)]
        val = ValBatches(lambda: cache, cache=True)
        val.load()
        model.module.eval()
        with torch.no_grad():
            got = task.metrics(all_sum(task.val_sums(
                model.module, val, DEV, torch.preserve_format,
                torch.autocast("cuda", torch.bfloat16))))
        sums = all_sum(torch.tensor([1.5, 2.0]))
        late = agree(100.0, True), agree(50.0, False)
    finally:
        dist.destroy_process_group()
    ok = (0 <= got["val_accuracy"] <= 1 and sums == [1.5, 2.0]
          and late == ((100.0, True), (50.0, False)))
    RESULTS["collectives"] = {"val_sums": got, "all_sum": sums, "agree": late, "ok": ok}
    log(f"collectives under NCCL: val_sums {got}, all_sum {sums}, agree {late}")
    LINES.append(f"\n- Validation and the all-reduces under NCCL with a DDP model: "
                 f"**{'ok' if ok else 'WRONG'}** ({got['val_accuracy']:.3f} accuracy on noise).")


# ---------------------------------------------------------------------------------- labeling
def write_tar(path: Path, blobs: list[bytes], n: int, ext: str) -> Path:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            data = blobs[i % len(blobs)]
            info = tarfile.TarInfo(f"img/{i:07d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def photos() -> list[bytes]:
    """scikit-image's bundled photos as ~90-quality JPEGs, each also at two smaller sizes
    (where scikit-image is missing, smooth noise at 480x360 stands in)."""
    from PIL import Image

    try:
        import skimage.data

        imgs = []
        for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                     "immunohistochemistry", "motorcycle_left", "camera", "coins"):
            try:
                imgs.append(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))
            except Exception:  # a photo this scikit-image build lacks
                continue
    except ImportError:
        small = np.random.default_rng(0).integers(0, 256, (6, 36, 48, 3), np.uint8)
        imgs = [Image.fromarray(a).resize((480, 360), Image.BICUBIC) for a in small]
    out = []
    for img in imgs:
        for scale in (1.0, 0.8, 0.65):
            im = img.resize((max(32, int(img.width * scale)), max(32, int(img.height * scale))))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def label_rate(model: Path, tar: Path, work: Path, threads: int, batch: int,
               chunk: int) -> float:
    out = work / f"out-{tar.stem}-{threads}"
    settings = LabelSettings(model=str(model), output=str(out), run_id="bench",
                             batch_size=batch, gpu=DEV.type == "cuda",
                             threads=1 if DEV.type == "cuda" else 2, decode_threads=threads,
                             part_rows=10_000)
    actor = LabelPredictor(settings)
    units = sources.plan([str(tar)], chunk=chunk)
    rows = 0
    list(actor.run_task((units[0], frozenset())))  # warm-up: CUDA kernels, page cache
    sync()
    t0 = time.perf_counter()
    for unit in units:  # as an actor runs a task (its short GIL switch interval too)
        rows += sum(s["rows"] for s in actor.run_task((unit, frozenset())))
    sync()
    actor.pool.shutdown()
    return rows / (time.perf_counter() - t0)


def model_alone(model: Path, size: int, channels: int, batch: int, reps: int) -> float:
    settings = LabelSettings(model=str(model), output=tempfile.mkdtemp(), run_id="m",
                             gpu=DEV.type == "cuda")
    actor = LabelPredictor(settings)
    images = np.random.default_rng(0).integers(0, 256, (batch, channels, size, size), np.uint8)
    actor.predict(images)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        actor.predict(images)
    sync()
    actor.pool.shutdown()
    return reps * batch / (time.perf_counter() - t0)


def decode_alone(jpgs: list[bytes], n: int, batch: int = 128) -> tuple[float, float]:
    """Images/s of 224-px decoding alone: a label actor's batched device decode
    (decode_jpegs_on: nvJPEG on CUDA) and one CPU thread file by file (decode_uint8)."""
    from kiln.pipelines.transforms import decode_jpegs_on

    preset = ImagePreset(224, 3)
    blobs = [jpgs[i % len(jpgs)] for i in range(n)]
    decode_jpegs_on(DEV, blobs[:batch], preset)  # warm-up: nvJPEG's handles
    sync()
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        assert decode_jpegs_on(DEV, blobs[i : i + batch], preset) is not None
    sync()
    device = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for b in blobs[: max(batch, n // 4)]:
        decode_uint8(b, preset, fast=True)
    return device, max(batch, n // 4) / (time.perf_counter() - t0)


def labeling(work: Path, digits_model: Path, quick: bool) -> None:
    cpus = os.cpu_count() or 1
    pngs, _ = embedded.digits(28)
    n_digits = 2_000 if quick else 60_000
    dtar = write_tar(work / "digits.tar", pngs, n_digits, "png")
    jpgs = photos()
    n_photos = 60 if quick else 3_000
    ptar = write_tar(work / "photos.tar", jpgs, n_photos, "jpg")
    mean_kb = sum(len(b) for b in jpgs) / len(jpgs) / 1024
    spec = CNNSpec(arch="resnet18", classes=[f"c{i}" for i in range(100)], channels=3,
                   image_size=224, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    torch.manual_seed(0)
    photo_model = work / "resnet18_model"
    storage.save_model(str(photo_model),
                       model_to_bytes(build_model("cnn", spec), "cnn", spec))
    top = min(15, cpus - 1)
    ways = [1, 2] if quick else sorted({1, 3, 7, top})
    LINES.extend(["", f"### Labeling: one label actor (LabelPredictor, {DEV.type}), "
                  f"{cpus} CPUs on the machine", "",
                  "| input | model | decoding | img/s |", "|---|---|---|---|"])
    for name, tar, model, batch, chunk in (
        (f"{n_digits:,} digit PNGs 28x28", dtar, digits_model, 512, n_digits // 10),
        (f"{n_photos:,} JPEG photos (~{mean_kb:.0f} KB) -> 224", ptar, photo_model, 128,
         n_photos // 6),
    ):
        for t in ways:
            rate = label_rate(model, tar, work, t, batch, chunk)
            how = f"{t} decode threads"
            RESULTS.setdefault("label", {}).setdefault(name, {})[how] = rate
            log(f"label {name}: {how} {rate:,.0f} img/s")
            LINES.append(f"| {name} | {model.stem.replace('_model', '')} | {how} | {rate:,.0f} |")
    device, cpu = decode_alone(jpgs, 256 if quick else 3_072)
    RESULTS["decode_224"] = {"batched_on_device": device, "cpu_one_thread": cpu}
    log(f"decode alone, JPEG photos -> 224: batched on {DEV.type} {device:,.0f} img/s, one "
        f"CPU thread {cpu:,.0f} img/s")
    LINES.append(f"| (decode alone, batches of 128) | JPEG photos -> 224 | batched on "
                 f"{DEV.type} | {device:,.0f} |")
    LINES.append(f"| (decode alone) | JPEG photos -> 224 | one CPU thread, file by file | "
                 f"{cpu:,.0f} |")
    for name, model, size, ch in (("MNIST net 28x28", digits_model, 28, 1),
                                  ("resnet18 224x224", photo_model, 224, 3)):
        rate = model_alone(model, size if not quick else size, ch, 64 if quick else 1024,
                           2 if quick else 20)
        RESULTS.setdefault("model_alone", {})[name] = rate
        log(f"model alone {name}: {rate:,.0f} img/s")
        LINES.append(f"| (model alone, uint8 batch in memory, batch 1024) | {name} | - | "
                     f"{rate:,.0f} |")


# -------------------------------------------------------------------------------- generation
def step_times(net, lanes: int, bf16: bool, steps: int) -> dict[str, float]:
    """Milliseconds of one sampling step (models.stepper.Stepper) at `lanes`: run eagerly,
    and (on CUDA) captured once in a CUDA graph and replayed, the state copied back inside
    the graph; and the CPU side of a step that sample() adds (logits to the host, pick)."""
    from kiln.models.sampling import pick
    from kiln.models.stepper import Stepper

    st = Stepper(net, DEV)
    x = torch.randint(1, net.head.out_features, (lanes,), device=DEV)
    state = st.init_state(lanes)
    out: dict[str, float] = {}
    with autocast(bf16):
        for _ in range(5):
            logits, state = st(x, state)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, state = st(x, state)
        sync()
        out["eager"] = (time.perf_counter() - t0) / steps * 1e3
        u = np.random.default_rng(0).random(lanes)
        t0 = time.perf_counter()
        for _ in range(steps):
            pick(logits, u, 0.8, 0)
        out["to host + pick"] = (time.perf_counter() - t0) / steps * 1e3
        if DEV.type != "cuda":
            return out
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture wants
            for _ in range(3):
                st(x, state)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_logits, new = st(x, state)
            for old, n in zip(state, new, strict=True):
                old.copy_(n)
        start = [t.clone() for t in state]
        want = st(x, [t.clone() for t in start])[0]
        graph.replay()  # from the same state: the same logits as the eager step
        out["graph equals eager"] = float(torch.equal(g_logits, want))
        for _ in range(5):
            graph.replay()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        sync()
        out["graph"] = (time.perf_counter() - t0) / steps * 1e3
    return out


def generation(lstm_model: Path, quick: bool) -> None:

    loaded = storage.load_model(str(lstm_model))
    net, vocab = loaded.model.to(DEV).eval(), loaded.vocab
    text = embedded.stdlib_corpus(200_000)
    starts = [text[i:i + 20] for i in range(0, 200_000, 97)]
    s = SamplingSettings(max_chars=32 if quick else 256, temperature=0.8)
    n = 32 if quick else 1024
    LINES.extend(["", f"### Generation (models.sample, {n} prompts, {s.max_chars} chars a row)",
                  "", "| lanes | fp32 chars/s | bf16 autocast chars/s |", "|---|---|---|"])
    prompts, seeds = starts[:n], [row_seed(7, i) for i in range(n)]
    for lanes in [8, 32] if quick else [64, 256, 1024, 4096]:
        rates = []
        for bf16 in (False, True):
            settings = dataclasses.replace(s, lanes=lanes)
            with autocast(bf16):
                sample(net, vocab, prompts[:4], seeds[:4], settings, device=DEV)  # warm-up
                sync()
                t0 = time.perf_counter()
                texts = sample(net, vocab, prompts, seeds, settings, device=DEV)
                sync()
            rates.append(sum(len(t) for t in texts) / (time.perf_counter() - t0))
        RESULTS.setdefault("generate", {})[lanes] = rates
        log(f"generate {n} prompts, {lanes} lanes: fp32 {rates[0]:,.0f} bf16 {rates[1]:,.0f}")
        LINES.append(f"| {lanes} | {rates[0]:,.0f} | {rates[1]:,.0f} |")
    LINES.extend(["", "One sampling step, ms (eager; captured in a CUDA graph and replayed; the "
                  "CPU side sample() adds: logits to the host and pick):", "",
                  "| lanes | autocast | eager | CUDA graph | to host + pick |",
                  "|---|---|---|---|---|"])
    for lanes in [8, 32] if quick else [64, 256, 1024, 4096]:
        for bf16 in (False, True):
            t = step_times(net, lanes, bf16, 20 if quick else 200)
            RESULTS.setdefault("step_ms", {})[f"{lanes} {'bf16' if bf16 else 'fp32'}"] = t
            graph = (f"{t['graph']:.3f} (same logits: {bool(t['graph equals eager'])})"
                     if "graph" in t else "(CUDA only)")
            LINES.append(f"| {lanes} | {'bf16' if bf16 else 'fp32'} | {t['eager']:.3f} | {graph} "
                         f"| {t['to host + pick']:.3f} |")
            log(f"step at {lanes} lanes, bf16 {bf16}: {t}")
    with autocast(DEV.type == "cuda"):
        batch = sample(net, vocab, starts[:16], [row_seed(7, i) for i in range(16)], s, DEV)
        alone = sample(net, vocab, starts[5:6], [row_seed(7, 5)], s, DEV)
    same = alone[0] == batch[5]
    RESULTS["generate_row_alone_equals_batched"] = same
    LINES.append(f"\nRow 5 generated alone equals row 5 of a batch of 16: **{same}**.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, CPU or GPU")
    ap.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp())
    ap.add_argument("--lstm-seconds", type=float, default=60.0)
    ap.add_argument("--skip", nargs="*", default=[], help="sections to leave out")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if DEV.type == "cuda" else platform.processor() or "CPU"
    RESULTS["env"] = {"device": name, "torch": torch.__version__, "cpus": os.cpu_count()}
    LINES.append(f"Device: {name}; torch {torch.__version__}; {os.cpu_count()} CPUs.")
    work = Path(tempfile.mkdtemp(prefix="kiln-gpu-"))
    t0 = time.perf_counter()
    models: dict = {}

    def section(title, fn):
        """Runs one section; a failure is reported and the others still run."""
        if title in a.skip:
            return
        try:
            fn()
        except Exception:
            import traceback

            traceback.print_exc()
            LINES.append(f"\n**{title} failed**: see the log.")
        log(f"[{title} done at {time.perf_counter() - t0:.0f} s]")
        (out / "gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        (out / "gpu.md").write_text("\n".join(LINES) + "\n")

    section("training rates", lambda: training_rates(a.quick))
    section("collectives", collectives)
    section("digits", lambda: models.update(digits=train_digits(work, a.quick)))
    section("lstm", lambda: models.update(
        lstm=train_lstm(work, a.quick, 3.0 if a.quick else a.lstm_seconds)))
    section("generation", lambda: generation(models["lstm"], a.quick))
    section("labeling", lambda: labeling(work, models["digits"], a.quick))
    print("\n".join(LINES))


if __name__ == "__main__":
    main()
