"""Batched sampling from a CharRNN whose output per sequence depends only on the model, the
prompt, the sequence's seed and the settings: never on which other sequences share the batch.

Two things make that hold. Randomness is counter-based: the j-th character of a sequence is
drawn with a uniform number hashed from (its seed, j), not from a shared generator. And every
step runs a fixed number of lanes (rows padded with dummies), so the matrix kernels, whose
rounding can depend on the batch shape, always see the same shape."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .rnn import CharRNN
from .vocab import CharVocab

MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class SamplingSettings:
    max_chars: int = 200  # characters generated per prompt
    temperature: float = 1.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every character
    stop: str | None = None  # the continuation is cut before its first occurrence
    lanes: int = 64  # sequences advanced together each step
    max_prompt_chars: int = 2000  # longer prompts keep their last characters

    def __post_init__(self):
        if self.max_chars < 0:
            raise ValueError("max_chars must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 keeps every character)")
        if self.lanes < 1 or self.max_prompt_chars < 1:
            raise ValueError("lanes and max_prompt_chars must be >= 1")


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
    """logits (B, V), u (B,) -> (B,) chosen indices. Index 0 (UNK) is never chosen."""
    logits = logits.double()
    logits[:, 0] = -torch.inf
    if temperature == 0:
        return logits.argmax(dim=1).numpy()
    logits = logits / temperature
    if 0 < top_k < logits.shape[1]:
        kth = torch.topk(logits, top_k, dim=1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    cdf = torch.softmax(logits, dim=1).cumsum(dim=1)  # (B, V)
    target = torch.from_numpy(u).unsqueeze(1) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target).squeeze(1)
    return idx.clamp_(max=logits.shape[1] - 1).numpy()


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
) -> list[str]:
    """The continuation of each prompt (the prompt itself is not repeated)."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt is required")
    model.eval()
    # Similar lengths side by side waste fewer steps; the order cannot change any row's text.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    for start in range(0, len(order), settings.lanes):
        chunk = order[start : start + settings.lanes]
        texts = _sample_lanes(
            model, vocab, [prompts[i] for i in chunk], [seeds[i] for i in chunk], settings
        )
        for i, text in zip(chunk, texts, strict=True):
            out[i] = text
    return out


def _sample_lanes(model, vocab, prompts, seeds, settings: SamplingSettings) -> list[str]:
    n, lanes, stop = len(prompts), settings.lanes, settings.stop
    if settings.max_chars == 0:
        return [""] * n
    ids = [encode_prompt(vocab, p, settings.max_prompt_chars)[0] for p in prompts]
    lengths = np.array([len(x) for x in ids] + [1] * (lanes - n))  # (lanes,)
    feed = np.zeros((lanes, int(lengths.max()) + settings.max_chars), dtype=np.int64)
    for r, x in enumerate(ids):
        feed[r, : len(x)] = x  # row r's prompt, then what it generates, in one (lanes, T) array
    seed_arr = np.array(list(seeds) + [0] * (lanes - n), dtype=np.uint64)
    state = model.init_state(lanes)
    done = np.arange(lanes) >= n
    rows = np.arange(lanes)
    for t in range(int(lengths[:n].max()) + settings.max_chars - 1):
        logits, state = model.step(torch.from_numpy(feed[:, t]), state)  # (lanes, V)
        j = t - lengths + 1  # which generated character this step chooses, per row
        choose = (j >= 0) & (j < settings.max_chars) & ~done
        if not choose.any():
            continue
        u = _uniform(seed_arr, np.maximum(j, 0))
        picked = pick(logits, u, settings.temperature, settings.top_k)
        feed[rows[choose], t + 1] = picked[choose]
        if stop:
            for r in np.flatnonzero(choose & (picked == vocab.stoi.get(stop[-1], -1))):
                start = lengths[r]
                tail = vocab.decode(feed[r, max(start, t + 2 - len(stop)) : t + 2])
                done[r] = tail == stop
        done |= j >= settings.max_chars - 1
        if done.all():
            break
    texts = [vocab.decode(feed[r, lengths[r] : lengths[r] + settings.max_chars]) for r in range(n)]
    return [t.split(stop, 1)[0] if stop else t for t in texts]
