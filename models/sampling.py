"""Batched sampling from a CharRNN whose output per sequence depends only on the model, the
prompt, the sequence's seed and the settings: never on which other sequences share the batch.

Two things make that hold. Randomness is counter-based: the j-th character of a sequence is
drawn with a uniform number hashed from (its seed, j), not from a shared generator. And a
step's arithmetic gives each lane's row the same bits whatever the other rows hold, whichever
lane it sits in and however many lanes the step has: a step runs the full lanes (idle lanes
compute on dummies), or a narrower width only where that has been checked (`Stepper.width_for`:
kernels whose rounding can depend on the batch shape, pointwise loops whose remainder rounds
differently).

Lanes are refilled as they finish (continuous batching): a sequence that ends early, through
--stop or a short prompt, frees its lane for the next one instead of idling until the longest
of its group is done. A lane starts each sequence from the zero state, as the model was
trained to."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .kernels import GATES, choose
from .rnn import CharRNN
from .stepper import LANES, Stepper
from .vocab import CharVocab


@dataclass(frozen=True)
class SamplingSettings:
    max_chars: int = 200  # characters generated per prompt
    temperature: float = 1.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every character
    stop: str | None = None  # the continuation is cut before its first occurrence
    lanes: int = LANES  # sequences advanced together each step, at most
    max_prompt_chars: int = 2000  # longer prompts keep their last characters
    # The recurrent layers' matrix products: "fp32" or "bf16" everywhere; "auto" takes
    # bfloat16 on a GPU (under autocast) and, on a CPU, whichever is faster there where it
    # has bf16 kernels (measured: models.kernels). The state stays float32.
    precision: str = "auto"
    # An LSTM's gates on a CPU: through sigmoid, or tanh alone; "auto": the faster there.
    gates: str = "auto"

    def __post_init__(self):
        if self.max_chars < 0:
            raise ValueError("max_chars must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 keeps every character)")
        if self.lanes < 1 or self.max_prompt_chars < 1:
            raise ValueError("lanes and max_prompt_chars must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{self.precision!r}")
        if self.gates not in ("auto", *GATES):
            raise ValueError(f"gates must be auto, {' or '.join(GATES)}, got {self.gates!r}")


PRECISIONS = ("auto", "fp32", "bf16")


def row_seed(seed: int, row_id: str | int) -> int:
    """The seed of one row, from the run's seed and the row's id (63 bits, fits int64)."""
    digest = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _uniform(seeds: np.ndarray, j: np.ndarray) -> np.ndarray:
    """splitmix64 of (seed, counter j) -> float64 uniforms in [0, 1)."""
    with np.errstate(over="ignore"):
        z = seeds + (j.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def pick(logits: torch.Tensor, u: np.ndarray, temperature: float, top_k: int) -> np.ndarray:
    """logits (B, V), u (B,) -> (B,) chosen indices. Index 0 (UNK) is never chosen.

    Inverse-CDF sampling in float64 NumPy: every operation works along one row, so a row's
    choice depends only on its own logits and its own u (and NumPy's per-call overhead is a
    fraction of torch's on these small arrays). The rows are padded with -inf to a multiple
    of 32 columns, which are never chosen: NumPy's exp runs SIMD over the whole array and a
    remainder at its end, which may round differently, and in a padded array no row has
    elements in a remainder, however many rows there are."""
    scores = logits.detach().float().cpu().numpy()  # (B, V); bf16 under autocast
    v = scores.shape[1]
    z = np.full((scores.shape[0], -(-v // 32) * 32), -np.inf)  # float64
    z[:, :v] = scores
    z[:, 0] = -np.inf
    if temperature == 0:
        return z.argmax(axis=1)
    z *= 1.0 / temperature
    if 0 < top_k < v:
        w = z.shape[1]  # the padding ranks below every real column
        kth = np.partition(z, w - top_k, axis=1)[:, w - top_k, None]  # (B, 1)
        z[z < kth] = -np.inf
    z -= z.max(axis=1, keepdims=True)
    cdf = np.cumsum(np.exp(z), axis=1)  # (B, V)
    # The first index whose cdf reaches u * total (searchsorted, row by row).
    idx = (cdf < (u * cdf[:, -1])[:, None]).sum(axis=1)
    return np.minimum(idx, v - 1)


def encode_prompt(vocab: CharVocab, prompt: str, max_chars: int) -> tuple[list[int], int]:
    """A prompt as ids (an empty one is primed with a newline); returns (ids, unknown chars)."""
    prompt = (prompt or "\n")[-max_chars:]
    return vocab.encode(prompt), vocab.count_unknown(prompt)




@torch.no_grad()
def sample(
    model: CharRNN,
    vocab: CharVocab,
    prompts: list[str],
    seeds: list[int],
    settings: SamplingSettings,
    device: torch.device | str | None = None,
) -> list[str]:
    """The continuation of each prompt (the prompt itself is not repeated)."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt is required")
    if settings.max_chars == 0 or not prompts:
        return [""] * len(prompts)
    model.eval()
    device = torch.device(device or "cpu")
    if device.type == "cpu":  # the form as set, or the faster here (measured once, cached)
        k = choose(model, settings.precision, settings.lanes, gates=settings.gates)
        stepper = Stepper(model, device, tanh_gates=k.gates == "tanh", bf16=k.products == "bf16")
    else:  # on a GPU, bf16 is autocast's (the caller's)
        stepper = Stepper(model, device, tanh_gates=settings.gates == "tanh")
    return _Lanes(stepper, vocab, prompts, seeds, settings).run()


class _Lanes:
    """The sampling loop: `lanes` sequences advance one character a step; a lane whose
    sequence ends takes the next waiting prompt. Fewer prompts than lanes step at a narrower
    width, and so do the last sequences once no prompt waits (`Stepper.width_for`)."""

    def __init__(self, stepper: Stepper, vocab: CharVocab, prompts, seeds, settings):
        self.stepper, self.vocab, self.s = stepper, vocab, settings
        self.ids = [encode_prompt(vocab, p, settings.max_prompt_chars)[0] for p in prompts]
        self.seeds = np.array(seeds, dtype=np.uint64)
        # Longest first: the long ones start early, and the tail ends evenly.
        self.queue = sorted(range(len(prompts)), key=lambda i: -len(self.ids[i]))[::-1]
        n = stepper.width_for(len(prompts), settings.lanes)
        width = max(len(x) for x in self.ids) + settings.max_chars
        self.buf = np.zeros((n, width), dtype=np.int64)  # lane: its prompt, then its text
        self.row = np.full(n, -1)  # which prompt each lane holds; -1: idle
        self.pos = np.zeros(n, dtype=np.int64)  # the buf column fed at this step
        self.plen = np.ones(n, dtype=np.int64)
        self.seed = np.zeros(n, dtype=np.uint64)
        self.out: list[str] = [""] * len(prompts)
        stop = settings.stop or None
        self.stop_id = vocab.stoi.get(stop[-1], -1) if stop else -2  # never a picked index

    def _fill(self, lanes: np.ndarray, state: list[torch.Tensor]) -> None:
        for lane in lanes:
            if not self.queue:
                self.row[lane], self.pos[lane] = -1, 0  # idle: computes on a dummy
                continue
            r = self.queue.pop()
            x = self.ids[r]
            self.row[lane], self.pos[lane], self.plen[lane] = r, 0, len(x)
            self.seed[lane] = self.seeds[r]
            self.buf[lane, : len(x)] = x
        idx = torch.from_numpy(np.asarray(lanes, dtype=np.int64)).to(self.stepper.device)
        for t in state:
            t.index_fill_(0, idx, 0.0)  # a new sequence starts from the zero state

    def _finish(self, lane: int, length: int) -> None:
        start = self.plen[lane]
        text = self.vocab.decode(self.buf[lane, start : start + length])
        self.out[self.row[lane]] = text.split(self.s.stop, 1)[0] if self.s.stop else text

    def _narrow(self, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """With no prompt waiting, the sequences still running move to the narrowest width
        that holds them, if that is narrower: their rows of the buffers and the state, in
        lane order, padded with idle lanes."""
        running = np.flatnonzero(self.row >= 0)
        width = self.stepper.width_for(len(running), self.s.lanes) if len(running) else 0
        if not 0 < width < len(self.row):
            return state
        keep = np.concatenate([running, np.flatnonzero(self.row < 0)[: width - len(running)]])
        keep.sort()
        for name in ("buf", "row", "pos", "plen", "seed"):
            setattr(self, name, getattr(self, name)[keep])
        idx = torch.from_numpy(keep).to(self.stepper.device)
        return [t.index_select(0, idx) for t in state]

    def run(self) -> list[str]:
        s, lanes = self.s, np.arange(len(self.row))
        state = self.stepper.init_state(len(self.row))
        self._fill(lanes, state)
        dev = self.stepper.device
        while (self.row >= 0).any():
            x = torch.from_numpy(self.buf[lanes, self.pos]).to(dev)
            logits, state = self.stepper(x, state)  # (lanes, V)
            active = self.row >= 0
            j = self.pos - self.plen + 1  # which generated character this step picks
            choose = active & (j >= 0)
            finished = np.zeros_like(active)
            if choose.any():
                u = _uniform(self.seed, np.maximum(j, 0))
                picked = pick(logits, u, s.temperature, s.top_k)
                self.buf[lanes[choose], self.pos[choose] + 1] = picked[choose]
                finished = choose & (j >= s.max_chars - 1)
                for lane in np.flatnonzero(choose & (picked == self.stop_id) & ~finished):
                    finished[lane] = self._stopped(lane, j[lane] + 1)
            self.pos[active] += 1
            done = np.flatnonzero(finished)
            for lane in done:
                self._finish(lane, j[lane] + 1)
            if len(done):
                self._fill(done, state)
                if not self.queue:
                    state = self._narrow(state)
                    lanes = np.arange(len(self.row))
        return self.out

    def _stopped(self, lane: int, length: int) -> bool:
        """Whether the first `length` generated characters of a lane end with the stop text."""
        stop, start = self.s.stop, self.plen[lane]
        tail = self.buf[lane, max(start, start + length - len(stop)) : start + length]
        return self.vocab.decode(tail) == stop
