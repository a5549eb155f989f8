"""Model intake: prune the user's model correctly, or say what is left whole and why.

Tracing (:func:`.structure.trace_structure`) proposes unit groups from the
model's graph, but a graph cannot see everything a forward does: a hard-coded
``x.view(-1, 16 * 5 * 5)``, a mean over channels, a norm written by hand.
So the intake checks every proposed group *numerically, once, on the server*:
it removes a random half of the group's units (plus random single weights)
and compares the physically smaller model with the dense model whose removed
coordinates are zero, in eval mode on ``example_input``. A group whose
compact model computes anything else, or cannot run at all, is demoted: its
weights are still pruned element by element, its units are not removed. The
checks are cumulative (each group is checked together with the groups already
accepted), so couplings between groups are covered too.

The report says, per layer, what is pruned structurally, element-wise, or not
at all, plus the prunable share of parameters and forward FLOPs; the strategy
logs it and the reference app writes it into ``results.json``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import Any

import torch
from torch import nn

from .geometry import kept_entries, tensor_masks
from .masks import HybridMask
from .structure import ModelStructure, UnitGroup, UnsupportedModelError, trace_structure

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
ABS_TOLERANCE = 1e-5  # max |compact - masked| allowed, scaled by max(1, output magnitude)
CHECK_DENSITY = 0.7  # share of single weights kept by the random check mask


@dataclass(frozen=True)
class IntakeReport:
    """What the intake decided for each layer of the model."""

    structured: dict[str, int]  # unit group -> units (removable and checked)
    demoted: dict[str, str]  # unit group -> why its units stay whole (its weights are still pruned)
    left_whole: dict[str, str]  # module with parameters that are never pruned -> why
    elementwise: tuple[str, ...]  # tensors pruned weight by weight
    tied: dict[str, str]  # alias -> canonical name of shared tensors
    prunable_param_share: float
    prunable_flop_share: float | None  # None: the model's FLOPs could not be counted

    def to_json(self) -> dict[str, Any]:
        return {"structured": self.structured, "demoted": self.demoted, "left_whole": self.left_whole,
                "elementwise": list(self.elementwise), "tied": self.tied,
                "prunable_param_share": self.prunable_param_share,
                "prunable_flop_share": self.prunable_flop_share}

    def lines(self) -> list[str]:
        """Human-readable summary, one finding per line (what the strategy logs)."""
        flops = "n/a" if self.prunable_flop_share is None else f"{self.prunable_flop_share:.1%}"
        out = [f"Intake: {len(self.elementwise)} tensors prunable element-wise "
               f"({self.prunable_param_share:.1%} of parameters, {flops} of forward FLOPs); "
               f"{len(self.structured)} unit groups removable"]
        out += [f"Intake: units of {g!r} stay whole ({why}); its weights are pruned element-wise"
                for g, why in self.demoted.items()]
        out += [f"Intake: {m!r} is not pruned ({why})" for m, why in self.left_whole.items()]
        out += [f"Intake: {a!r} is tied to {c!r}: one tensor, one mask" for a, c in self.tied.items()]
        return out


@dataclass(frozen=True)
class Intake:
    structure: ModelStructure
    report: IntakeReport = field(repr=False)


def intake_model(model: nn.Module, example_input: torch.Tensor, ignored_layers: tuple[str, ...] = (),
                 strict: bool = False, seed: int = 0) -> Intake:
    """Trace ``model``, check every unit group numerically, and report what is pruned how.

    With ``strict`` any group that cannot be removed exactly raises
    :class:`UnsupportedModelError` naming it, instead of being demoted.
    """
    traced, demoted = trace_structure(model, example_input, ignored_layers)
    gen = torch.Generator().manual_seed(seed)
    accepted: list[UnitGroup] = []
    for group in traced.groups:
        reason = compact_mismatch(model, example_input, replace(traced, groups=(*accepted, group)), gen)
        if reason is None:
            accepted.append(group)
        else:
            demoted[group.name] = reason
    if strict and demoted:
        raise UnsupportedModelError("units that cannot be removed exactly: " +
                                    "; ".join(f"{g!r}: {why}" for g, why in sorted(demoted.items())))
    structure = replace(traced, groups=tuple(accepted))
    report = IntakeReport(
        structured={g.name: g.size for g in accepted},
        demoted=dict(sorted(demoted.items())),
        left_whole=_left_whole(model, structure),
        elementwise=structure.prunable,
        tied=dict(structure.aliases),
        prunable_param_share=structure.num_prunable / max(_num_parameters(model), 1),
        prunable_flop_share=_prunable_flop_share(model, example_input, structure),
    )
    return Intake(structure, report)


def log_report(report: IntakeReport) -> None:
    """Log the report through Flower's logger: demoted unit groups as warnings, the rest as info."""
    from flwr.common.logger import log

    lines = report.lines()
    log(INFO, lines[0])
    for line in lines[1:]:
        log(WARNING if "stay whole" in line else INFO, line)


def random_unit_mask(structure: ModelStructure, gen: torch.Generator, density: float = CHECK_DENSITY) -> HybridMask:
    """Remove a random half of every group's units (at least one kept, one removed) and random single weights."""
    units = {}
    for g in structure.groups:
        order = torch.randperm(g.size, generator=gen)
        keep = torch.ones(g.size, dtype=torch.bool)
        keep[order[:max(min(g.size // 2, g.size - 1), 0)]] = False
        units[g.name] = keep
    weights = {n: torch.rand(structure.shapes[n], generator=gen) < density for n in structure.prunable}
    return HybridMask(units, weights)


def masked_copy(model: nn.Module, structure: ModelStructure, mask: HybridMask) -> nn.Module:
    """A copy of ``model`` whose pruned coordinates (single weights and whole units) are zero."""
    masked = copy.deepcopy(model)
    state = masked.state_dict()
    with torch.no_grad():
        for name, keep in tensor_masks(mask, structure).items():
            state[name].mul_(keep.to(state[name].dtype))
    return masked


def compact_mismatch(model: nn.Module, example_input: torch.Tensor, structure: ModelStructure,
                     gen: torch.Generator) -> str | None:
    """``None`` when the compact model equals the masked model for a random mask; else why not."""
    from .compact import compact_model

    mask = random_unit_mask(structure, gen)
    masked = masked_copy(model, structure, mask).eval()
    try:
        compact = compact_model(masked, kept_entries(structure, mask.units)).eval()
    except Exception as exc:  # noqa: BLE001 - any surgery failure demotes the group
        return f"surgery fails: {type(exc).__name__}: {exc}"
    with torch.no_grad():
        reference = _tensors(masked(example_input))
        try:
            output = _tensors(compact(example_input))
        except Exception as exc:  # noqa: BLE001 - e.g. a hard-coded view of the dense width
            return f"the smaller model cannot run its forward: {type(exc).__name__}: {_first_line(exc)}"
    if [t.shape for t in output] != [t.shape for t in reference]:
        return f"the smaller model's output shapes {[tuple(t.shape) for t in output]} differ"
    diff = max((float((a.double() - b.double()).abs().max()) for a, b in zip(output, reference) if a.numel()),
               default=0.0)
    scale = max((float(t.abs().max()) for t in reference if t.numel()), default=1.0)
    if not math.isfinite(diff) or diff > ABS_TOLERANCE * max(1.0, scale):
        return f"the smaller model computes something else (max abs difference {diff:.2e})"
    return None


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else ""


def _num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared parameters once


def _left_whole(model: nn.Module, structure: ModelStructure) -> dict[str, str]:
    """Modules that own weights of which nothing is pruned, with the reason."""
    pruned_layers = _pruned_layers(structure)
    out = {}
    for name, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False) if n != "bias"]
        if not own or name in pruned_layers:
            continue
        if isinstance(module, NORM_TYPES):
            continue  # per-channel scale/shift: removed with their units, otherwise kept (docs/method.md)
        if isinstance(module, nn.Embedding):
            why = "embedding tables are not pruned"
        else:
            why = f"{type(module).__name__} parameters {own} are not a supported prunable weight"
        out[name or type(model).__name__] = why
    return out


def _pruned_layers(structure: ModelStructure) -> set[str]:
    """Modules whose weight is pruned element-wise (through any name of a tied tensor)."""
    names = set(structure.prunable) | {a for a, c in structure.aliases.items() if c in structure.prunable}
    return {n.rsplit(".", 1)[0] for n in names}


def _prunable_flop_share(model: nn.Module, example_input: torch.Tensor, structure: ModelStructure) -> float | None:
    from .costs import forward_flops_by_layer

    try:
        per_layer, total = forward_flops_by_layer(copy.deepcopy(model).eval(), example_input)
    except Exception:  # noqa: BLE001 - FLOP counting must not stop the intake
        return None
    layers = _pruned_layers(structure)
    return sum(f for n, f in per_layer.items() if n in layers) / total if total else None


