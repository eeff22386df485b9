"""The Keras MNIST example network trained in one process with plain PyTorch: the honest
baseline a skilled user would write instead of using kiln.

conv 32 3x3 relu - conv 64 3x3 relu - max-pool 2 - dropout 0.25 - dense 128 relu - dropout 0.5
- dense (one output per class), with Keras's initialisation (Glorot-uniform weights, zero
biases). 1-channel PNG digits from class-per-folder tars (members CLASS/xxxx.png; resized to
28x28 if needed) are decoded with tarfile + PIL into one tensor before the clock starts, pixels
scaled to [0, 1]. Adam at lr 1e-3 (Keras's defaults, eps 1e-7), batch 128, whole epochs of a
shuffled permutation (the last batch may be short) for --budget seconds of training steps,
stopping mid-epoch when the budget ends; --shift adds random shifts of up to 2 pixels
(edge-padded random crop) as augmentation. Then the accuracy on --test.

    python bench/plain/mnist.py --train TRAIN.tar --test TEST.tar --budget 60 [--threads 2]
Prints one JSON object on the last line of stdout."""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

SIZE = 28


def read_class_tar(path: str, classes: list[str] | None = None):
    """float (N, 1, 28, 28) images in [0, 1] and int64 labels from CLASS/name members."""
    images, names = [], []
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isfile() or "/" not in m.name:
                continue
            with Image.open(io.BytesIO(tar.extractfile(m).read())) as im:
                im = im.convert("L")
                if im.size != (SIZE, SIZE):
                    im = im.resize((SIZE, SIZE), Image.BILINEAR)
                images.append(np.asarray(im))
            names.append(m.name.split("/")[-2])
    if classes is None:
        classes = sorted(set(names))
    lookup = {c: i for i, c in enumerate(classes)}
    missing = sorted(set(names) - set(lookup))
    if missing:
        raise SystemExit(f"{path}: classes not in the training set: {missing[:5]}")
    x = torch.from_numpy(np.stack(images)).unsqueeze(1).float() / 255
    y = torch.tensor([lookup[n] for n in names], dtype=torch.long)
    return x, y, classes


def keras_mnist_net(classes: int) -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(),
        nn.Conv2d(32, 64, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
        nn.Linear(64 * 12 * 12, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, classes),
    )
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def shift(batch: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """A random shift of up to pad pixels each way per image: edge-padded random crop."""
    n = batch.shape[0]
    padded = F.pad(batch, (pad, pad, pad, pad), mode="replicate")
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=batch.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=batch.device)
    ar = torch.arange(SIZE, device=batch.device)
    idx_n = torch.arange(n, device=batch.device)[:, None, None, None]
    rows = (ar + oy[:, None])[:, None, :, None]
    cols = (ar + ox[:, None])[:, None, None, :]
    return padded[idx_n, 0, rows, cols]  # (n, 1, SIZE, SIZE)


@torch.no_grad()
def evaluate(model, x, y, device, batch: int = 1000) -> tuple[float, float]:
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
        logits = model(xb)
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += int((logits.argmax(1) == yb).sum())
    model.train()
    return correct / len(x), loss / len(x)


def main() -> None:
    wall0 = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--budget", type=float, required=True, help="seconds of training steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--shift", action="store_true", help="random shifts of up to 2 pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    load0 = time.perf_counter()
    x_train, y_train, classes = read_class_tar(a.train)
    x_test, y_test, _ = read_class_tar(a.test, classes)
    x_dev, y_dev = x_train.to(device), y_train.to(device)
    model = keras_mnist_net(len(classes)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, eps=1e-7)
    gen = torch.Generator(device=device).manual_seed(a.seed)
    n = len(x_train)
    sync()
    load_s = time.perf_counter() - load0

    train_s, steps, samples = 0.0, 0, 0
    last_loss = float("nan")
    order, pos = torch.empty(0, dtype=torch.long), n
    while train_s < a.budget:
        t0 = time.perf_counter()
        if pos >= n:
            order, pos = torch.randperm(n, generator=gen, device=device), 0
        idx = order[pos:pos + a.batch]
        pos += len(idx)
        xb = x_dev[idx]
        if a.shift:
            xb = shift(xb, gen)
        loss = F.cross_entropy(model(xb), y_dev[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last_loss = loss.item()  # also synchronizes a GPU
        train_s += time.perf_counter() - t0
        steps += 1
        samples += len(idx)

    e0 = time.perf_counter()
    acc, test_loss = evaluate(model, x_test, y_test, device)
    eval_s = time.perf_counter() - e0
    print(json.dumps({
        "script": "bench/plain/mnist.py",
        "test_accuracy": acc,
        "test_loss": test_loss,
        "last_train_loss": last_loss,
        "steps": steps,
        "epochs": samples / n,
        "samples_per_s": samples / train_s if train_s else 0.0,
        "train_s": train_s,
        "load_s": load_s,
        "eval_s": eval_s,
        "wall_s": time.perf_counter() - wall0,
        "n_train": n,
        "n_test": len(x_test),
        "classes": len(classes),
        "params": sum(t.numel() for t in model.parameters()),
        "config": {"batch": a.batch, "lr": a.lr, "shift": a.shift, "threads": a.threads,
                   "device": str(device), "seed": a.seed, "budget": a.budget},
    }))


if __name__ == "__main__":
    main()
