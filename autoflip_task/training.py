"""Plain PyTorch loops used by the reference ClientApp and the server's central evaluation.

Nothing here knows about pruning: the client helper wraps ``train_epochs``
in ``enforce_mask``, which is exactly what a plug-in user's own loop gets.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when PyTorch sees a GPU, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda, but PyTorch sees no GPU here (use device=auto or cpu)")
    return torch.device(name)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int,
                 lr: float, weight_decay: float = 0.0) -> float:
    """Adam over shuffled mini-batches on the model's device; returns the mean loss of the last epoch.

    The shuffle is drawn on the CPU, so a seed gives the same batches on every device."""
    model.train()
    device = model_device(model)
    x, y = x.to(device), y.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    last = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(x))
        total, count = 0.0, 0
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            count += len(idx)
        last = total / max(count, 1)
    return last


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the given examples, on the model's device."""
    model.eval()
    device = model_device(model)
    x, y = x.to(device), y.to(device)
    loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        out = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        loss += float(F.cross_entropy(out, target, reduction="sum"))
        correct += int((out.argmax(1) == target).sum())
    n = max(len(x), 1)
    return loss / n, correct / n
