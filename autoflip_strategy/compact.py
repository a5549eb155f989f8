"""The *how* of structured pruning: physically narrower models.

A removed unit is cut out of every tensor it owns, so the client trains a
model whose Conv/Linear/LSTM/GRU layers really are smaller. ``compact_model``
does the surgery on a copy of the global architecture; the geometry's
:class:`~.geometry.Layout` moves state dicts between the two layouts.
"""

from __future__ import annotations

import copy
import torch
from torch import nn

from .geometry import select
from .structure import is_depthwise

Kept = dict[str, tuple[torch.Tensor | None, ...]]


def _sync_layer_attributes(module: nn.Module, depthwise: bool) -> None:
    """Make a layer's size attributes agree with its (sliced) tensors."""
    if isinstance(module, nn.modules.conv._ConvNd):
        out_channels, per_group = module.weight.shape[:2]
        module.out_channels = out_channels
        if depthwise:  # one filter per channel: the channel count is the group count
            module.in_channels = module.groups = out_channels
        else:
            module.in_channels = per_group * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        ref = module.weight if module.weight is not None else module.running_mean
        module.num_features = ref.shape[0]
    elif isinstance(module, nn.GroupNorm):  # one channel per group (the only kind we slice)
        module.num_channels = module.num_groups = module.weight.shape[0]
    elif isinstance(module, (nn.LSTM, nn.GRU)):
        module.hidden_size = module.weight_hh_l0.shape[1]
        module.input_size = module.weight_ih_l0.shape[1]


def compact_model(model: nn.Module, kept: Kept) -> nn.Module:
    """A deep copy of ``model`` with every removed unit physically cut out.

    Tied tensors are never in ``kept`` (intake leaves their units whole), and the
    deep copy keeps them tied."""
    compact = copy.deepcopy(model)
    touched: dict[nn.Module, bool] = {}
    for name, dims in kept.items():
        module_name, attr = name.rsplit(".", 1)
        module = compact.get_submodule(module_name)
        touched.setdefault(module, is_depthwise(module))
        old = getattr(module, attr)
        new = select(old.detach(), dims).clone()
        if isinstance(old, nn.Parameter):
            setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module._buffers[attr] = new
    for module, depthwise in touched.items():
        _sync_layer_attributes(module, depthwise)
    return compact
