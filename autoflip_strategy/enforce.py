"""Keeping pruned weights at exactly zero while a client trains.

Two guards: a gradient hook zeroes the gradient at pruned coordinates (so
Adam/momentum state never accumulates there), and a global optimizer
post-step hook multiplies the weights by the mask after every step (so
weight decay or any optimizer quirk cannot revive them). Because the second
hook is registered for all optimizers while the context is active, any
user training loop works unchanged inside ``with enforce_mask(...)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook


@contextmanager
def enforce_mask(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, pruned coordinates of ``model`` stay exactly zero."""
    params = dict(model.named_parameters())
    unknown = set(masks) - set(params)
    if unknown:
        raise KeyError(f"masks must name parameters of the model; not parameters: {sorted(unknown)}")
    pairs = [(params[n], m.to(device=params[n].device, dtype=params[n].dtype)) for n, m in masks.items()]
    for p, m in pairs:
        if p.shape != m.shape:
            raise ValueError(f"mask shape {tuple(m.shape)} does not match parameter {tuple(p.shape)}")

    def reapply(*_args, **_kwargs) -> None:
        with torch.no_grad():
            for p, m in pairs:
                p.mul_(m)

    handles = [p.register_hook(lambda g, m=m: g * m) for p, m in pairs]
    handles.append(register_optimizer_step_post_hook(reapply))
    reapply()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        reapply()
