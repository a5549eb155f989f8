"""Model, data and loops of the plug-in test app (nothing here knows about AutoFLIP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_FEATURES = 12
NUM_CLASSES = 4
TEST_EXAMPLES = 800
CENTER_SEED = 20_240_601  # the class centres are the same for every client and every run


class BlobMLP(nn.Module):
    """Three linear layers; both hidden layers are prunable unit groups."""

    def __init__(self, hidden: tuple[int, int] = (40, 24)) -> None:
        super().__init__()
        self.inp = nn.Linear(NUM_FEATURES, hidden[0])
        self.mid = nn.Linear(hidden[0], hidden[1])
        self.out = nn.Linear(hidden[1], NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.mid(F.relu(self.inp(x)))))


def make_blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples from four Gaussian blobs (unit noise around well separated centres)."""
    centres = 1.5 * torch.randn(NUM_CLASSES, NUM_FEATURES, generator=torch.Generator().manual_seed(CENTER_SEED))
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    x = centres[y] + torch.randn(n, NUM_FEATURES, generator=gen)
    return x, y


def client_data(partition_id: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return make_blobs(n, 1_000 * seed + 1 + partition_id)


def test_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return make_blobs(TEST_EXAMPLES, 1_000 * seed)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
          batch_size: int = 20) -> float:
    """Plain SGD with momentum; returns the mean loss of the last epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    mean = float("nan")
    for _ in range(epochs):
        total, order = 0.0, torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        mean = total / len(x)
    return mean


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())
