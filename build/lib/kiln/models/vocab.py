"""The character vocabulary of the char-RNN.

Policy for characters the vocabulary lacks: index 0 is the unknown token UNK. Characters seen
fewer than `min_count` times in the training text map to UNK while training, so UNK has a
learned embedding; characters never seen map to UNK when a prompt is encoded (and are counted).
UNK is never sampled, so generated text holds only real characters."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

UNK = "\ufffd"  # how UNK prints when decoded


class CharVocab:
    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        if len(set(chars)) != len(chars) or UNK in chars:
            raise ValueError("vocabulary characters must be distinct and exclude U+FFFD")
        if any(len(c) != 1 for c in chars):
            raise ValueError("vocabulary entries must be single characters")
        self.chars = chars
        self.itos = [UNK, *chars]
        self.stoi = {c: i + 1 for i, c in enumerate(chars)}

    @classmethod
    def build(cls, text: str, min_count: int = 1) -> CharVocab:
        counts = Counter(text)
        return cls(sorted(c for c, n in counts.items() if n >= min_count and c != UNK))

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and other.chars == self.chars

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(c, 0) for c in text]

    def count_unknown(self, text: str) -> int:
        return sum(1 for c in text if c not in self.stoi)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in ids)
