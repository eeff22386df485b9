"""Sampling from a char-LSTM the way a skilled user writes it with plain PyTorch, without kiln:
the baselines that bench/generate.py runs next to `kiln generate`.

The weights come from a model folder (config.json + weights.safetensors, read here with
safetensors and json alone) into nn.Embedding -> nn.LSTM -> nn.Linear.

- `naive`: char-rnn's sample.lua, one sequence at a time: feed the prompt a character at a
  time, then softmax / temperature and torch.multinomial per character. `--mkldnn off` runs
  it with torch.backends.mkldnn.enabled = False (oneDNN's per-call cost dominates one-row
  steps on some CPUs); the faster of the two is the baseline.
- `batched`: --batch sequences stepped together: the batch's prompts are fed in one
  packed nn.LSTM call, then every step advances all of them through nn.LSTM at once.
  `--bf16`: under torch.autocast("cpu", bfloat16), as a user with AMX would run it.

    python bench/plain/sampling.py MODEL_DIR PROMPTS.txt --mode batched --max-chars 500
Prints one JSON object on the last line of stdout; the clock starts after the imports."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch.nn.utils.rnn import pack_padded_sequence


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)


def load(folder: Path) -> tuple[CharLSTM, list[str]]:
    folder = folder / "model" if (folder / "model").is_dir() else folder
    spec = json.loads((folder / "config.json").read_text())["spec"]
    chars = ["\x00"] + spec["vocab"]  # index 0: characters the vocabulary lacks
    model = CharLSTM(len(chars), spec["embed"], spec["hidden"], spec["layers"])
    model.load_state_dict(load_file(str(folder / "weights.safetensors")), strict=True)
    return model.eval(), chars


@torch.no_grad()
def naive(model: CharLSTM, stoi: dict, itos: list, prompts: list[str], max_chars: int,
          temperature: float) -> list[str]:
    out = []
    for prompt in prompts:
        state, y = None, None
        for c in prompt or "\n":
            y, state = model.rnn(model.embed(torch.tensor([[stoi.get(c, 0)]])), state)
        text = []
        for _ in range(max_chars):
            probs = torch.softmax(model.head(y[:, -1]) / temperature, dim=-1)
            x = torch.multinomial(probs, 1)  # (1, 1)
            text.append(itos[x.item()])
            y, state = model.rnn(model.embed(x), state)
        out.append("".join(text))
    return out


@torch.no_grad()
def batched(model: CharLSTM, stoi: dict, itos: list, prompts: list[str], max_chars: int,
            temperature: float, batch: int) -> list[str]:
    out = []
    for i in range(0, len(prompts), batch):
        group = [p or "\n" for p in prompts[i : i + batch]]
        lengths = torch.tensor([len(p) for p in group])
        x = torch.zeros(len(group), int(lengths.max()), dtype=torch.long)
        for row, p in enumerate(group):
            x[row, : len(p)] = torch.tensor([stoi.get(c, 0) for c in p])
        packed = pack_padded_sequence(model.embed(x), lengths, batch_first=True,
                                      enforce_sorted=False)
        _, state = model.rnn(packed)  # the state after each prompt's last character
        last = x[torch.arange(len(group)), lengths - 1]  # (B,)
        y, state = model.rnn(model.embed(last[:, None]), state)
        picked = []
        for _ in range(max_chars):
            probs = torch.softmax(model.head(y[:, -1]) / temperature, dim=-1)  # (B, V)
            nxt = torch.multinomial(probs, 1)  # (B, 1)
            picked.append(nxt)
            y, state = model.rnn(model.embed(nxt), state)
        ids = torch.cat(picked, 1).tolist()  # (B, max_chars)
        out += ["".join(itos[j] for j in row) for row in ids]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("prompts", type=Path)
    ap.add_argument("--mode", choices=["naive", "batched"], default="batched")
    ap.add_argument("--max-chars", type=int, default=500)
    ap.add_argument("--limit", type=int, default=None, help="the first N prompts only")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None, help="default: torch's own")
    ap.add_argument("--mkldnn", choices=["on", "off"], default="on")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (batched)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.mkldnn.enabled = args.mkldnn == "on"
    torch.manual_seed(0)
    start = time.perf_counter()
    model, itos = load(args.model)
    stoi = {c: i for i, c in enumerate(itos) if i}
    prompts = args.prompts.read_text(encoding="utf-8").split("\n")[:-1][: args.limit]
    if args.mode == "naive":
        texts = naive(model, stoi, itos, prompts, args.max_chars, args.temperature)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            texts = batched(model, stoi, itos, prompts, args.max_chars, args.temperature,
                            args.batch)
    seconds = time.perf_counter() - start
    chars = sum(len(t) for t in texts)
    print(json.dumps({"mode": args.mode, "mkldnn": args.mkldnn, "threads":
                      torch.get_num_threads(), "prompts": len(prompts), "chars": chars,
                      "seconds": round(seconds, 3), "chars_per_s": round(chars / seconds, 1)}))


if __name__ == "__main__":
    main()
