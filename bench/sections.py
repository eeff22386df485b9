"""BENCHMARKS.md is written by several benchmarks; each owns one "## Title" section."""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

import torch

PATH = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nEach section is written by its script under `bench/`, which runs "
          "kiln and the plain baseline side by side in one run on the same machine.\n")


def write_section(title: str, body: str) -> None:
    text = PATH.read_text() if PATH.exists() else HEADER
    machine = (f"_{time.strftime('%Y-%m-%d')}, {platform.machine()}, "
               f"{torch.get_num_threads()} threads, torch {torch.__version__}_")
    section = f"## {title}\n\n{machine}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else \
        text.rstrip() + "\n\n" + section
    PATH.write_text(text)
