"""Which tensors can be pruned, and which slices of which tensors form one unit.

A *unit* is a Conv1d/Conv2d output filter, a Linear output neuron or an
LSTM/GRU hidden unit. Removing it must also remove its bias, its BatchNorm
channel, the matching input slice of every consumer layer (through flattens),
across a residual addition every channel added to it, and through a depthwise
convolution that channel's filter. Torch-Pruning's dependency graph finds these
couplings by tracing; we turn each of its groups into a plain, picklable
:class:`UnitGroup` that lists ``(tensor, dim)`` slices, so that the mask, codec
and surgery code works on state dicts alone and never needs the graph again.

Tracing only proposes groups. A group that touches something we cannot slice
exactly (a grouped convolution, a norm whose statistics mix channels, a tied
weight, a layout we do not model) is left out *with a reason*;
:mod:`.intake` then checks the survivors numerically on the real model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d)
RNN_TYPES = (nn.LSTM, nn.GRU)
LAYER_TYPES = (*CONV_TYPES, nn.Linear, *RNN_TYPES)
_GATES = {nn.LSTM: 4, nn.GRU: 3}
# Norms whose statistics are taken across channels: dropping a channel changes every other channel's
# output, so units coupled to them cannot be removed (with or without affine parameters).
CROSS_CHANNEL_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm)


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
    buffers) under one name per tensor; ``prunable`` names the weights pruned
    element by element. ``aliases`` maps the other names of a shared (tied)
    tensor to that name, e.g. ``{"decoder.weight": "embedding.weight"}``: a tied
    tensor is one tensor everywhere (one mask, one average), never two copies.
    """

    groups: tuple[UnitGroup, ...]
    prunable: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, str] = field(default_factory=dict)

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


def shared_tensors(model: nn.Module) -> dict[str, str]:
    """Alias -> canonical name for every state-dict tensor registered under more than one name.

    The canonical name is the first one in ``state_dict`` order, which is also the name
    ``named_parameters()`` (duplicates removed) keeps."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, CONV_TYPES) and module.groups > 1 and \
        module.groups == module.in_channels == module.out_channels


def _layer_members(prefix: str, module: nn.Module, out: bool, block: int) -> list[Member]:
    """The tensor slices that one layer contributes to a group (raises when it cannot be sliced)."""
    p = f"{prefix}." if prefix else ""
    where = f"{prefix!r} ({type(module).__name__})"
    if isinstance(module, CONV_TYPES) and is_depthwise(module):
        # channel c of a depthwise conv is its filter c: one slice whether reached as input or output
        members = [Member(p + "weight", 0, fan_in=True)]
        return members + ([Member(p + "bias", 0)] if module.bias is not None else [])
    if isinstance(module, (*CONV_TYPES, nn.Linear)):
        if isinstance(module, CONV_TYPES) and module.groups != 1:
            raise UnsupportedModelError(f"grouped convolution {where} (groups={module.groups}) cannot be sliced")
        if not out:
            return [Member(p + "weight", 1, block=block)]
        members = [Member(p + "weight", 0, fan_in=True)]
        return members + ([Member(p + "bias", 0)] if module.bias is not None else [])
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        names = [n for n in ("weight", "bias", "running_mean", "running_var") if getattr(module, n, None) is not None]
        return [Member(p + n, 0) for n in names]
    if isinstance(module, RNN_TYPES):
        if module.num_layers != 1 or module.bidirectional or getattr(module, "proj_size", 0):
            raise UnsupportedModelError(
                f"{type(module).__name__} {prefix!r}: use one single-layer, unidirectional module per layer "
                "(a stacked one forces every layer to the same width)")
        if not out:
            return [Member(p + "weight_ih_l0", 1, block=block)]
        gates = _GATES[type(module)]
        members = [Member(p + "weight_ih_l0", 0, chunks=gates, fan_in=True),
                   Member(p + "weight_hh_l0", 0, chunks=gates, fan_in=True),
                   Member(p + "weight_hh_l0", 1)]
        if module.bias:
            members += [Member(p + "bias_ih_l0", 0, chunks=gates), Member(p + "bias_hh_l0", 0, chunks=gates)]
        return members
    if isinstance(module, CROSS_CHANNEL_NORMS) and not (
            isinstance(module, nn.GroupNorm) and module.num_groups == module.num_channels):
        raise UnsupportedModelError(f"{where} normalises across units: removing one changes the others")
    if isinstance(module, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        # per-channel statistics (instance norm, or GroupNorm with one channel per group): exact to slice
        names = [n for n in ("weight", "bias", "running_mean", "running_var") if getattr(module, n, None) is not None]
        return [Member(p + n, 0) for n in names]
    if any(True for _ in module.parameters(recurse=False)):
        raise UnsupportedModelError(f"layer {where} is coupled to prunable units but cannot be sliced")
    return []


def _canonical(names: list[str], aliases: dict[str, str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(aliases.get(n, n) for n in names))


def prunable_weights(model: nn.Module) -> tuple[str, ...]:
    """The element-wise prunable tensors: weights of Conv1d/Conv2d, Linear, LSTM/GRU and the
    attention projections of ``nn.MultiheadAttention`` (a tied weight under its canonical name)."""
    names = []
    for prefix, module in model.named_modules():
        p = f"{prefix}." if prefix else ""
        if isinstance(module, (*CONV_TYPES, nn.Linear)):
            names.append(p + "weight")
        elif isinstance(module, RNN_TYPES):
            names += [p + n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight")]
        elif isinstance(module, nn.MultiheadAttention):
            names += [p + n for n, t in module.named_parameters(recurse=False)
                      if n.endswith("proj_weight") and t is not None]
    return _canonical(names, shared_tensors(model))


class _GRUStandIn(nn.Module):
    """Traces like one LSTM node with the GRU's sizes.

    The GRU's CPU autograd graph is unrolled per time step, which Torch-Pruning
    reads as splits and concatenations of the hidden units; an LSTM is one node
    with the same input/hidden couplings. Only used on a copy, for tracing."""

    def __init__(self, gru: nn.GRU) -> None:
        super().__init__()
        self.rnn = nn.LSTM(gru.input_size, gru.hidden_size, gru.num_layers, bias=gru.bias,
                           batch_first=gru.batch_first, bidirectional=gru.bidirectional)

    def forward(self, x: torch.Tensor, hx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out, (h, _c) = self.rnn(x)
        return out, h


def _traceable_copy(model: nn.Module) -> tuple[nn.Module, dict[nn.Module, tuple[str, nn.Module]]]:
    """A copy of ``model`` for tracing, and {traced module: (name, original module)}."""
    traced = copy.deepcopy(model)
    originals = dict(zip(traced.modules(), model.modules()))
    names = {m: (n, originals[m]) for n, m in traced.named_modules()}
    for name, module in list(traced.named_modules()):
        if isinstance(module, nn.GRU):
            stand_in = _GRUStandIn(module)
            parent, _, attr = name.rpartition(".")
            setattr(traced.get_submodule(parent) if parent else traced, attr, stand_in)
            names[stand_in.rnn] = (name, originals[module])
    return traced, names


def trace_structure(
    model: nn.Module,
    example_inputs: torch.Tensor,
    ignored_layers: tuple[str, ...] = (),
) -> tuple[ModelStructure, dict[str, str]]:
    """Trace ``model`` once: its prunable tensors, the unit groups we can slice, and why the others are not.

    Units whose outputs no layer consumes (the classifier's outputs) are never
    removed, nor are the units of ``ignored_layers`` (module names). Returns the
    structure and ``{group root: reason}`` for every group left out.
    """
    import torch_pruning as tp  # heavy import, only needed here

    aliases = shared_tensors(model)
    tied = set(aliases) | set(aliases.values())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point() and k not in aliases}
    traced, known = _traceable_copy(model)
    ignored = [m for m, (n, _) in known.items() if n in ignored_layers]
    groups: list[UnitGroup] = []
    left_out: dict[str, str] = {}
    try:
        graph = tp.DependencyGraph().build_dependency(traced, example_inputs=example_inputs)
        tp_groups = list(graph.get_all_groups(root_module_types=[*CONV_TYPES, nn.Linear, nn.LSTM],
                                              ignored_layers=ignored))
    except Exception as exc:  # noqa: BLE001 - a model Torch-Pruning cannot trace keeps all its units
        left_out["<model>"] = f"tracing failed ({type(exc).__name__}: {exc}): no units are removed"
        tp_groups = []
    accounted = set(ignored_layers)  # layers whose units are in a group, are outputs, or were named in a reason
    for tp_group in tp_groups:
        root, _ = known.get(tp_group[0][0].target.module, (str(tp_group[0][0].target.module), None))
        root_size = len(tp_group[0][1])
        accounted |= {known[d.target.module][0] for d, _ in tp_group if d.target.module in known}
        if any(dep.target.module in ignored for dep, _ in tp_group):
            continue
        try:
            members, has_consumer = _group_members(graph, tp_group, known, root_size)
            if not has_consumer:
                continue  # the classifier's outputs
            unique = _merge_members(members)
            _check_members(unique, root_size, shapes, tied, root)
        except UnsupportedModelError as exc:
            left_out[root] = str(exc)
            continue
        groups.append(UnitGroup(_group_name(unique, model), root_size, unique))
    for name, module in dict(known.values()).items():
        if isinstance(module, LAYER_TYPES) and name not in accounted:
            left_out[name] = "tracing found no unit group for its outputs (e.g. its weight is used inside another module's functional forward)"
    structure = ModelStructure(tuple(sorted(groups, key=lambda g: g.name)), prunable_weights(model), shapes, aliases)
    return structure, left_out


def discover_structure(
    model: nn.Module,
    example_inputs: torch.Tensor,
    ignored_layers: tuple[str, ...] = (),
    strict: bool = False,
) -> ModelStructure:
    """The structure of ``model`` after the full intake (tracing plus the numerical check, see
    :func:`.intake.intake_model`, which also reports what was left out and why)."""
    from .intake import intake_model

    return intake_model(model, example_inputs, ignored_layers, strict=strict).structure


def _group_members(graph, tp_group, known: dict, root_size: int) -> tuple[list[Member], bool]:
    members: list[Member] = []
    has_consumer = False
    for dep, idxs in tp_group:
        if dep.target.module not in known:
            continue  # traced operation (relu, pool, reshape): no tensors
        name, module = known[dep.target.module]
        out = graph.is_out_channel_pruning_fn(dep.handler)
        if len(idxs) % root_size:
            raise UnsupportedModelError(
                f"{name!r}: {len(idxs)} coupled indices for {root_size} units (e.g. a concatenation "
                "of differently sized branches)")
        block = len(idxs) // root_size
        if not out and not is_depthwise(module):
            has_consumer = True
            _check_unit_major(idxs, root_size, block, name)
        members += _layer_members(name, module, out, block)
    return members, has_consumer


def _group_name(members: tuple[Member, ...], model: nn.Module) -> str:
    """The first layer (in module order) whose outputs the units are, depthwise convs aside."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    layers = [m.tensor.rsplit(".", 1)[0] for m in members if m.fan_in]
    plain = [n for n in layers if not is_depthwise(model.get_submodule(n))]
    return min(plain or layers or [members[0].tensor.rsplit(".", 1)[0]], key=lambda n: order.get(n, len(order)))


def _merge_members(members: list[Member]) -> tuple[Member, ...]:
    """One member per (tensor, dim); a slice reached twice (depthwise in and out) is a fan-in if either is."""
    merged: dict[tuple[str, int], Member] = {}
    for m in members:
        key = (m.tensor, m.dim)
        if key in merged and merged[key] != m:
            old = merged[key]
            if (old.chunks, old.block) != (m.chunks, m.block):
                raise UnsupportedModelError(f"{m.tensor!r} is reached through two different layouts")
            m = Member(m.tensor, m.dim, m.chunks, m.block, old.fan_in or m.fan_in)
        merged[key] = m
    return tuple(merged.values())


def _check_members(members: tuple[Member, ...], size: int, shapes: dict[str, tuple[int, ...]],
                   tied: set[str], where: str) -> None:
    """Every member must cover its dimension exactly (chunks x units x block) and own its tensor alone."""
    for m in members:
        if m.tensor in tied:
            raise UnsupportedModelError(f"{m.tensor!r} is a tied (shared) weight: narrowing it for {where!r} "
                                        "would split the tie")
        shape = shapes.get(m.tensor)
        if shape is None or not 0 <= m.dim < len(shape) or shape[m.dim] != m.chunks * size * m.block:
            raise UnsupportedModelError(f"{m.tensor!r} dim {m.dim} (shape {shape}) does not split into "
                                        f"{m.chunks} x {size} units x {m.block}")


def _check_unit_major(idxs, size: int, block: int, where: str) -> None:
    """Our :class:`Member` layout assumes unit ``u`` owns a contiguous block."""
    if [int(i) for i in idxs] != list(range(size * block)):
        raise UnsupportedModelError(f"unexpected index layout at {where!r} (e.g. a branch at a concatenation offset)")


def structure_to_json(structure: ModelStructure) -> str:
    """A compact JSON form, so that clients need no tracing (nor Torch-Pruning)."""
    import json

    return json.dumps({
        "groups": [[g.name, g.size, [[m.tensor, m.dim, m.chunks, m.block, m.fan_in] for m in g.members]]
                   for g in structure.groups],
        "prunable": list(structure.prunable),
        "shapes": {k: list(v) for k, v in structure.shapes.items()},
        "aliases": structure.aliases,
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
        aliases = {str(k): str(v) for k, v in raw.get("aliases", {}).items()}
        structure = ModelStructure(groups, tuple(str(p) for p in raw["prunable"]), shapes, aliases)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"malformed model structure: {exc}") from None
    if any(a in shapes or c not in shapes for a, c in structure.aliases.items()):
        raise ValueError("malformed model structure: an alias must name a tensor the structure has under another name")
    for group in structure.groups:
        for m in group.members:
            shape = shapes.get(m.tensor, ())
            if not 0 <= m.dim < len(shape) or shape[m.dim] != m.chunks * group.size * m.block:
                raise ValueError(f"malformed model structure: member {m} does not fit {group.name!r}")
    return structure
