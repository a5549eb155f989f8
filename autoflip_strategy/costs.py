"""Analytic training cost: FLOPs of forward + backward for one example.

``torch.utils.flop_counter`` counts matmuls and convolutions; the fused CPU
LSTM kernel is invisible to it, so LSTM layers are added by formula
(forward 2·4H(I+H) per time step, backward twice that). The unstructured part
is accounted for layer by layer: each layer's share of the forward FLOPs is
scaled by the kept fraction of its own weights (a conv weight is used at every
output position, a linear weight once, so one global density would misstate
the saving). Pruned weights save those multiply-adds in principle; dense CPU
kernels do not realise that saving, which the benchmarks show.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _lstm_forward_flops(module: nn.LSTM, inputs: tuple) -> int:
    steps = inputs[0].shape[1] if module.batch_first else inputs[0].shape[0]
    return 2 * 4 * module.hidden_size * (module.input_size + module.hidden_size) * steps


def _forward_flops_by_layer(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, int], int]:
    """Forward FLOPs of each Conv/Linear/LSTM layer (by module name) and of the whole model."""
    root = type(model).__name__
    lstm: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda mod, inp, _out: lstm.__setitem__(names[mod], _lstm_forward_flops(mod, inp)))
             for m in model.modules() if isinstance(m, nn.LSTM)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    per_layer = dict(lstm)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            counts = counter.get_flop_counts().get(f"{root}.{name}", {})
            per_layer[name] = int(sum(counts.values()))
    return per_layer, int(counter.get_total_flops()) + sum(lstm.values())


def training_flops_per_example(model: nn.Module, example_input: torch.Tensor,
                               weight_masks: Mapping[str, torch.Tensor] | None = None) -> int:
    """FLOPs of one forward + backward pass for a single example.

    With ``weight_masks`` (keep-masks of the model's prunable weights), each
    layer's FLOPs count only its kept weights. The model is not modified.
    """
    model = copy.deepcopy(model).train()
    x = example_input[:1]
    per_layer, forward_total = _forward_flops_by_layer(model, x)
    lstm_forward = sum(f for n, f in per_layer.items() if isinstance(model.get_submodule(n), nn.LSTM))
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    total = int(counter.get_total_flops()) + 3 * lstm_forward
    if not weight_masks or forward_total == 0:
        return total
    kept, size = {}, {}
    for name, mask in weight_masks.items():
        layer = name.rsplit(".", 1)[0]
        kept[layer] = kept.get(layer, 0) + int(mask.sum())
        size[layer] = size.get(layer, 0) + mask.numel()
    saved = sum(per_layer.get(layer, 0) * (1 - kept[layer] / size[layer]) for layer in kept)
    return int(round(total * (1 - saved / forward_total)))
