"""BENCHMARKS.md is written by several benchmarks; each owns one "## Title" section. What a
section holds below a NOTES line (figures of earlier machines, explanations) is written by
hand and kept when its script rewrites the section."""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

import torch

PATH = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nEach section is written by its script under `bench/`, which runs "
          "kiln and the plain baseline side by side in one run on the same machine.\n")
NOTES = "<!-- notes: written by hand, kept when the script rewrites the section -->"


def cpu_name() -> str:
    """The CPU's model name and its widest vector instructions (figures of different CPUs do
    not compare: MKL and oneDNN choose their kernels by instruction set)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    family = re.search(r"^cpu family\s*:\s*(\d+)$", info, re.M)
    listed = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = set(listed.group(1).split()) if listed else set()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    fam = f", family {family.group(1)}" if family else ""
    return f"{name.group(1).strip() if name else platform.machine()}{fam}, {isa}"


def write_section(title: str, body: str) -> None:
    text = PATH.read_text() if PATH.exists() else HEADER
    machine = (f"_{time.strftime('%Y-%m-%d')}, {platform.machine()} ({cpu_name()}), "
               f"{torch.get_num_threads()} threads, torch {torch.__version__}_")
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    old = pattern.search(text)
    kept = ""
    if old and NOTES in old.group(0):
        kept = "\n" + NOTES + old.group(0).split(NOTES, 1)[1].rstrip() + "\n"
    section = f"## {title}\n\n{machine}\n\n{body.strip()}\n{kept}"
    text = pattern.sub(lambda _: section + "\n", text) if old else \
        text.rstrip() + "\n\n" + section
    PATH.write_text(text)
