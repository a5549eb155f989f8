"""Which tensors can be pruned, and which slices of which tensors form one unit.

A *unit* is a Conv2d output filter, a Linear output neuron or an LSTM hidden
unit. Removing it must also remove its bias, its BatchNorm channel, the
matching input slice of every consumer layer (through flattens), and, across a
residual addition, every channel added to it. Torch-Pruning's dependency graph
finds these couplings by tracing; we turn each of its groups into a plain,
picklable :class:`UnitGroup` that lists ``(tensor, dim)`` slices, so that the
mask, codec and surgery code works on state dicts alone and never needs the
graph again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.LSTM)


class UnsupportedModelError(ValueError):
    """The model contains a layer whose units we cannot slice consistently."""


@dataclass(frozen=True)
class Member:
    """One tensor dimension that a group's units index into.

    The dimension holds ``chunks`` consecutive blocks (the four LSTM gates), each
    made of ``size * block`` entries where unit ``u`` owns entries
    ``[u * block, (u + 1) * block)`` (``block > 1`` after a flatten).
    ``fan_in`` marks the unit's own incoming weights, which score the unit.
    """

    tensor: str
    dim: int
    chunks: int = 1
    block: int = 1
    fan_in: bool = False


@dataclass(frozen=True)
class UnitGroup:
    """Units removed together: ``size`` units, each a slice of every member."""

    name: str
    size: int
    members: tuple[Member, ...]

    def entries(self, member: Member, units: torch.Tensor) -> torch.Tensor:
        """Positions along ``member.dim`` owned by ``units`` (a 1-D long tensor)."""
        per_chunk = self.size * member.block
        offsets = torch.arange(member.block)
        within = (units[:, None] * member.block + offsets[None, :]).reshape(-1)
        chunks = torch.arange(member.chunks) * per_chunk
        return (chunks[:, None] + within[None, :]).reshape(-1)


@dataclass(frozen=True)
class ModelStructure:
    """Everything the pruning code needs to know about one architecture.

    ``shapes`` covers every floating-point state-dict entry (parameters and
    buffers); ``prunable`` names the weights pruned element by element.
    """

    groups: tuple[UnitGroup, ...]
    prunable: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]

    @property
    def num_prunable(self) -> int:
        return sum(_numel(self.shapes[name]) for name in self.prunable)

    def group(self, name: str) -> UnitGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _layer_members(
    prefix: str, module: nn.Module, out: bool, block: int
) -> list[Member]:
    """The tensor slices that one layer contributes to a group."""
    p = f"{prefix}." if prefix else ""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise UnsupportedModelError(f"grouped convolution {prefix!r} is not supported")
        if not out:
            return [Member(p + "weight", 1, block=block)]
        members = [Member(p + "weight", 0, fan_in=True)]
        if module.bias is not None:
            members.append(Member(p + "bias", 0))
        return members
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not out:
            return []
        names = [n for n in ("weight", "bias", "running_mean", "running_var")
                 if getattr(module, n, None) is not None]
        return [Member(p + n, 0) for n in names]
    if isinstance(module, nn.LSTM):
        if module.num_layers != 1 or module.bidirectional or module.proj_size:
            raise UnsupportedModelError(
                f"LSTM {prefix!r}: use one single-layer, unidirectional nn.LSTM per layer"
            )
        if not out:
            return [Member(p + "weight_ih_l0", 1, block=block)]
        members = [
            Member(p + "weight_ih_l0", 0, chunks=4, fan_in=True),
            Member(p + "weight_hh_l0", 0, chunks=4, fan_in=True),
            Member(p + "weight_hh_l0", 1),
        ]
        if module.bias:
            members += [Member(p + "bias_ih_l0", 0, chunks=4), Member(p + "bias_hh_l0", 0, chunks=4)]
        return members
    if any(True for _ in module.parameters(recurse=False)):
        raise UnsupportedModelError(
            f"layer {prefix!r} ({type(module).__name__}) is coupled to prunable units "
            "but cannot be sliced"
        )
    return []


def prunable_weights(model: nn.Module) -> tuple[str, ...]:
    """Weights of Conv2d, Linear and LSTM layers: the element-wise prunable tensors."""
    names = []
    for prefix, module in model.named_modules():
        p = f"{prefix}." if prefix else ""
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            names.append(p + "weight")
        elif isinstance(module, nn.LSTM):
            names += [p + n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight")]
    return tuple(names)


def discover_structure(
    model: nn.Module,
    example_inputs: torch.Tensor,
    ignored_layers: tuple[str, ...] = (),
) -> ModelStructure:
    """Trace ``model`` once and describe its prunable tensors and unit groups.

    Units whose outputs no layer consumes (the classifier's outputs) are never
    removed, nor are the units of ``ignored_layers`` (module names). Groups that
    touch a layer we cannot slice are left out, which keeps those units intact.
    """
    import torch_pruning as tp  # heavy import, only needed here

    names = {module: name for name, module in model.named_modules()}
    ignored = [model.get_submodule(n) for n in ignored_layers]
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    groups: list[UnitGroup] = []
    for tp_group in graph.get_all_groups(root_module_types=list(LAYER_TYPES), ignored_layers=ignored):
        root_size = len(tp_group[0][1])
        members: list[Member] = []
        has_consumer = False
        try:
            for dep, idxs in tp_group:
                module = dep.target.module
                if module not in names:
                    continue  # traced operation (relu, pool, reshape): no tensors
                out = graph.is_out_channel_pruning_fn(dep.handler)
                block = len(idxs) // root_size
                if not out:
                    has_consumer = True
                    _check_unit_major(idxs, root_size, block, names[module])
                members += _layer_members(names[module], module, out, block)
        except UnsupportedModelError:
            continue
        if not has_consumer or any(m in ignored for m in _group_layers(tp_group, names)):
            continue
        unique = tuple(dict.fromkeys(members))
        root_name = unique[0].tensor.rsplit(".", 1)[0]
        groups.append(UnitGroup(root_name, root_size, unique))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}
    return ModelStructure(tuple(sorted(groups, key=lambda g: g.name)), prunable_weights(model), shapes)


def _group_layers(tp_group, names: dict) -> list[nn.Module]:
    return [dep.target.module for dep, _ in tp_group
            if dep.target.module in names and isinstance(dep.target.module, LAYER_TYPES)]


def _check_unit_major(idxs, size: int, block: int, where: str) -> None:
    """Our :class:`Member` layout assumes unit ``u`` owns a contiguous block."""
    if [int(i) for i in idxs] != list(range(size * block)):
        raise UnsupportedModelError(f"unexpected index layout at {where!r}")


def kept_entries(
    structure: ModelStructure, units: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor | None, ...]]:
    """Per tensor and dimension, the kept positions (``None``: the whole dimension).

    ``units`` maps group name to a bool keep-vector; missing groups keep all.
    Only tensors with at least one narrowed dimension appear in the result.
    """
    kept: dict[str, list[torch.Tensor | None]] = {}
    for group in structure.groups:
        keep = units.get(group.name)
        if keep is None or bool(keep.all()):
            continue
        removed = torch.nonzero(~keep).flatten()
        for member in group.members:
            shape = structure.shapes[member.tensor]
            dims = kept.setdefault(member.tensor, [None] * len(shape))
            current = dims[member.dim]
            alive = torch.ones(shape[member.dim], dtype=torch.bool)
            if current is not None:
                alive[:] = False
                alive[current] = True
            alive[group.entries(member, removed)] = False
            dims[member.dim] = torch.nonzero(alive).flatten()
    return {name: tuple(dims) for name, dims in kept.items()}


def select(tensor: torch.Tensor, dims: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
    """Cut the kept rows/columns out of a global-layout tensor."""
    for d, idx in enumerate(dims):
        if idx is not None:
            tensor = tensor.index_select(d, idx)
    return tensor


def scatter(compact: torch.Tensor, dims: tuple[torch.Tensor | None, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """Place a compact tensor back into a zero global-layout tensor (inverse of :func:`select`)."""
    out = torch.zeros(shape, dtype=compact.dtype)
    index = tuple(
        (torch.arange(s) if idx is None else idx).reshape([-1 if j == d else 1 for j in range(len(shape))])
        for d, (idx, s) in enumerate(zip(dims, shape))
    )
    out[index] = compact
    return out


def structure_to_json(structure: ModelStructure) -> str:
    """A compact JSON form, so that clients need no tracing (nor Torch-Pruning)."""
    import json

    return json.dumps({
        "groups": [[g.name, g.size, [[m.tensor, m.dim, m.chunks, m.block, m.fan_in] for m in g.members]]
                   for g in structure.groups],
        "prunable": list(structure.prunable),
        "shapes": {k: list(v) for k, v in structure.shapes.items()},
    }, separators=(",", ":"))


def structure_from_json(text: str) -> ModelStructure:
    """Inverse of :func:`structure_to_json`; raises ``ValueError`` on malformed input."""
    import json

    try:
        raw = json.loads(text)
        groups = tuple(
            UnitGroup(str(name), int(size), tuple(Member(str(t), int(d), int(c), int(b), bool(f)) for t, d, c, b, f in members))
            for name, size, members in raw["groups"]
        )
        shapes = {str(k): tuple(int(s) for s in v) for k, v in raw["shapes"].items()}
        structure = ModelStructure(groups, tuple(str(p) for p in raw["prunable"]), shapes)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed model structure: {exc}") from None
    for group in structure.groups:
        for m in group.members:
            shape = shapes.get(m.tensor, ())
            if not 0 <= m.dim < len(shape) or shape[m.dim] != m.chunks * group.size * m.block:
                raise ValueError(f"malformed model structure: member {m} does not fit {group.name!r}")
    return structure
