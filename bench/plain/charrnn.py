"""A char-LSTM trained the way karpathy/char-rnn does it, in one process with plain PyTorch:
the honest baseline a skilled user would write instead of using kiln.

Vocabulary = the characters of the training text (a character of the validation text that is
not in it maps to one extra index); a --layers x --hidden LSTM over --embed-wide embeddings.
The training text is cut into --batch contiguous streams read left to right in --seq-char
chunks, the hidden state carried from chunk to chunk (detached: truncated BPTT) and reset at
the start of each pass over the text. Adam at a constant --lr, gradients clipped at norm 5.
Training runs for --budget seconds of training steps (reading the text and any evaluation are
outside that clock). At the end the whole validation text is evaluated as ONE stream with the
state carried through it; --eval-every S also evaluates every S seconds of training.

    python bench/plain/charrnn.py --train TRAIN.txt --val VAL.txt --budget 60 [--threads 2]
Prints one JSON object on the last line of stdout."""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn as nn


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):
        out, state = self.lstm(self.embed(x), state)
        return self.head(self.drop(out)), state


def encode(text: str, index: dict[str, int], unknown: int) -> torch.Tensor:
    return torch.tensor([index.get(c, unknown) for c in text], dtype=torch.long)


def detach(state):
    return tuple(s.detach() for s in state)


@torch.no_grad()
def evaluate(model: CharLSTM, val: torch.Tensor, device: torch.device, chunk: int) -> float:
    """Mean cross-entropy (nats) of val[1:] given val[:-1], one stream, state carried."""
    model.eval()
    x, y = val[:-1].to(device), val[1:].to(device)
    total, state = 0.0, None
    for i in range(0, len(x), chunk):
        logits, state = model(x[i:i + chunk].unsqueeze(0), state)
        total += nn.functional.cross_entropy(logits[0], y[i:i + chunk], reduction="sum").item()
    model.train()
    return total / len(x)


def main() -> None:
    wall0 = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--budget", type=float, required=True, help="seconds of training steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="parallel streams")
    p.add_argument("--seq", type=int, default=100, help="characters per chunk (BPTT length)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip", type=float, default=5.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--eval-every", type=float, default=0.0,
                   help="also evaluate every S seconds of training (outside the clock)")
    p.add_argument("--eval-chunk", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cooldown", type=float, default=0.0,
                   help="not char-rnn's: decay the rate linearly to 0 over this last share of "
                   "the budget (0: constant, as char-rnn); for schedule experiments")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    load0 = time.perf_counter()
    with open(a.train, encoding="utf-8") as f:
        train_text = f.read()
    with open(a.val, encoding="utf-8") as f:
        val_text = f.read()
    chars = sorted(set(train_text))
    index = {c: i for i, c in enumerate(chars)}
    unknown = len(chars)
    data = encode(train_text, index, unknown)
    val = encode(val_text, index, unknown)
    unknown_val = int((val == unknown).sum())
    length = (len(data) - 1) // a.batch  # characters per stream
    if length < 2:
        raise SystemExit(f"training text too short for {a.batch} streams")
    xs = data[:a.batch * length].view(a.batch, length).to(device)
    ys = data[1:a.batch * length + 1].view(a.batch, length).to(device)
    chunks = [(i, min(i + a.seq, length)) for i in range(0, length, a.seq)]
    model = CharLSTM(len(chars) + 1, a.embed, a.hidden, a.layers, a.dropout).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    sync()
    load_s = time.perf_counter() - load0

    train_s = eval_s = 0.0
    steps = chars_seen = passes = 0
    curve: list[list[float]] = []
    next_eval = a.eval_every if a.eval_every > 0 else math.inf
    last_loss = math.nan
    state = None
    position = 0  # index into chunks
    while train_s < a.budget:
        t0 = time.perf_counter()
        if position == 0:
            state = None  # a new pass over the text
        i, j = chunks[position]
        if a.cooldown > 0:
            for group in opt.param_groups:
                group["lr"] = a.lr * min(1.0, (1 - train_s / a.budget) / a.cooldown)
        logits, state = model(xs[:, i:j], state)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           ys[:, i:j].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        state = detach(state)
        last_loss = loss.item()  # also synchronizes a GPU
        train_s += time.perf_counter() - t0
        steps += 1
        chars_seen += a.batch * (j - i)
        position += 1
        if position == len(chunks):
            position, passes = 0, passes + 1
        if train_s >= next_eval:
            e0 = time.perf_counter()
            curve.append([round(train_s, 2), evaluate(model, val, device, a.eval_chunk)])
            eval_s += time.perf_counter() - e0
            while next_eval <= train_s:
                next_eval += a.eval_every

    if not curve or curve[-1][0] != round(train_s, 2):  # else the last step was evaluated
        e0 = time.perf_counter()
        curve.append([round(train_s, 2), evaluate(model, val, device, a.eval_chunk)])
        eval_s += time.perf_counter() - e0
    nats = curve[-1][1]
    best = min(n for _, n in curve)
    print(json.dumps({
        "script": "bench/plain/charrnn.py",
        "val_nats_per_char": nats,
        "bits_per_char": nats / math.log(2),
        "best_val_nats_per_char": best,
        "best_bits_per_char": best / math.log(2),
        "curve": curve,  # [train_s, val nats/char]
        "last_train_loss": last_loss,
        "steps": steps,
        "epochs": chars_seen / (a.batch * length),
        "passes": passes,
        "chars_per_s": chars_seen / train_s if train_s else 0.0,
        "train_s": train_s,
        "load_s": load_s,
        "eval_s": eval_s,
        "wall_s": time.perf_counter() - wall0,
        "train_chars": len(data),
        "val_chars": len(val),
        "val_unknown_chars": unknown_val,
        "vocab": len(chars) + 1,
        "params": sum(t.numel() for t in model.parameters()),
        "config": {"hidden": a.hidden, "layers": a.layers, "embed": a.embed, "batch": a.batch,
                   "seq": a.seq, "lr": a.lr, "clip": a.clip, "dropout": a.dropout,
                   "threads": a.threads, "device": str(device), "seed": a.seed,
                   "budget": a.budget},
    }))


if __name__ == "__main__":
    main()
