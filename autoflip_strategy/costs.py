"""Analytic training cost: FLOPs of forward + backward for one example.

``torch.utils.flop_counter`` counts matmuls and convolutions; the fused CPU
LSTM kernel is invisible to it, so LSTM layers are added by formula
(forward 2·4H(I+H) per time step, backward twice that). The unstructured part
is accounted for by scaling with the kept density of the compact model's
prunable weights: it saves the multiply-adds of pruned weights in principle,
even though dense CPU kernels do not realise that saving.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def training_flops_per_example(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one forward + backward pass for a single example (dense weights)."""
    x = example_input[:1]
    lstm_flops = 0

    def count_lstm(module: nn.LSTM, inputs, _output) -> None:
        nonlocal lstm_flops
        steps = inputs[0].shape[1] if module.batch_first else inputs[0].shape[0]
        forward = 2 * 4 * module.hidden_size * (module.input_size + module.hidden_size) * steps
        lstm_flops += 3 * forward

    handles = [m.register_forward_hook(count_lstm) for m in model.modules() if isinstance(m, nn.LSTM)]
    was_training = model.training
    model.train()
    try:
        with FlopCounterMode(display=False) as counter:
            out = model(x)
            out.float().sum().backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return int(counter.get_total_flops()) + lstm_flops


def masked_flops(dense_flops: int, compact_masks: Mapping[str, torch.Tensor]) -> int:
    """Scale the compact model's FLOPs by the kept fraction of its prunable weights."""
    total = sum(m.numel() for m in compact_masks.values())
    kept = sum(int(m.sum()) for m in compact_masks.values())
    return int(round(dense_flops * (kept / total if total else 1.0)))
