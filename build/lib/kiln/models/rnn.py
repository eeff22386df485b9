"""Character-level recurrent language model (char-rnn): embedding -> L recurrent layers ->
linear head over the vocabulary. `forward` runs whole sequences for training; `step` advances a
batch of sequences by one character with the fused cell kernels, for sampling."""

from __future__ import annotations

import torch
from torch import nn

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
_STEP = {"lstm": torch.lstm_cell, "gru": torch.gru_cell, "rnn": torch.rnn_tanh_cell}


class CharRNN(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        cell: str = "lstm",
        embed: int = 64,
        hidden: int = 256,
        layers: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"unknown RNN cell {cell!r}; choose one of {sorted(CELLS)}")
        if vocab_size < 2 or embed < 1 or hidden < 1 or layers < 1:
            raise ValueError("vocab_size >= 2, embed, hidden and layers >= 1 are required")
        self.cell, self.layers, self.hidden = cell, layers, hidden
        self.embed = nn.Embedding(vocab_size, embed)
        self.rnn = CELLS[cell](
            embed, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab_size)

    def init_state(self, batch: int, device=None):
        h = torch.zeros(self.layers, batch, self.hidden, device=device)
        return (h, torch.zeros_like(h)) if self.cell == "lstm" else h

    def forward(self, x: torch.Tensor, state=None):
        # x: (B, T) int64 -> logits (B, T, V)
        out, state = self.rnn(self.embed(x), state)  # out: (B, T, H)
        return self.head(self.drop(out)), state

    @torch.no_grad()
    def step(self, x: torch.Tensor, state):
        """x: (B,) int64; state as from init_state -> logits (B, V) float32, new state."""
        inp = self.embed(x)  # (B, E)
        step = _STEP[self.cell]
        hs, cs = [], []
        for layer in range(self.layers):
            w = [getattr(self.rnn, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih",
                                                              "bias_hh")]
            if self.cell == "lstm":
                h, c = step(inp, (state[0][layer], state[1][layer]), *w)
                cs.append(c)
            else:
                h = step(inp, state[layer], *w)
            hs.append(h)
            inp = h  # (B, H)
        new = (torch.stack(hs), torch.stack(cs)) if self.cell == "lstm" else torch.stack(hs)
        return self.head(inp), new


def nll_sum(model: CharRNN, ids: torch.Tensor, chunk: int = 1000, state=None):
    """Summed nats of predicting ids[:, 1:] from ids[:, :-1], read left to right in chunks
    of `chunk` characters with the state carried (char-rnn's evaluation); ids: (B, L + 1)
    int64 -> (float64 scalar, the state after the last character)."""
    import torch.nn.functional as F

    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    for a in range(0, ids.shape[1] - 1, chunk):
        piece = ids[:, a : a + chunk + 1]  # (B, <= chunk + 1)
        logits, state = model(piece[:, :-1], state)  # (B, T, V)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                 piece[:, 1:].reshape(-1), reduction="sum").double()
    return total, state
