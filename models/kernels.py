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

import contextlib
import functools
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import stepper
from .rnn import CharRNN

GATES = ("sigmoid", "tanh")
GATES_ENV = "KILN_GATES"
PROBE_S = 0.05  # seconds of timed steps per form, after two warm-up steps
PROBE_MIN_STEPS, PROBE_MAX_STEPS = 3, 40
# Another form is taken over the first (sigmoid gates, fp32 products) only where it is faster
# by more than this share: two forms within timing noise of each other would otherwise flip
# between measurements.
MARGIN = 0.05

# measure(model, gates, products, lanes) -> seconds a step takes on one thread
Measure = Callable[[CharRNN, str, str, int], float]


@dataclass(frozen=True)
class Kernels:
    gates: str  # "sigmoid" or "tanh": an LSTM's gate nonlinearity (Stepper)
    products: str  # "fp32" or "bf16": the recurrent layers' matrix products
    step_s: float | None = None  # seconds a step `lanes` wide took on one thread; None: unmeasured
    # "measured" now; "cached" from an earlier measurement; "set" (one form to take);
    # "resumed" (the form an interrupted output was written in); "fixed" (a cluster's workers,
    # whose CPUs this process cannot time, take the first form unless set)
    how: str = "measured"
    probe_s: float = 0.0  # what measuring cost now

    def describe(self) -> str:
        how = {"measured": f"measured on this CPU in {self.probe_s:.2f} s",
               "cached": "measured on this CPU before (cached)",
               "set": "as set",
               "resumed": "as the output was written in",
               "fixed": "on a cluster: set KILN_GATES and --precision to choose"}[self.how]
        return f"{self.gates} gates, {self.products} products ({how})"


def set_gates(gates: str = "auto") -> str | None:
    """The gates the caller or KILN_GATES set (checked); None where the measurement decides."""
    forced = gates if gates != "auto" else os.environ.get(GATES_ENV)
    if forced and forced not in GATES:
        raise ValueError(f"{GATES_ENV} must be one of {', '.join(GATES)}, got {forced!r}")
    return forced or None


def resumable(form: tuple[str | None, str | None], precision: str, gates: str = "auto"
              ) -> bool:
    """Whether an output written in `form` (gates, products) may be finished at these
    settings: nothing set asks for another form."""
    g, p = form
    return (g in GATES and p in ("fp32", "bf16") and set_gates(gates) in (None, g)
            and precision in ("auto", p))


def candidates(model: CharRNN, precision: str, gates: str = "auto") -> list[tuple[str, str]]:
    """The (gates, products) forms a job at `precision` and `gates` may take on this CPU."""
    forced = set_gates(gates)
    # Only an LSTM has the choice; the others' gates are their own.
    forms = ("sigmoid",) if model.cell != "lstm" else (forced,) if forced else GATES
    # onednn_linear() first: bf16_linear() is cached, and a process may turn oneDNN off.
    bf16 = stepper.onednn_linear() and stepper.bf16_linear()
    products = {"fp32": ("fp32",), "bf16": ("bf16",),
                "auto": ("fp32", "bf16") if bf16 else ("fp32",)}[precision]
    return [(g, p) for g in forms for p in products]


def step_seconds(model: CharRNN, gates: str, products: str, lanes: int) -> float:
    """The median time of one step `lanes` wide on one thread, in this form."""
    step = stepper.Stepper(model, "cpu", tanh_gates=gates == "tanh", bf16=products == "bf16")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, step.table.shape[0], (lanes,), generator=g)
    state = step.init_state(lanes)
    for _ in range(2):  # the first steps allocate and fault in their buffers
        _, state = step(x, state)
    times: list[float] = []
    while len(times) < PROBE_MAX_STEPS and (len(times) < PROBE_MIN_STEPS
                                            or sum(times) < PROBE_S):
        t0 = time.perf_counter()
        _, state = step(x, state)
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
    if isinstance(cached, dict) and (cached.get("gates"), cached.get("products")) in forms:
        _MEMO[key] = cached  # read once a process
        return Kernels(cached["gates"], cached["products"], cached.get("step_s"), "cached")
    measure = measure or step_seconds
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {form: measure(model, *form, lanes) for form in forms}
    finally:
        torch.set_num_threads(threads)
    fastest = min(forms, key=times.__getitem__)
    gates, products = fastest if times[fastest] < (1 - MARGIN) * times[forms[0]] else forms[0]
    chosen = Kernels(gates, products, times[gates, products], "measured",
                     time.perf_counter() - t0)
    if use_cache:
        entry = {"gates": gates, "products": products, "step_s": chosen.step_s,
                 "times": {f"{g}/{p}": s for (g, p), s in times.items()}}
        _MEMO[key] = entry  # this process keeps its choice even where the file cannot be written
        write_cache(key, entry)
    return chosen


_MEMO: dict[str, dict] = {}


def fixed(model: CharRNN, precision: str, gates: str = "auto") -> Kernels:
    """The form for workers whose CPUs are not this one's (a cluster): the first candidate
    (sigmoid gates, fp32 products) unless set, the same on every worker."""
    forced = set_gates(gates)
    return Kernels(forced if forced and model.cell == "lstm" else "sigmoid",
                   "fp32" if precision == "auto" else precision, how="fixed")


@functools.cache
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
    kernel = "oneDNN" if stepper.onednn_linear() else "addmm"
    return " | ".join([cpu_model(), f"torch {torch.__version__}", kernel, shape,
                       f"{lanes} lanes", ",".join(f"{g}/{p}" for g, p in forms)])


def cache_file() -> Path | None:
    """KILN_CACHE_DIR/kernels.json, else the user's cache folder's kiln/kernels.json; None
    where there is no home to keep it in."""
    if os.environ.get("KILN_CACHE_DIR"):
        return Path(os.environ["KILN_CACHE_DIR"]) / "kernels.json"
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        home = os.path.expanduser("~")
        if home == "~":
            return None
        base = os.path.join(home, ".cache")
    return Path(base) / "kiln" / "kernels.json"


def read_cache() -> dict:
    """The cache's entries; a file that is missing, unreadable or not kiln's reads as none."""
    path = cache_file()
    try:
        data = json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(key: str, entry: dict) -> None:
    """Adds an entry, atomically (a rename); a cache that cannot be written is skipped: the
    next job measures again."""
    path = cache_file()
    if path is None:
        return
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**read_cache(), key: entry}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernels-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
