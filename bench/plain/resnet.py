"""ResNet-20 trained with the standard CIFAR recipe, in one process with plain PyTorch: the
honest baseline a skilled user would write instead of using kiln.

The network is He et al. 2016's CIFAR ResNet-20 (a 3x3 conv to 16 channels, then 3 stages of
3 BasicBlocks, widths 16/32/64, batch norm, 1x1 conv + BN shortcuts where the shape changes,
global average pooling, one linear layer). The class-per-folder tars (members CLASS/xxxx.jpg
or .png) are decoded with tarfile + PIL (RGB, resized to 32x32 if needed) into uint8 tensors
before the clock starts; per-channel mean/std come from the training set. Training: SGD,
Nesterov momentum 0.9, --lr at --batch (default 0.1 x batch / 128), weight decay 5e-4, a
linear warm-up over the first 200 steps, then the learning rate decayed linearly to 0 over the
steps that fit in --budget seconds (the total is estimated from the measured step time after
the first 20 steps and re-estimated every 10; training ends when the estimate says the budget
is spent); augmentation: 4-pixel reflect pad, random 32x32 crop and random horizontal flip,
on tensors, per batch. Epochs are shuffled permutations, the last incomplete batch of each
dropped. Then the final weights' accuracy on --test.

The other options take the recipe apart, one piece at a time, for bench/recipe.py's
ablation (the defaults are the recipe): --pad zeros, --warmup N, --bn-batch 64 (batch norm
over slices of the batch, as data-parallel workers each normalize their own share),
--val-fraction F with --select best (hold out F of the training images and keep the
weights that validate best at 8 points of the run, denser towards its end), --ema DECAY
(an exponential moving average of the weights, evaluated and kept), --label-smoothing X,
--tta (the test score of each image averaged with its mirror image's).

    python bench/plain/resnet.py --train TRAIN.tar --test TEST.tar --budget 60 [--threads 2]
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

SIZE = 32
WARMUP_STEPS = 20  # steps at the initial rate before the first estimate of the total
REESTIMATE_EVERY = 10


def read_class_tar(path: str, classes: list[str] | None = None):
    """uint8 (N, 3, 32, 32) images and int64 labels from CLASS/name members, in member order."""
    images, names = [], []
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isfile() or "/" not in m.name:
                continue
            with Image.open(io.BytesIO(tar.extractfile(m).read())) as im:
                im = im.convert("RGB")
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
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([lookup[n] for n in names], dtype=torch.long)
    return x, y, classes


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, classes: int, blocks: int = 3, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for stage, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if stage > 0 and b == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def augment(batch: torch.Tensor, gen: torch.Generator, pad: int = 4,
            mode: str = "reflect") -> torch.Tensor:
    """Pad by pad pixels (reflected, or zeros), take a random SIZE x SIZE crop and flip half,
    per image."""
    n = batch.shape[0]
    padded = F.pad(batch.float() if mode == "reflect" else batch, (pad, pad, pad, pad),
                   mode=mode if mode == "reflect" else "constant")
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=batch.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=batch.device)
    ar = torch.arange(SIZE, device=batch.device)
    flip = torch.rand(n, generator=gen, device=batch.device) < 0.5
    cols = torch.where(flip[:, None], SIZE - 1 - ar, ar) + ox[:, None]
    rows = ar + oy[:, None]
    idx_n = torch.arange(n, device=batch.device)[:, None, None, None]
    idx_c = torch.arange(batch.shape[1], device=batch.device)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


@torch.no_grad()
def evaluate(model, x, y, mean, std, device, batch: int = 1000, tta: bool = False
             ) -> tuple[float, float]:
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch):
        xb = (x[i:i + batch].to(device).float() / 255 - mean) / std
        yb = y[i:i + batch].to(device)
        probs = F.softmax(model(xb), 1)
        if tta:
            probs = (probs + F.softmax(model(xb.flip(3)), 1)) / 2
        loss += F.nll_loss(probs.clamp_min(1e-12).log(), yb, reduction="sum").item()
        correct += int((probs.argmax(1) == yb).sum())
    model.train()
    return correct / len(x), loss / len(x)


def forward(model, x: torch.Tensor, bn_batch: int) -> torch.Tensor:
    """Logits of a batch; with bn_batch, the batch in slices of that size, each normalized
    on its own (as each data-parallel worker normalizes its share)."""
    if not bn_batch or bn_batch >= len(x):
        return model(x)
    return torch.cat([model(x[i:i + bn_batch]) for i in range(0, len(x), bn_batch)])


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, m in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
        if e.dtype.is_floating_point:
            e.mul_(decay).add_(m, alpha=1 - decay)
        else:
            e.copy_(m)


def main() -> None:
    wall0 = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--budget", type=float, required=True, help="seconds of training steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="default 0.1 x batch / 128")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pad", choices=("reflect", "zeros"), default="reflect")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument("--bn-batch", type=int, default=0, help="normalize slices of this size")
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--select", choices=("last", "best"), default="last")
    p.add_argument("--ema", type=float, default=0.0, help="decay a step; 0: off")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--tta", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    lr0 = a.lr if a.lr is not None else 0.1 * a.batch / 128

    load0 = time.perf_counter()
    x_train, y_train, classes = read_class_tar(a.train)
    x_test, y_test, _ = read_class_tar(a.test, classes)
    x_val = y_val = None
    if a.val_fraction > 0:  # a random share held out, as kiln's --val-fraction does
        held = torch.rand(len(x_train), generator=torch.Generator().manual_seed(a.seed)) \
            < a.val_fraction
        x_val, y_val = x_train[held], y_train[held]
        x_train, y_train = x_train[~held], y_train[~held]
    as_float = x_train.float() / 255
    mean = as_float.mean((0, 2, 3)).view(1, 3, 1, 1).to(device)
    std = as_float.std((0, 2, 3)).view(1, 3, 1, 1).to(device)
    del as_float
    x_dev, y_dev = x_train.to(device), y_train.to(device)
    model = ResNet20(len(classes)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr0, momentum=a.momentum, nesterov=True,
                          weight_decay=a.weight_decay)
    gen = torch.Generator(device=device).manual_seed(a.seed)
    n = len(x_train)
    batch = min(a.batch, n)
    per_epoch = n // batch
    sync()
    load_s = time.perf_counter() - load0

    ema = None
    if a.ema:
        import copy

        ema = copy.deepcopy(model)
    train_s, steps, total = 0.0, 0, None
    t_warm = 0.0  # train_s after the first 5 steps: their time is not typical
    order = torch.empty(0, dtype=torch.long)
    last_loss = float("nan")
    checks, best = [1 - (1 - k / 8) ** 2 for k in range(1, 9)], ((-1.0, 0.0), None)
    val_s = 0.0
    while total is None or steps < total:
        t0 = time.perf_counter()
        k = steps % per_epoch
        if k == 0:
            order = torch.randperm(n, generator=gen, device=device)
        lr = lr0 * min(1.0, (steps + 1) / max(1, a.warmup))
        if total is not None and steps >= a.warmup:
            lr = lr0 * max(0.0, 1.0 - (steps - a.warmup) / max(1, total - a.warmup))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = order[k * batch:(k + 1) * batch]
        xb = (augment(x_dev[idx], gen, mode=a.pad).float() / 255 - mean) / std
        loss = F.cross_entropy(forward(model, xb, a.bn_batch), y_dev[idx],
                               label_smoothing=a.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema_update(ema, model, a.ema)
        last_loss = loss.item()  # also synchronizes a GPU
        train_s += time.perf_counter() - t0
        steps += 1
        if steps == 5:
            t_warm = train_s
        if steps >= WARMUP_STEPS and steps % REESTIMATE_EVERY == 0:
            step_s = (train_s - t_warm) / (steps - 5)
            total = steps + max(0, int((a.budget - train_s) / step_s))
        if train_s >= a.budget * 1.5:
            break  # a guard: the step time changed a lot
        done = total is not None and steps >= total
        if a.select == "best" and x_val is not None and total and (
                done or (checks and steps / total >= checks[0])):
            while checks and steps / total >= checks[0]:
                checks.pop(0)
            v0 = time.perf_counter()
            keep = ema if ema is not None else model
            acc_v, loss_v = evaluate(keep, x_val, y_val, mean, std, device)
            if (acc_v, -loss_v) > best[0]:  # accuracy, then loss: kiln's rank
                import copy

                best = ((acc_v, -loss_v), copy.deepcopy(keep.state_dict()))
            val_s += time.perf_counter() - v0

    final = ema if ema is not None else model
    if a.select == "best" and best[1] is not None:
        final.load_state_dict(best[1])
    e0 = time.perf_counter()
    acc, test_loss = evaluate(final, x_test, y_test, mean, std, device, tta=a.tta)
    eval_s = time.perf_counter() - e0
    print(json.dumps({
        "script": "bench/plain/resnet.py",
        "test_accuracy": acc,
        "test_loss": test_loss,
        "last_train_loss": last_loss,
        "steps": steps,
        "epochs": steps * batch / n,
        "samples_per_s": steps * batch / train_s if train_s else 0.0,
        "train_s": train_s,
        "load_s": load_s,
        "eval_s": eval_s,
        "wall_s": time.perf_counter() - wall0,
        "n_train": n,
        "n_test": len(x_test),
        "classes": len(classes),
        "params": sum(t.numel() for t in model.parameters()),
        "val_s": val_s,
        "config": {"batch": batch, "lr": lr0, "momentum": a.momentum,
                   "weight_decay": a.weight_decay, "threads": a.threads,
                   "device": str(device), "seed": a.seed, "budget": a.budget, "pad": a.pad,
                   "warmup": a.warmup, "bn_batch": a.bn_batch,
                   "val_fraction": a.val_fraction, "select": a.select, "ema": a.ema,
                   "label_smoothing": a.label_smoothing, "tta": a.tta},
    }))


if __name__ == "__main__":
    main()
