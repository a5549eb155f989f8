"""The reference app's models: the paper's CNN, a small ResNet and a character LSTM.

All three are plain ``nn.Module`` s; nothing here knows about pruning. The
pruning library discovers their unit couplings by tracing (see
``autoflip_strategy.structure``), which is why the LSTM is two single-layer
``nn.LSTM`` modules: a stacked ``nn.LSTM`` forces every layer to the same width,
so its layers could not be narrowed independently.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

MODELS = ("cnn", "resnet", "lstm")


class PaperCNN(nn.Module):
    """Two 5x5 conv layers with max-pooling, then two linear layers (FedAvg/AutoFLIP CNN)."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        width: tuple[int, int, int] = (32, 64, 512),
    ) -> None:
        super().__init__()
        c1, c2, hidden = width
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2)
        side = image_size // 4
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; the 1x1 shortcut appears only when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-8-style network: stem, three stages of one basic block, global pool."""

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, planes = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(planes, w, 1 if i == 0 else 2))
            planes = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class CharLSTM(nn.Module):
    """Embedding, two LSTM layers and a linear decoder for next-character prediction."""

    def __init__(self, vocab_size: int = 80, embedding_dim: int = 8, hidden: int = 256) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm1 = nn.LSTM(embedding_dim, hidden, batch_first=True)
        self.lstm2 = nn.LSTM(hidden, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm1(self.embedding(x))
        h, _ = self.lstm2(h)
        return self.fc(h[:, -1])


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a model for one example's shape; ``lstm`` takes ``num_classes`` as vocabulary."""
    if name == "cnn":
        return PaperCNN(input_shape[0], input_shape[-1], num_classes)
    if name == "resnet":
        return SmallResNet(input_shape[0], num_classes)
    if name == "lstm":
        return CharLSTM(num_classes)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def example_input(input_shape: tuple[int, ...], num_classes: int, batch: int = 2) -> torch.Tensor:
    """A batch shaped like the data, for tracing and FLOP counting."""
    if len(input_shape) == 1:  # token ids
        return torch.zeros((batch, *input_shape), dtype=torch.long) % num_classes
    return torch.zeros((batch, *input_shape))
