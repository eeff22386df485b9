"""Plain PyTorch training for the tests' fixtures: a model that has learned something, made
without Ray in seconds."""

import torch


def fit(model, x: torch.Tensor, y: torch.Tensor, passes: int = 2, lr: float = 2e-3,
        batch: int = 64, max_batches: int | None = None) -> float:
    """Adam over shuffled batches of (x, y); returns the last batch's loss. The model is left
    in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(passes):
        for idx in torch.randperm(len(y)).split(batch)[:max_batches]:
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return loss.item()
