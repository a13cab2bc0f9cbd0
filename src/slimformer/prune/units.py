"""The prunable units of a model: attention heads (or key/value groups) and MLP hidden units.

Each unit has a cost (the parameters it carries, or its MACs per sample) so that units of
different layers, kinds and towers can be ranked on one scale; masks multiply the output
projection's input columns of a head or fc2's input column of a hidden unit, which zeroes exactly
that unit's contribution (the same function :func:`slice_model` keeps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimformer.models.structure import StructureMap
from slimformer.prune.slicing import SliceSpec, head_groups


@dataclass(frozen=True)
class UnitGroup:
    """The units of one site.

    Attributes:
        kind: ``heads`` or ``mlp``.
        site: Index in ``structure.attention`` / ``structure.mlps``.
        n: Number of units (heads / groups of ``group`` heads, or hidden units).
        group: Query heads per unit (grouped-query attention), 1 for MLPs.
        width: Columns of the masked weight per unit (``group * head_dim``, or 1).
        masked: ``(weight name, input axis)`` of the weights whose columns the mask scales.
        scored: ``(weight name, axis)`` of every weight slice the unit owns (for magnitudes).
        cost: Parameters (or MACs per sample) one unit carries.
    """

    kind: str
    site: int
    n: int
    group: int
    width: int
    masked: tuple[tuple[str, int], ...]
    scored: tuple[tuple[str, int, int], ...]  # (weight, axis, parts along that axis)
    cost: float


def _out_axis(refs, name: str) -> int:
    ref = refs.get(name)
    return 0 if ref is None or ref.op == "linear" else 1


def _rows_per_sample(model: nn.Module, inputs: dict) -> dict[str, float]:
    """Activation rows each weight is applied to, per sample (for MAC costs)."""
    from slimformer.models.structure import _linear_of
    from slimformer.models.trace import record

    graph, _ = record(model, inputs)
    batch = next((t.shape[0] for t in inputs.values() if isinstance(t, torch.Tensor)
                  and t.dim() > 0), 1)
    rows: dict[str, float] = {}
    for n in graph.nodes:
        lin = _linear_of(n)
        if lin:
            shape = n.in_shapes[lin[0]]
            rows[lin[1]] = rows.get(lin[1], 0) + float(torch.tensor(shape[:-1]).prod()) / batch
        elif n.op == "mha":
            r = float(torch.tensor(n.in_shapes[0][:-1]).prod()) / batch
            for p in n.params:
                if p:
                    rows[p] = rows.get(p, 0) + r
    return rows


def unit_groups(model: nn.Module, structure: StructureMap, structures, skip: dict,
                target: str = "params", inputs: dict | None = None) -> list[UnitGroup]:
    """Every prunable site's units, with per-unit costs.

    Args:
        model: The model ``structure`` describes.
        structure: Its structure map.
        structures: Which kinds to include (``heads``, ``mlp``).
        inputs: Example inputs (only for ``target="macs"``).
        skip: ``{"heads": {site: reason}, "mlp": {...}}`` of sites that cannot be sliced.
        target: ``params`` or ``macs`` (then ``inputs`` are needed).
    """
    refs = {r.weight: r for r in structure.linears}
    params = dict(model.named_parameters())
    rows = _rows_per_sample(model, inputs) if target == "macs" else {}

    def cost(name: str, axis: int, count: int) -> float:
        w = params[name]
        other = w.shape[1 - axis] if w.dim() == 2 else 1
        c = count * other
        if axis == _out_axis(refs, name):  # the bias of the cut outputs goes too
            owner = model.get_submodule(name.rpartition(".")[0])
            c += count * any(b is not w and b.dim() == 1 and b.shape[0] == w.shape[axis]
                             for b in owner.parameters(recurse=False))
        return c * (rows.get(name, 1.0) if target == "macs" else 1.0)

    out: list[UnitGroup] = []
    if "heads" in structures:
        groups = head_groups(model, structure)
        for i, a in enumerate(structure.attention):
            if i in skip.get("heads", {}):
                continue
            g, hd = groups[i], a.head_dim
            mod = model.get_submodule(a.module) if a.module else model
            if isinstance(mod, nn.MultiheadAttention):
                names = {id(p): n for n, p in model.named_parameters()}
                w_in = (mod.in_proj_weight,) if mod.in_proj_weight is not None else (
                    mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight)
                parts = 3 if mod.in_proj_weight is not None else 1
                scored = [(names[id(w)], 0, parts) for w in w_in]
                out_w = names[id(mod.out_proj.weight)]
                masked = ((out_w, 1),)
                scored.append((out_w, 1, 1))
                c = sum(cost(n, 0, parts * hd) for n, _, _ in scored[:-1]) + cost(out_w, 1, hd)
                out.append(UnitGroup("heads", i, a.heads, 1, hd, masked, tuple(scored), c))
                continue
            scored, c = [], 0.0
            for w in a.q if not a.fused_qkv else ():
                scored.append((w, _out_axis(refs, w), 1))
                c += cost(w, _out_axis(refs, w), g * hd)
            for w in (*a.k, *a.v) if not a.fused_qkv else ():
                scored.append((w, _out_axis(refs, w), 1))
                c += cost(w, _out_axis(refs, w), hd)
            for w in a.q if a.fused_qkv else ():
                scored.append((w, _out_axis(refs, w), 3))
                c += cost(w, _out_axis(refs, w), 3 * hd)
            masked = tuple((w, 1 - _out_axis(refs, w)) for w in a.out)
            for w, ax in masked:
                scored.append((w, ax, 1))
                c += cost(w, ax, g * hd)
            out.append(UnitGroup("heads", i, a.heads // g, g, g * hd, masked, tuple(scored), c))
    if "mlp" in structures:
        for i, m in enumerate(structure.mlps):
            if i in skip.get("mlp", {}):
                continue
            fc2 = (m.fc2, 1 - _out_axis(refs, m.fc2))
            scored = [(w, _out_axis(refs, w), 1) for w in m.fc1] + [(*fc2, 1)]
            c = sum(cost(w, ax, 1) for w, ax, _ in scored)
            out.append(UnitGroup("mlp", i, m.hidden, 1, 1, (fc2,), tuple(scored), c))
    return out


def magnitude_scores(model: nn.Module, groups: list[UnitGroup]) -> list[torch.Tensor]:
    """Per group, the L2 norm of all weights each unit owns ``(n,)`` (the magnitude baseline)."""
    params = dict(model.named_parameters())
    out = []
    for g in groups:
        sq = torch.zeros(g.n)
        for name, axis, parts in g.scored:
            w = params[name].detach().float().pow(2)
            per = w.sum(1 - axis) if w.dim() == 2 else w  # (axis length,)
            per = per.reshape(parts, g.n, -1).sum((0, 2))  # (n,)
            sq += per
        out.append(sq.sqrt())
    return out


def to_spec(groups: list[UnitGroup], keep: list[torch.Tensor]) -> SliceSpec:
    """Slice spec from one boolean keep-vector ``(n,)`` per group."""
    heads, mlp = {}, {}
    for g, k in zip(groups, keep, strict=True):
        idx = k.nonzero().flatten().tolist()
        if g.kind == "heads":
            heads[g.site] = tuple(u * g.group + r for u in idx for r in range(g.group))
        else:
            mlp[g.site] = tuple(idx)
    return SliceSpec(heads, mlp)


class _ColumnMask(nn.Module):
    """Parametrization ``W -> W * mask[unit of column]`` along one axis of a weight."""

    def __init__(self, mask: torch.Tensor, width: int, axis: int):
        super().__init__()
        self.mask, self.width, self.axis = mask, width, axis

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        m = self.mask.repeat_interleave(self.width)  # (columns,)
        return w * (m[:, None] if self.axis == 0 else m[None, :])


class Masks:
    """Learnable unit masks applied to a model (a context: removed again on exit)."""

    def __init__(self, model: nn.Module, groups: list[UnitGroup]):
        self.model, self.groups = model, groups
        self.values = [torch.ones(g.n, requires_grad=True) for g in groups]

    def __enter__(self) -> Masks:
        self.order = {}
        for g, m in zip(self.groups, self.values, strict=True):
            for name, axis in g.masked:
                owner, _, attr = name.rpartition(".")
                mod = self.model.get_submodule(owner)
                self.order.setdefault(owner, list(mod._parameters))
                parametrize.register_parametrization(self.model.get_submodule(owner), attr,
                                                     _ColumnMask(m, g.width, axis))
        return self

    def __exit__(self, *exc) -> None:
        for g in self.groups:
            for name, _ in g.masked:
                owner, _, attr = name.rpartition(".")
                mod = self.model.get_submodule(owner)
                if parametrize.is_parametrized(mod, attr):
                    parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
        for owner, keys in self.order.items():  # same parameter order as before (optimizers)
            mod = self.model.get_submodule(owner)
            mod._parameters = {k: mod._parameters[k] for k in keys if k in mod._parameters} | {
                k: v for k, v in mod._parameters.items() if k not in keys}
