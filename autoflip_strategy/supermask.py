"""Client side of HideNseek: train sign scores, never magnitudes, inside any training loop.

:func:`attach_supermask` replaces each prunable weight ``w`` (which arrives as ``|θ₀| · s``, zero
where pruned) by a torch parametrization

    weight = |θ₀| · sign(score) · keep

whose trainable tensor is a real-valued ``score`` (initialised to ``w`` itself, so the model starts
as it arrived). The score is a latent copy of the weight, as in BinaryConnect: the weight's
gradient passes straight through to it, ``∂L/∂score = ∂L/∂weight · keep`` (straight-through
estimator), so the score moves as the weight would under plain training at the user's learning
rate, and a sign flips where plain training would take the weight through zero. Pruned weights get
no gradient, and no optimizer step, weight decay or momentum can change a magnitude, because the
magnitudes are buffers. The user's
``train_fn`` builds its optimizer from ``model.parameters()`` as usual and trains the scores.
:func:`detach_supermask` removes the parametrizations, leaving plain weights ``|θ₀| · sign(score)``,
and returns the kept weights' sign bits (the uplink of :mod:`.signs`).

A shared (tied) weight is parametrized under every name it has; torch keeps the shared
``Parameter`` itself as each parametrization's ``original``, so all names wrap one score tensor.
LSTM/GRU weights are parametrized like any other: the RNN modules read their weights through
``_flat_weights``, which torch refreshes before each forward in recent versions; for older ones a
forward pre-hook refreshes it (checked by the tests).
Scores do not persist across rounds: each round they restart from ``±|θ₀|`` under the global signs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from .structure import RNN_TYPES

_HOOK = "_autoflip_supermask_refresh"


class _SignedMagnitude(torch.autograd.Function):
    """``|θ₀| · keep · sign(score)`` forward (``sign(0) = +1``); backward ``∂L/∂score = ∂L/∂weight · keep``."""

    @staticmethod
    def forward(ctx, score: torch.Tensor, magnitude: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(keep)
        return magnitude * keep * torch.where(score >= 0, 1.0, -1.0).to(score.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad * keep, None, None


class SignSupermask(nn.Module):
    """The parametrization ``score ↦ |θ₀| · sign(score) · keep``; ``|θ₀|`` and ``keep`` are buffers."""

    def __init__(self, magnitude: torch.Tensor, keep: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("magnitude", magnitude.detach().abs().clone())
        self.register_buffer("keep", keep.detach().to(magnitude.dtype).clone())

    def forward(self, score: torch.Tensor) -> torch.Tensor:
        return _SignedMagnitude.apply(score, self.magnitude, self.keep)


def _owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every parameter name (tied names included) -> (module, attribute)."""
    out = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, _ in module.named_parameters(recurse=False, remove_duplicate=False):
            out[f"{prefix}.{attr}" if prefix else attr] = (module, attr)
    return out


def attach_supermask(model: nn.Module, keep: Mapping[str, torch.Tensor]) -> None:
    """Parametrize the weights named in ``keep`` (keep-masks of their current shapes) as sign supermasks."""
    owners = _owners(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = set(keep) - set(params)
    if unknown:
        raise KeyError(f"keep must name parameters of the model; not parameters: {sorted(unknown)}")
    targets = {id(params[n]): n for n in keep}
    for name, (module, attr) in owners.items():
        param = params[name]
        if id(param) not in targets or parametrize.is_parametrized(module, attr):
            continue
        mask = keep[targets[id(param)]]
        if mask.shape != param.shape:
            raise ValueError(f"keep-mask shape {tuple(mask.shape)} does not match {name} {tuple(param.shape)}")
        with torch.no_grad():
            param.mul_(mask.to(param.dtype))  # pruned coordinates are zero before the score is taken
        parametrize.register_parametrization(module, attr, SignSupermask(param, mask.to(param.device)), unsafe=True)
        if isinstance(module, RNN_TYPES) and not hasattr(module, "_update_flat_weights") \
                and not hasattr(module, _HOOK):
            setattr(module, _HOOK, module.register_forward_pre_hook(lambda m, _args: m._init_flat_weights()))


def detach_supermask(model: nn.Module) -> dict[str, torch.Tensor]:
    """Remove every sign supermask, leaving ``|θ₀| · sign(score) · keep`` as plain weights.

    Returns, per parametrized name (tied names once, under the first), the bool sign bits of the
    kept coordinates in keep-mask order (True = +1)."""
    bits: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, module in list(model.named_modules(remove_duplicate=False)):
        if not parametrize.is_parametrized(module):
            continue
        for attr in list(module.parametrizations.keys()):
            plist = module.parametrizations[attr]
            if not isinstance(plist[0], SignSupermask):
                continue
            score, keep = plist.original, plist[0].keep.bool()
            if id(score) not in seen:
                seen.add(id(score))
                bits[f"{prefix}.{attr}" if prefix else attr] = (score.detach()[keep] >= 0).cpu()
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
        if hasattr(module, _HOOK):
            getattr(module, _HOOK).remove()
            delattr(module, _HOOK)
            module._init_flat_weights()
    return bits


@contextmanager
def sign_training(model: nn.Module, keep: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, ``model`` trains sign scores only (:func:`attach_supermask`); on exit the
    weights are plain ``|θ₀| · sign(score) · keep`` again (:func:`detach_supermask`)."""
    attach_supermask(model, keep)
    try:
        yield
    finally:
        detach_supermask(model)
