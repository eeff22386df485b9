"""Which kernels a char-RNN's sampling steps take on a CPU, chosen by timing them there: an
LSTM's gates through sigmoid or through tanh alone, and the recurrent products in float32 or
bfloat16 (where oneDNN has bf16 kernels and `--precision auto` leaves it open). Which form is
faster depends on the CPU's microarchitecture, not on its instruction-set flags: tanh alone
won on an AVX-512 Xeon and lost on an AVX-512 EPYC, and bf16 products won on an EPYC without
AMX (BENCHMARKS.md, Generation section).

The forms give different rounding, so different texts: a choice is made once per job by its
driver and passed to every worker (`SamplingSettings.gates` and `.precision`), recorded in the
output's identity, and kept per CPU model, torch version and model shape in a small cache
file, so that a machine takes the same form every time. `KILN_GATES` sets the gates and
`--precision` the products; the cache is `$KILN_CACHE_DIR/kernels.json`, else
`$XDG_CACHE_HOME/kiln/kernels.json` (`~/.cache/kiln/kernels.json`)."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .rnn import CharRNN
from .stepper import Stepper, bf16_linear, onednn_linear

GATES = ("sigmoid", "tanh")
GATES_ENV = "KILN_GATES"
PROBE_S = 0.05  # seconds of timed steps per form, after two warm-up steps
PROBE_MIN_STEPS, PROBE_MAX_STEPS = 3, 40

# measure(model, gates, products, lanes) -> seconds a step takes on one thread
Measure = Callable[[CharRNN, str, str, int], float]


@dataclass(frozen=True)
class Kernels:
    gates: str  # "sigmoid" or "tanh": an LSTM's gate nonlinearity (Stepper)
    products: str  # "fp32" or "bf16": the recurrent layers' matrix products
    step_s: float | None = None  # seconds a step `lanes` wide took on one thread; None: unmeasured
    how: str = "measured"  # "measured" now, "cached" from an earlier measurement, or "set"
    probe_s: float = 0.0  # what measuring cost now

    def describe(self) -> str:
        how = {"measured": f"measured on this CPU in {self.probe_s:.2f} s",
               "cached": "measured on this CPU before (cached)",
               "set": "as set"}[self.how]
        return f"{self.gates} gates, {self.products} products ({how})"


def candidates(model: CharRNN, precision: str, gates: str = "auto") -> list[tuple[str, str]]:
    """The (gates, products) forms a job at `precision` and `gates` may take on this CPU."""
    forced = gates if gates != "auto" else os.environ.get(GATES_ENV)
    if forced and forced not in GATES:
        raise ValueError(f"{GATES_ENV} must be one of {', '.join(GATES)}, got {forced!r}")
    # Only an LSTM has the choice; the others' gates are their own.
    forms = ("sigmoid",) if model.cell != "lstm" else (forced,) if forced else GATES
    # onednn_linear() first: bf16_linear() is cached, and a process may turn oneDNN off.
    bf16 = onednn_linear() and bf16_linear()
    products = {"fp32": ("fp32",), "bf16": ("bf16",),
                "auto": ("fp32", "bf16") if bf16 else ("fp32",)}[precision]
    return [(g, p) for g in forms for p in products]


def step_seconds(model: CharRNN, gates: str, products: str, lanes: int) -> float:
    """The median time of one step `lanes` wide on one thread, in this form."""
    stepper = Stepper(model, "cpu", tanh_gates=gates == "tanh", bf16=products == "bf16")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, stepper.table.shape[0], (lanes,), generator=g)
    state = stepper.init_state(lanes)
    for _ in range(2):  # the first steps allocate and fault in their buffers
        _, state = stepper(x, state)
    times: list[float] = []
    while len(times) < PROBE_MAX_STEPS and (len(times) < PROBE_MIN_STEPS
                                            or sum(times) < PROBE_S):
        t0 = time.perf_counter()
        _, state = stepper(x, state)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def choose(model: CharRNN, precision: str, lanes: int, gates: str = "auto",
           measure: Measure | None = None, use_cache: bool = True) -> Kernels:
    """The fastest form among the candidates for this model at `precision` and `gates` on
    this CPU, timed on one thread (a sampling worker's), or the one cached for this CPU,
    torch and model shape. A single candidate is taken as set, unmeasured."""
    forms = candidates(model, precision, gates)
    if len(forms) == 1:
        return Kernels(*forms[0], how="set")
    key = cache_key(model, lanes, forms)
    cached = (_MEMO.get(key) or read_cache().get(key)) if use_cache else None
    if cached and (cached["gates"], cached["products"]) in forms:
        return Kernels(cached["gates"], cached["products"], cached["step_s"], "cached")
    measure = measure or step_seconds
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {form: measure(model, *form, lanes) for form in forms}
    finally:
        torch.set_num_threads(threads)
    gates, products = min(forms, key=times.__getitem__)  # ties: the first, sigmoid and fp32
    chosen = Kernels(gates, products, times[gates, products], "measured",
                     time.perf_counter() - t0)
    if use_cache:
        entry = {"gates": gates, "products": products, "step_s": chosen.step_s,
                 "times": {f"{g}/{p}": s for (g, p), s in times.items()}}
        _MEMO[key] = entry  # this process keeps its choice even where the file cannot be written
        write_cache(key, entry)
    return chosen


_MEMO: dict[str, dict] = {}


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what Python knows of it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(model: CharRNN, lanes: int, forms: list[tuple[str, str]]) -> str:
    shape = f"{model.cell} {model.layers}x{model.hidden} vocab {model.embed.num_embeddings}"
    kernel = "oneDNN" if onednn_linear() else "addmm"
    return " | ".join([cpu_model(), f"torch {torch.__version__}", kernel, shape,
                       f"{lanes} lanes", ",".join(f"{g}/{p}" for g, p in forms)])


def cache_file() -> Path:
    """KILN_CACHE_DIR/kernels.json, else the user's cache folder's kiln/kernels.json."""
    if os.environ.get("KILN_CACHE_DIR"):
        return Path(os.environ["KILN_CACHE_DIR"]) / "kernels.json"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kiln" / "kernels.json"


def read_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def write_cache(key: str, entry: dict) -> None:
    """Adds an entry, atomically (a rename); a cache that cannot be written is skipped: the
    next job measures again."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**read_cache(), key: entry}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernels-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass
