"""Analytic training cost: FLOPs of forward + backward for one example.

``torch.utils.flop_counter`` counts matmuls and convolutions; the fused CPU
LSTM/GRU kernels are invisible to it, so recurrent layers are added by formula
(forward 2·gates·H(I+H) per time step, backward twice that). The unstructured
part is accounted for layer by layer: each layer's share of the forward FLOPs
is scaled by the kept fraction of its own weights (a conv weight is used at
every output position, a linear weight once, so one global density would
misstate the saving). Pruned weights save those multiply-adds in principle;
dense CPU kernels do not realise that saving, which the benchmarks show.

Counting runs the model in eval mode on a batch of two (a batch of one breaks
BatchNorm layers that see one value per channel in train mode) and divides.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from logging import WARNING
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

_GATES = {nn.LSTM: 4, nn.GRU: 3}
COUNTED_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)


def _rnn_forward_flops(module: nn.RNNBase, inputs: tuple) -> int:
    steps = inputs[0].shape[1] if module.batch_first else inputs[0].shape[0]
    batch = inputs[0].shape[0] if module.batch_first else inputs[0].shape[1]
    gates = _GATES.get(type(module), 1)
    return 2 * gates * module.hidden_size * (module.input_size + module.hidden_size) * steps * batch


def _batch_of_two(example_input: torch.Tensor) -> torch.Tensor:
    x = example_input[:2]
    return torch.cat([x, x]) if len(x) == 1 else x


def _count(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, int], int, int]:
    """(forward FLOPs by layer, counted total, FLOPs of recurrent layers the counter could not see)."""
    root = type(model).__name__
    formula: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda mod, inp, _out: formula.__setitem__(names[mod], _rnn_forward_flops(mod, inp)))
             for m in model.modules() if isinstance(m, tuple(_GATES))]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    counts = counter.get_flop_counts()
    per_layer = {}
    for name, module in model.named_modules():
        if isinstance(module, (*COUNTED_TYPES, *_GATES)):
            per_layer[name] = int(sum(counts.get(f"{root}.{name}", {}).values()))
    for name, module in model.named_modules():  # a counted layer inside another: count it once
        if isinstance(module, nn.MultiheadAttention):
            per_layer[name] -= sum(per_layer.get(f"{name}.{c}", 0) for c, _ in module.named_children())
    # a fused recurrent kernel is invisible to the counter (LSTM on CPU); an unrolled one is not (GRU)
    invisible = {n: f for n, f in formula.items() if per_layer.get(n, 0) == 0}
    per_layer.update(invisible)
    return per_layer, int(counter.get_total_flops()) + sum(invisible.values()), sum(invisible.values())


def forward_flops_by_layer(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, int], int]:
    """Forward FLOPs of ``x`` (the whole batch) by layer name, and of the whole model.

    Layers: Conv/Linear, ``nn.MultiheadAttention`` (its own projections and attention, without the
    ``out_proj`` child counted under its own name) and LSTM/GRU."""
    per_layer, total, _ = _count(model, x)
    return per_layer, total


def training_flops_per_example(model: nn.Module, example_input: torch.Tensor,
                               weight_masks: Mapping[str, torch.Tensor] | None = None) -> int:
    """FLOPs of one forward + backward pass for a single example.

    With ``weight_masks`` (keep-masks of the model's prunable weights), each
    layer's FLOPs count only its kept weights. The model is not modified.
    """
    model = copy.deepcopy(model).eval()
    x = _batch_of_two(example_input)
    per_layer, forward_total, rnn_forward = _count(model, x)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        (out if isinstance(out, torch.Tensor) else out[0]).float().sum().backward()
    total = (int(counter.get_total_flops()) + 3 * rnn_forward) / len(x)
    if not weight_masks or forward_total == 0:
        return int(round(total))
    kept, size = {}, {}
    for name, mask in weight_masks.items():
        layer = name.rsplit(".", 1)[0]
        kept[layer] = kept.get(layer, 0) + int(mask.sum())
        size[layer] = size.get(layer, 0) + mask.numel()
    saved = sum(per_layer.get(layer, 0) * (1 - kept[layer] / size[layer]) for layer in kept)
    return int(round(total * (1 - saved / forward_total)))


def training_flops_or_none(model: nn.Module, example_input: torch.Tensor,
                           weight_masks: Mapping[str, torch.Tensor] | None = None) -> int | None:
    """:func:`training_flops_per_example`, or ``None`` with a warning when the model cannot be counted:
    cost accounting must never stop a run."""
    try:
        return training_flops_per_example(model, example_input, weight_masks)
    except Exception as exc:  # noqa: BLE001 - any model error: the run goes on without a FLOP count
        from flwr.common.logger import log

        log(WARNING, "FLOPs cannot be counted for this model (%s: %s); train_flops is recorded as null",
            type(exc).__name__, exc)
        return None


class FlopsByMask:
    """Training FLOPs per example of the compact model at each mask version, counted once per version
    (``None``, logged once, when the model cannot be counted)."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor) -> None:
        self.model = model
        self.example_input = example_input
        self._by_version: dict[int, int | None] = {}

    def at(self, version: int, layout: Any) -> int | None:
        """FLOPs per example under mask ``version`` (``layout``: its :class:`~.geometry.Layout`)."""
        if version not in self._by_version:
            from .compact import compact_model

            self._by_version[version] = training_flops_or_none(
                compact_model(self.model, layout.kept), self.example_input, layout.compact_masks)
        return self._by_version[version]
