"""The prunable units of a model: attention heads (or key/value groups), head dims, MLP units.

A head-dimension unit is dim ``j`` of every head of a site (UPop's unit of attention): q/k dims
(``dims_qk``) and v dims (``dims_v``) where the model lets v keep other dims than q/k, else one
joint unit (``dims``). Each unit has a cost (the parameters it carries, or its MACs per sample)
so that units of different layers, kinds and towers can be ranked on one scale; masks multiply
the output projection's input columns of a head or fc2's input column of a hidden unit, which
zeroes exactly that unit's contribution (the same function :func:`slice_model` keeps); a q/k
dim's mask scales its query rows and bias (a zero query dim adds nothing to the scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimformer.models.structure import StructureMap
from slimformer.prune.slicing import SliceSpec, bias_name, head_groups


@dataclass(frozen=True)
class UnitGroup:
    """The units of one site.

    Attributes:
        kind: ``heads``, ``mlp``, ``dims`` (q/k/v dims together), ``dims_qk`` or ``dims_v``.
        site: Index in ``structure.attention`` / ``structure.mlps``.
        n: Number of units (heads / groups of ``group`` heads, head dims, or hidden units).
        group: Query heads per unit (grouped-query attention), 1 otherwise.
        width: Columns of the masked weight per unit (``group * head_dim``, or 1).
        masked: ``(parameter name, axis, index)`` of the tensors the mask scales along ``axis``:
            ``index`` None means ``width`` consecutive entries per unit, else it gives each
            entry's unit (-1: not masked).
        scored: ``(weight name, axis, parts)`` of every weight slice the unit owns (for
            magnitudes): ``parts`` an int means ``parts`` blocks of ``n`` units, a tuple is a
            per-entry unit index as in ``masked``.
        cost: Parameters (or MACs per sample) one unit carries.
    """

    kind: str
    site: int
    n: int
    group: int
    width: int
    masked: tuple[tuple[str, int, tuple[int, ...] | None], ...]
    scored: tuple[tuple[str, int, int | tuple[int, ...]], ...]
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
                target: str = "params", inputs: dict | None = None,
                dim_modes: dict[int, str] | None = None) -> list[UnitGroup]:
    """Every prunable site's units, with per-unit costs.

    Args:
        model: The model ``structure`` describes.
        structure: Its structure map.
        structures: Which kinds to include (``heads``, ``mlp``).
        inputs: Example inputs (only for ``target="macs"``).
        skip: ``{"heads": {site: reason}, "mlp": {...}}`` of sites that cannot be sliced.
        target: ``params`` or ``macs`` (then ``inputs`` are needed).
        dim_modes: Sites whose head dims can be cut: ``separate`` (v apart from q/k) or
            ``joint`` (from :func:`~slimformer.prune.slicing.sliceable`).
    """
    refs = {r.weight: r for r in structure.linears}
    params = dict(model.named_parameters())
    rows = _rows_per_sample(model, inputs) if target == "macs" else {}

    def cost(name: str, axis: int, count: int) -> float:
        w = params[name]
        other = w.numel() // w.shape[axis] if w.dim() >= 2 else 1  # a conv: its kernel too
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
                masked = ((out_w, 1, None),)
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
            masked = tuple((w, 1 - _out_axis(refs, w), None) for w in a.out)
            for w, ax, _ in masked:
                scored.append((w, ax, 1))
                c += cost(w, ax, g * hd)
            out.append(UnitGroup("heads", i, a.heads // g, g, g * hd, masked, tuple(scored), c))
    if "mlp" in structures:
        for i, m in enumerate(structure.mlps):
            if i in skip.get("mlp", {}):
                continue
            fc2 = (m.fc2, 1 - _out_axis(refs, m.fc2))
            scored = [(w, _out_axis(refs, w), m.fc1_parts) for w in m.fc1] + [(*fc2, 1)] + [
                (w, 0, params[w].shape[0] // m.hidden) for w in m.channelwise]  # depthwise conv
            c = sum(cost(w, ax, k) for w, ax, k in scored)
            out.append(UnitGroup("mlp", i, m.hidden, 1, 1, ((*fc2, None),), tuple(scored), c))
    if "dims" in structures:
        for i, mode in (dim_modes or {}).items():
            out.extend(_dim_groups(model, structure, refs, i, mode, cost))
    return out


def _dim_groups(model, structure, refs, i: int, mode: str, cost) -> list[UnitGroup]:
    """Head-dimension units of attention site ``i``: one joint group, or q/k and v groups."""
    a = structure.attention[i]
    h, hd = a.heads, a.head_dim
    hk = h // head_groups(model, structure)[i]
    params = dict(model.named_parameters())

    def index(total: int, part: int = 0, heads: int = h) -> tuple[int, ...]:
        """Per entry of a ``total``-long axis, its dim if it lies in ``part`` (of heads x hd)."""
        j = torch.full((total,), -1, dtype=torch.long)
        j[part * heads * hd:(part + 1) * heads * hd] = torch.arange(heads * hd) % hd
        return tuple(j.tolist())

    def rows(w: str) -> int:
        return params[w].shape[_out_axis(refs, w)]

    q_mask, qk_scored, v_scored, out_mask = [], [], [], []
    c_qk = c_v = 0.0
    for w in a.q:
        ax = _out_axis(refs, w)
        q_mask.append((w, ax, index(rows(w))))
        b = bias_name(model, w, rows(w))
        if b:
            q_mask.append((b, 0, index(rows(w))))
        qk_scored.append((w, ax, index(rows(w))))
        if a.fused_qkv:
            qk_scored.append((w, ax, index(rows(w), 1)))
            v_scored.append((w, ax, index(rows(w), 2)))
            c_qk += cost(w, ax, 2 * h)
            c_v += cost(w, ax, h)
        else:
            c_qk += cost(w, ax, h)
    for w in () if a.fused_qkv else a.k:
        qk_scored.append((w, _out_axis(refs, w), index(rows(w), heads=hk)))
        c_qk += cost(w, _out_axis(refs, w), hk)
    for w in () if a.fused_qkv else a.v:
        v_scored.append((w, _out_axis(refs, w), index(rows(w), heads=hk)))
        c_v += cost(w, _out_axis(refs, w), hk)
    for w in a.out:
        ax = 1 - _out_axis(refs, w)
        n_in = params[w].shape[ax]
        out_mask.append((w, ax, index(n_in)))
        v_scored.append((w, ax, index(n_in)))
        c_v += cost(w, ax, h)
    if mode == "joint":
        return [UnitGroup("dims", i, hd, 1, 1, (*q_mask, *out_mask), (*qk_scored, *v_scored),
                          c_qk + c_v)]
    return [UnitGroup("dims_qk", i, hd, 1, 1, tuple(q_mask), tuple(qk_scored), c_qk),
            UnitGroup("dims_v", i, hd, 1, 1, tuple(out_mask), tuple(v_scored), c_v)]


def magnitude_scores(model: nn.Module, groups: list[UnitGroup]) -> list[torch.Tensor]:
    """Per group, the L2 norm of all weights each unit owns ``(n,)`` (the magnitude baseline)."""
    params = dict(model.named_parameters())
    out = []
    for g in groups:
        sq = torch.zeros(g.n)
        for name, axis, parts in g.scored:
            w = params[name].detach().float().pow(2)
            per = w.sum(1 - axis) if w.dim() == 2 else w  # (axis length,)
            if isinstance(parts, tuple):  # per-entry unit index
                idx = torch.tensor(parts)
                sq.index_add_(0, idx[idx >= 0], per[idx >= 0])
            else:
                sq += per.reshape(parts, g.n, -1).sum((0, 2))  # (n,)
        out.append(sq.sqrt())
    return out


def to_spec(groups: list[UnitGroup], keep: list[torch.Tensor]) -> SliceSpec:
    """Slice spec from one boolean keep-vector ``(n,)`` per group."""
    heads, mlp, dims = {}, {}, {}
    for g, k in zip(groups, keep, strict=True):
        idx = tuple(k.nonzero().flatten().tolist())
        if g.kind == "heads":
            heads[g.site] = tuple(u * g.group + r for u in idx for r in range(g.group))
        elif g.kind == "mlp":
            mlp[g.site] = idx
        else:
            qk, v = dims.get(g.site, (tuple(range(g.n)), tuple(range(g.n))))
            dims[g.site] = (idx if g.kind != "dims_v" else qk, idx if g.kind != "dims_qk" else v)
    return SliceSpec(heads, mlp, dims)


class _ColumnMask(nn.Module):
    """Parametrization ``W -> W * mask[unit of entry]`` along one axis of a weight (or a bias)."""

    def __init__(self, mask: torch.Tensor, width: int, axis: int, index: tuple | None = None):
        super().__init__()
        self.mask, self.width, self.axis = mask, width, axis
        self.index = torch.tensor(index) if index is not None else None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            m = self.mask.repeat_interleave(self.width)  # (entries,)
        else:  # index -1 picks the appended 1: entry not masked
            m = torch.cat([self.mask, self.mask.new_ones(1)])[self.index]
        if w.dim() == 1:
            return w * m
        return w * (m[:, None] if self.axis == 0 else m[None, :])


class Masks:
    """Learnable unit masks applied to a model (a context: removed again on exit)."""

    def __init__(self, model: nn.Module, groups: list[UnitGroup]):
        self.model, self.groups = model, groups
        self.values = [torch.ones(g.n, requires_grad=True) for g in groups]

    def __enter__(self) -> Masks:
        self.order = {}
        for g, m in zip(self.groups, self.values, strict=True):
            for name, axis, index in g.masked:
                owner, _, attr = name.rpartition(".")
                mod = self.model.get_submodule(owner)
                self.order.setdefault(owner, list(mod._parameters))
                parametrize.register_parametrization(self.model.get_submodule(owner), attr,
                                                     _ColumnMask(m, g.width, axis, index))
        return self

    def __exit__(self, *exc) -> None:
        for g in self.groups:
            for name, _, _ in g.masked:
                owner, _, attr = name.rpartition(".")
                mod = self.model.get_submodule(owner)
                if parametrize.is_parametrized(mod, attr):
                    parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
        for owner, keys in self.order.items():  # same parameter order as before (optimizers)
            mod = self.model.get_submodule(owner)
            mod._parameters = {k: mod._parameters[k] for k in keys if k in mod._parameters} | {
                k: v for k, v in mod._parameters.items() if k not in keys}
