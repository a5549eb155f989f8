"""Saliency at initialisation: SynFlow-style synaptic flow (server, no data) and SNIP (client, one batch).

SynFlow (Tanaka et al., 2020), as HideNseek uses it on the server: on a float64 copy of the
model with every parameter and float buffer replaced by its absolute value ("linearised"), the
synaptic flow is ``R = Σ f(1)`` (an all-ones input; for token ids, which cannot be all ones, the
example input itself, whose embedding rows are then all positive). A weight's saliency is
``|θ · ∂R/∂θ|``. Pruning is iterative: over ``iterations`` steps the density falls
exponentially, ``d_k = d^(k/iterations)``, re-scoring the masked model each step, which is what
avoids layer collapse. Every step's mask comes from :func:`.masks.compute_hybrid_mask` (sticky:
nothing pruned comes back), so the structured part (removing whole units, by the mean saliency
of their fan-in) uses the same structure/compact machinery as AutoFLIP; the unit density also
falls exponentially, to ``1 - structured_sparsity``.

The model runs in ``eval`` mode (BatchNorm uses its running statistics, made positive like
everything else; dropout is off). Non-linearities other than ReLU (tanh and sigmoid in an LSTM)
make the flow only approximately conserved: it is still positive and data-free, which is what
the method needs.

SNIP (Lee et al., 2019), as the SSFL baseline uses it: each client's ``|g · θ₀|`` from the
gradient ``g`` of its own loss on one batch; the server averages them. Clients only have the
user's ``train_fn``, so :func:`first_gradients` runs it and stops it at its first optimizer
step, reading the gradients that step would have applied.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .masks import HybridMask, compute_hybrid_mask, dense_mask, tensor_masks
from .structure import ModelStructure


def flow_input(example: torch.Tensor) -> torch.Tensor:
    """The input SynFlow feeds: ones of one example's shape (float64), or the token ids themselves."""
    one = example[:1]
    return one.clone() if not one.is_floating_point() else torch.ones_like(one, dtype=torch.float64)


def _linearised(model: nn.Module) -> nn.Module:
    """A float64, eval-mode copy with every parameter and float buffer replaced by its absolute value."""
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            if t.is_floating_point():
                t.abs_()
    return net


def synflow_scores(model: nn.Module, structure: ModelStructure, example: torch.Tensor,
                   mask: HybridMask | None = None) -> dict[str, torch.Tensor]:
    """``|θ · ∂R/∂θ|`` per prunable weight (float64) of the linearised model, masked by ``mask``."""
    net = _linearised(model)
    params = dict(net.named_parameters(remove_duplicate=False))
    if mask is not None:
        with torch.no_grad():
            for name, keep in tensor_masks(mask, structure).items():
                if name in params:
                    params[name].mul_(keep.to(torch.float64))
                else:  # a masked buffer (running statistics of a removed channel)
                    dict(net.named_buffers())[name].mul_(keep.to(torch.float64))
    net.zero_grad(set_to_none=True)
    out = net(flow_input(example))
    flow = (out[0] if isinstance(out, (tuple, list)) else out).sum()
    if not torch.isfinite(flow):
        raise ValueError("the synaptic flow overflowed float64: the model is too deep or its weights too large "
                         "for SynFlow scores")
    flow.backward()
    scores = {}
    for name in structure.prunable:
        p = params[name]
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        scores[name] = (p.detach() * grad).abs()
    return scores


def density_schedule(sparsity: float, iterations: int) -> list[float]:
    """The densities SynFlow prunes through (exponential: the SynFlow paper's schedule): ``d^(k/n)``, k = 1..n."""
    return [(1.0 - sparsity) ** (k / iterations) for k in range(1, iterations + 1)]


def synflow_mask(model: nn.Module, structure: ModelStructure, example: torch.Tensor, sparsity: float,
                 structured_sparsity: float = 0.0, iterations: int = 100,
                 min_output_density: float = 0.0) -> HybridMask:
    """Iterative SynFlow pruning to ``sparsity`` in ``iterations`` exponentially shrinking steps."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    mask = dense_mask(structure)
    steps = zip(density_schedule(sparsity, iterations), density_schedule(structured_sparsity, iterations))
    for density, unit_density in steps:
        step_sparsity, step_structured = 1.0 - density, 1.0 - unit_density
        scores = synflow_scores(model, structure, example, mask)
        mask = compute_hybrid_mask(scores, structure, step_sparsity, step_structured, previous=mask,
                                   min_output_density=min_output_density)
    return mask


def snip_scores(theta: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
                names: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
    """SNIP's connection sensitivity ``|g · θ|`` (float32) per named weight."""
    return {n: (grads[n].detach().float() * theta[n].detach().float()).abs() for n in names}


class _FirstStep(Exception):
    """Raised from the optimizer's pre-step hook: the first batch's gradients are captured."""


def first_gradients(model: nn.Module, run: Callable[[], object]) -> tuple[dict[str, torch.Tensor], int]:
    """The gradients of ``model``'s parameters at the first optimizer step that ``run`` makes, and the
    number of examples they came from (the leading size of the first input ``model`` was called with).

    ``run`` (the user's training loop) is interrupted before that step is applied, so the model is
    left as it was. Optimizers that hold none of ``model``'s parameters are ignored."""
    ours = {id(p) for p in model.parameters()}
    captured: dict[str, torch.Tensor] = {}
    sizes: list[int] = []

    def count(_module: nn.Module, args: tuple) -> None:
        if not sizes and args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
            sizes.append(int(args[0].shape[0]))

    def before_step(optimizer: torch.optim.Optimizer, *_args, **_kwargs) -> None:
        if captured or not any(id(p) in ours for g in optimizer.param_groups for p in g["params"]):
            return None
        for name, p in model.named_parameters(remove_duplicate=False):
            captured[name] = p.grad.detach().cpu().clone() if p.grad is not None else torch.zeros_like(p, device="cpu")
        raise _FirstStep

    handles = [register_optimizer_step_pre_hook(before_step), model.register_forward_pre_hook(count)]
    try:
        run()
    except _FirstStep:
        pass
    finally:
        for h in handles:
            h.remove()
    if not captured:
        raise RuntimeError("the training function made no optimizer step: SNIP scores need the gradients of one "
                           "batch (call optimizer.step() in train_fn)")
    return captured, sizes[0] if sizes else 1
