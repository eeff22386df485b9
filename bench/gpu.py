"""GPU checks and figures for the code that kiln's Ray workers and actors run on a GPU,
timed directly: the GPU machine lent to this project has PyTorch but not Ray.

- training: the train loop's own task objects and step (jobs/train_loop.py: CNNTask/RNNTask
  loss under bf16 autocast, AdamW, lr_at, gradient clipping), without Ray's data iterator and
  DDP; samples/s in fp32, bf16 and bf16 + channels-last; bf16 against fp32 on the same batch;
  the digits CNN to its held-out accuracy and a 2x256 LSTM for a fixed time on ~1 MB of stdlib;
- labeling: one label actor (pipelines/label.py LabelPredictor, gpu=True) over a tar of the
  digits as PNGs [BENCH-2] and a tar of photo-sized JPEGs [BENCH-4], with 1 to 15 decode
  threads; the model alone;
- generation: models.sample under bf16 autocast on the trained LSTM at several batch sizes,
  and a row's text alone against the same row in a batch.

    python bench/gpu.py [--quick] [--out DIR]    # --quick: tiny sizes, runs on a CPU too
Prints a Markdown summary last; writes gpu.json and gpu.md under --out."""

from __future__ import annotations

import argparse
import dataclasses
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
sys.path.insert(0, str(ROOT))

from bench.train import digits_tensors, windows  # noqa: E402
from jobs import embedded  # noqa: E402
from jobs.train_loop import CNNTask, RNNTask, lr_at, train_step  # noqa: E402
from models import CharVocab, SamplingSettings, build_model, row_seed, sample  # noqa: E402
from models.checkpoint import CNNSpec, RNNSpec, save_folder  # noqa: E402
from pipelines import sources  # noqa: E402
from pipelines.label import LabelPredictor, LabelSettings  # noqa: E402

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
def cnn_case(arch, classes, channels, size, batch):
    spec = CNNSpec(arch=arch, classes=[str(i) for i in range(classes)], channels=channels,
                   image_size=size, mean=[0.5] * channels, std=[0.5] * channels)
    x = torch.randn(batch, channels, size, size, device=DEV)
    y = torch.randint(0, classes, (batch,), device=DEV)
    return "cnn", spec, {"x": x, "y": y}


def rnn_case(vocab, batch, seq):
    spec = RNNSpec(vocab=[chr(32 + i) for i in range(vocab - 1)])
    return "rnn", spec, {"ids": torch.randint(0, vocab, (batch, seq + 1), device=DEV)}


def step_rate(kind, spec, batch, bf16: bool, channels_last: bool, steps: int) -> float:
    """Samples/s of the train loop's step on one device."""
    torch.manual_seed(0)
    task = (CNNTask if kind == "cnn" else RNNTask)(spec)
    model = build_model(kind, spec).to(DEV)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        batch = {k: (v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v)
                 for k, v in batch.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    n_samples = len(next(iter(batch.values())))
    for i in range(steps + 5):
        if i == 5:
            sync()
            t0 = time.perf_counter()
        train_step(task, model, opt, batch, autocast(bf16))
    sync()
    return steps * n_samples / (time.perf_counter() - t0)


def bf16_error(kind, spec, batch) -> float:
    """|bf16 - fp32| / |fp32| of the validation loss sum on one batch and one set of weights."""
    torch.manual_seed(0)
    task = (CNNTask if kind == "cnn" else RNNTask)(spec)
    model = build_model(kind, spec).to(DEV).eval()
    with torch.no_grad():
        ref = task.eval_sums(model, batch)[0].double()
        with autocast(True):
            got = task.eval_sums(model, batch)[0].double()
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


def fit(task, model, batches, epochs=None, budget_s=None, total_steps=1000, lr=2e-3,
        on_epoch=None):
    """The train loop's inner step (on CUDA: bf16 autocast and channels-last where the task
    asks for them) over epochs or a time budget;
    on_epoch(model, seconds) after each epoch, as the train loop validates."""
    from jobs.train_loop import to_device

    cl = DEV.type == "cuda" and task.channels_last
    layout = torch.channels_last if cl else torch.preserve_format
    model = model.to(memory_format=layout) if cl else model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    step, epoch, start = 0, 0, time.perf_counter()
    while (epochs and epoch < epochs) or (budget_s and time.perf_counter() - start < budget_s):
        model.train()
        for batch in batches():
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, lr)
            batch = {k: to_device(v, DEV, layout) for k, v in batch.items()}
            train_step(task, model, opt, batch, autocast(task.bf16))
            step += 1
            if budget_s and step % 20 == 0 and time.perf_counter() - start > budget_s:
                break
        epoch += 1
        if on_epoch:
            on_epoch(model, time.perf_counter() - start)
            model.train()
    sync()
    return model.eval(), step, epoch, time.perf_counter() - start


def train_digits(work: Path, quick: bool) -> Path:
    pngs, labels = embedded.digits(28)
    tr, te = embedded.split(len(pngs), 0.2, seed=1)
    x, y = digits_tensors([pngs[i] for i in tr], [labels[i] for i in tr])
    tx, ty = digits_tensors([pngs[i] for i in te], [labels[i] for i in te])
    x, y, tx, ty = x.to(DEV), y.to(DEV), tx.to(DEV), ty.to(DEV)
    spec = CNNSpec(arch="mnist_cnn", classes=[str(i) for i in range(10)])
    task, epochs, bs = CNNTask(spec), 2 if quick else 20, 64

    def batches():
        perm = torch.randperm(len(x), device=DEV)
        for i in range(0, len(x) - bs + 1, bs):
            yield {"x": x[perm[i:i + bs]], "y": y[perm[i:i + bs]]}

    torch.manual_seed(0)
    model = build_model("cnn", spec).to(DEV)
    model, steps, _, secs = fit(task, model, batches, epochs=epochs,
                                total_steps=epochs * (len(x) // bs))
    with torch.no_grad(), autocast(DEV.type == "cuda"):
        acc = float((model(tx).argmax(1) == ty).float().mean())
    RESULTS["digits_cnn"] = {"epochs": epochs, "steps": steps, "seconds": secs, "accuracy": acc}
    log(f"digits CNN: {epochs} epochs in {secs:.1f} s, held-out accuracy {acc:.4f}")
    LINES.extend(["", "### Learning on the GPU (bf16 autocast, the train loop's step)", "",
                  f"- MNIST net on the digits (1,437 train / 360 held out, batch {bs}): "
                  f"{epochs} epochs in {secs:.1f} s, held-out accuracy **{acc:.4f}**."])
    folder = work / "digits_model"
    save_folder(folder, model.float().cpu(), "cnn", spec)
    return folder


def train_lstm(work: Path, quick: bool, budget_s: float) -> Path:
    text = embedded.stdlib_corpus(100_000 if quick else 1_000_000)
    cut = int(len(text) * 0.9)
    vocab = CharVocab.build(text[:cut], min_count=2)
    ids = lambda s: np.asarray(vocab.encode(s), dtype=np.int64)  # noqa: E731
    tw, vw = windows(ids(text[:cut]), 128).to(DEV), windows(ids(text[cut:]), 128).to(DEV)
    spec = RNNSpec(vocab=list(vocab.chars))
    task, bs = RNNTask(spec), 64

    def batches():
        perm = torch.randperm(len(tw), device=DEV)
        for i in range(0, len(tw) - bs + 1, bs):
            yield {"ids": tw[perm[i:i + bs]]}

    curve: list[tuple[float, float]] = []  # (seconds, validation nats/char) per epoch
    best: dict = {}

    def validate(model, secs):
        model.eval()
        with torch.no_grad():
            sums = sum(task.eval_sums(model, {"ids": vw[i:i + 256]}).double()
                       for i in range(0, len(vw), 256))
        curve.append((round(secs, 1), float(sums[0] / sums[1])))
        if not best or curve[-1][1] < best["nats"]:
            best.update(nats=curve[-1][1], secs=secs, epoch=len(curve),
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})

    torch.manual_seed(0)
    model = build_model("rnn", spec).to(DEV)
    model, steps, epochs, secs = fit(task, model, batches, budget_s=budget_s,
                                     total_steps=10**9, on_epoch=validate)
    model.load_state_dict(best["state"])
    nats = best["nats"]
    RESULTS["lstm"] = {"budget_s": budget_s, "steps": steps, "epochs": epochs,
                       "best_val_nats_per_char": nats, "best_epoch": best["epoch"],
                       "curve": curve}
    log(f"LSTM: {steps} steps ({epochs} epochs) in {secs:.1f} s, best val {nats:.3f} "
        f"nats/char at epoch {best['epoch']} ({best['secs']:.0f} s); curve {curve}")
    LINES.append(f"- 2x256 LSTM on {len(text) / 1e6:.1f} MB of stdlib source (batch {bs}, seq 128, "
                 f"constant peak LR after warm-up, validated every epoch): {steps:,} steps, "
                 f"{epochs} epochs in {secs:.0f} s; best validation **{nats:.3f} nats/char** "
                 f"({nats / math.log(2):.2f} bits/char) at epoch {best['epoch']}, "
                 f"{best['secs']:.0f} s in (CPU target: <= 1.60 in 15 min on 2 cores).")
    folder = work / "lstm_model"
    save_folder(folder, model.float().cpu(), "rnn", spec)
    return folder


def collectives() -> None:
    """The train loop's validation and its all-reduces under the process group a GPU worker
    gets (NCCL, which refuses CPU tensors), with a DDP-wrapped model: world size 1."""
    import torch.distributed as dist

    from jobs.train_loop import all_sum, evaluate, past_deadline

    if DEV.type != "cuda":
        LINES.append("\n- Collectives: skipped (no CUDA).")
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        spec = CNNSpec(arch="mnist_cnn", classes=[str(i) for i in range(10)])
        task = CNNTask(spec)
        model = torch.nn.parallel.DistributedDataParallel(build_model("cnn", spec).to(DEV))
        cache = [{"x": torch.randn(32, 1, 28, 28), "y": torch.randint(0, 10, (32,))}
                 for _ in range(3)]
        got = evaluate(task, model.module, None, {"batch_size": 32}, DEV,
                       torch.autocast("cuda", torch.bfloat16), cache)
        sums = all_sum(torch.tensor([1.5, 2.0]))
        late = past_deadline(time.time() - 1), past_deadline(None)
    finally:
        dist.destroy_process_group()
    ok = 0 <= got["val_accuracy"] <= 1 and sums == [1.5, 2.0] and late == (True, False)
    RESULTS["collectives"] = {"evaluate": got, "all_sum": sums, "past_deadline": late, "ok": ok}
    log(f"collectives under NCCL: evaluate {got}, all_sum {sums}, past_deadline {late}")
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
    list(actor.label_unit(units[0], frozenset()))  # warm-up: CUDA kernels, page cache
    sync()
    t0 = time.perf_counter()
    for unit in units:
        rows += sum(s["rows"] for s in actor.label_unit(unit, frozenset()))
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
    save_folder(photo_model, build_model("cnn", spec), "cnn", spec)
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
    for name, model, size, ch in (("MNIST net 28x28", digits_model, 28, 1),
                                  ("resnet18 224x224", photo_model, 224, 3)):
        rate = model_alone(model, size if not quick else size, ch, 64 if quick else 1024,
                           2 if quick else 20)
        RESULTS.setdefault("model_alone", {})[name] = rate
        log(f"model alone {name}: {rate:,.0f} img/s")
        LINES.append(f"| (model alone, uint8 batch in memory, batch 1024) | {name} | - | "
                     f"{rate:,.0f} |")


# -------------------------------------------------------------------------------- generation
def generation(lstm_model: Path, quick: bool) -> None:
    from models.checkpoint import load_folder

    loaded = load_folder(lstm_model)
    net, vocab = loaded.model.to(DEV).eval(), loaded.vocab
    text = embedded.stdlib_corpus(200_000)
    starts = [text[i:i + 20] for i in range(0, 200_000, 97)]
    s = SamplingSettings(max_chars=32 if quick else 256, temperature=0.8)
    n = 32 if quick else 1024
    LINES.extend(["", f"### Generation (models.sample, {n} prompts, {s.max_chars} chars a row)",
                  "", "| lanes | fp32 chars/s | bf16 autocast chars/s |", "|---|---|---|"])
    prompts, seeds = starts[:n], [row_seed(7, i) for i in range(n)]
    for lanes in [8, 32] if quick else [64, 256, 1024]:
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
