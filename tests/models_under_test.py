"""The three reference models with small example inputs, shared by the structure/mask tests."""

import torch

from autoflip_task.models import CharLSTM, PaperCNN, SmallResNet


def cnn():
    return PaperCNN(1, 8, 10), torch.randn(4, 1, 8, 8)


def resnet():
    return SmallResNet(3, 10), torch.randn(4, 3, 16, 16)


def lstm():
    return CharLSTM(30, hidden=32), torch.randint(0, 30, (4, 12))


ALL = {"cnn": cnn, "resnet": resnet, "lstm": lstm}
