"""Keeping pruned weights at exactly zero while a client trains.

Two guards: a gradient hook zeroes the gradient at pruned coordinates (so
Adam/momentum state never accumulates there), and an optimizer post-step hook
multiplies the weights by the mask after every step (so weight decay or any
optimizer quirk cannot revive them). The post-step hook is registered for all
optimizers while the context is active, so any user training loop works
unchanged inside ``with enforce_mask(...)``; it acts only after steps of
optimizers that hold a parameter of the wrapped model, so other models
training in the same process (other virtual clients, a teacher) are untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook


def _resolve(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, keep-mask) pairs; any name of a shared (tied) parameter works, and masks given
    for two names of one parameter are combined (a weight pruned under either name stays pruned)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = set(masks) - set(params)
    if unknown:
        raise KeyError(f"masks must name parameters of the model; not parameters: {sorted(unknown)}")
    combined: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for name, m in masks.items():
        p = params[name]
        if p.shape != m.shape:
            raise ValueError(f"mask shape {tuple(m.shape)} does not match parameter {name} {tuple(p.shape)}")
        m = m.to(device=p.device, dtype=p.dtype)
        if id(p) in combined:
            m = m * combined[id(p)][1]
        combined[id(p)] = (p, m)
    return list(combined.values())


@contextmanager
def enforce_mask(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, pruned coordinates of ``model`` stay exactly zero."""
    pairs = _resolve(model, masks)
    ours = {id(p) for p in model.parameters()}

    def reapply() -> None:
        with torch.no_grad():
            for p, m in pairs:
                p.mul_(m)

    def after_step(optimizer: torch.optim.Optimizer, *_args, **_kwargs) -> None:
        if any(id(p) in ours for group in optimizer.param_groups for p in group["params"]):
            reapply()

    handles = [p.register_hook(lambda g, m=m: g * m) for p, m in pairs]
    handles.append(register_optimizer_step_post_hook(after_step))
    reapply()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        reapply()
