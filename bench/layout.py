"""One training step (forward, backward, SGD with Nesterov momentum) of kiln's CNNs on a
batch of 64, in PyTorch's default NCHW layout and in channels-last (NHWC), on this machine's
CPU: why `kiln train cnn` takes channels-last on CPUs too (jobs/train/loop.py).

    .venv/bin/python bench/layout.py [--threads 1]
Prints a line per network and layout (not written to BENCHMARKS.md; see its Photo recipe
section)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kiln.models import build_model  # noqa: E402
from kiln.models.checkpoint import CNNSpec  # noqa: E402

NETS = [("resnet20", 3, 32), ("resnet8", 1, 28), ("mnist_cnn", 1, 28)]


def step_ms(arch: str, channels: int, size: int, layout) -> float:
    torch.manual_seed(0)
    spec = CNNSpec(arch, [str(i) for i in range(10)], channels=channels, image_size=size,
                   mean=[0.5] * channels, std=[0.25] * channels)
    model = build_model("cnn", spec).to(memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.randn(64, channels, size, size).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (64,))
    for i in range(25):  # 5 to warm up (allocations, kernel choice), 20 timed
        if i == 5:
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / 20 * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for arch, channels, size in NETS:
        nchw = step_ms(arch, channels, size, torch.contiguous_format)
        nhwc = step_ms(arch, channels, size, torch.channels_last)
        print(f"{arch} ({channels}x{size}x{size}), {a.threads} thread(s): NCHW {nchw:.1f} ms, "
              f"channels-last {nhwc:.1f} ms, {nchw / nhwc:.2f}x", flush=True)


if __name__ == "__main__":
    main()
