"""Models users bring, shaped like the issue's model zoo: torchvision, text, audio, tied weights, odd forwards.

Each entry builds ``(model, example_input, num_classes)``; labels are class ids for every model
(the language model predicts the next token of the sequence's last position).
Nothing here knows about pruning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class TransformerClassifier(nn.Module):
    """Token embedding, a 2-layer Transformer encoder (MHA + feed-forward, LayerNorm), mean-pooled head."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, ff: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embedding(x)).mean(1))


class GRUTextClassifier(nn.Module):
    """Embedding, a Linear projection, a GRU, and a two-layer head on the last hidden state."""

    def __init__(self, vocab: int = 50, dim: int = 16, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(torch.relu(self.proj(self.embedding(x))))
        return self.fc2(torch.relu(self.fc1(h[:, -1])))


class AudioConv1d(nn.Module):
    """Raw-waveform classifier: Conv1d + BatchNorm1d blocks, global pooling, Linear."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(1, 16, 9, stride=2, padding=4), nn.BatchNorm1d(16)
        self.conv2, self.bn2 = nn.Conv1d(16, 32, 5, stride=2, padding=2), nn.BatchNorm1d(32)
        self.conv3, self.bn3 = nn.Conv1d(32, 32, 3, padding=1), nn.BatchNorm1d(32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(-1))


class TiedLM(nn.Module):
    """Next-token language model whose output layer shares the embedding matrix (weight tying)."""

    def __init__(self, vocab: int = 40, dim: int = 24) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.hidden = nn.Linear(dim, dim)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embedding(x))
        return self.decoder(torch.tanh(self.hidden(h[:, -1])))


class GroupNormCNN(nn.Module):
    """A CNN normalised by parameter-free GroupNorm: channels are mixed by the group statistics."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16, affine=False)
        self.conv2, self.gn2 = nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(4, 32, affine=False)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.gn1(self.conv1(x))), 2)
        x = F.relu(self.gn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class QuickstartNet(nn.Module):
    """Flower's quickstart-pytorch CNN, forward with its fixed ``view(-1, 16 * 5 * 5)``."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def resnet18():
    import torchvision

    return torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32), 10


def mobilenet_v3_small():
    import torchvision

    return torchvision.models.mobilenet_v3_small(num_classes=10), torch.randn(2, 3, 64, 64), 10


ZOO: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, int]]] = {
    "resnet18": resnet18,
    "mobilenet_v3_small": mobilenet_v3_small,
    "transformer": lambda: (TransformerClassifier(), torch.randint(0, 50, (2, 12)), 4),
    "gru_text": lambda: (GRUTextClassifier(), torch.randint(0, 50, (2, 12)), 4),
    "audio_conv1d": lambda: (AudioConv1d(), torch.randn(2, 1, 400), 4),
    "tied_lm": lambda: (TiedLM(), torch.randint(0, 40, (2, 10)), 40),
    "groupnorm_cnn": lambda: (GroupNormCNN(), torch.randn(2, 3, 16, 16), 4),
    "quickstart_cnn": lambda: (QuickstartNet(), torch.randn(2, 3, 32, 32), 10),
}
