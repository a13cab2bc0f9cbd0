"""Physical slicing: remove attention heads and MLP hidden units from a model's weight tensors.

Everything is found through the :class:`~slimformer.models.structure.StructureMap`: the q/k/v and
output projections of each attention site, fc1/fc2 of each MLP, and the orientation of each weight
(``F.linear`` keeps ``(out, in)``; ``addmm``/``matmul`` as in GPT-2's Conv1D keep ``(in, out)``).
After the tensors shrink, integer attributes that the forward needs are updated *by value*, never
by name: on the attention module, attributes equal to the head count or to heads x head_dim (e.g.
``self.heads``, ``split_size``, ``attn_dim``); on a non-``nn.Linear`` owner of a sliced weight,
attributes equal to the old size of the sliced axis (e.g. Conv1D's ``nf``). ``nn.Linear`` and
``nn.MultiheadAttention`` are handled by type; a sliced ``nn.MultiheadAttention`` becomes a
:class:`SlicedMultiheadAttention` (same parameters, a forward that allows fewer heads).

With ``check_inputs``, the sliced model's output is compared with the original model whose pruned
units are zeroed (the exact function slicing must keep); a forward that hard-codes the width (e.g.
``reshape(B, T, C)`` with ``C`` read from the input) fails that check and raises
:class:`~slimformer.errors.UnsupportedModelError` saying so.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from slimformer.errors import ConfigError, UnsupportedModelError
from slimformer.models.structure import AttentionSite, LinearRef, StructureMap
from slimformer.prune.mha import SlicedMultiheadAttention


@dataclass(frozen=True)
class SliceSpec:
    """Which units to keep.

    Attributes:
        heads: Attention-site index (``structure.attention`` order) -> kept (query) head indices.
            With grouped-query attention the kept heads must form whole groups.
        mlp: MLP-site index (``structure.mlps`` order) -> kept hidden-unit indices.
    Sites not in a mapping are kept whole.
    """

    heads: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    mlp: Mapping[int, tuple[int, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready form (keys become strings)."""
        return {"heads": {str(k): list(v) for k, v in self.heads.items()},
                "mlp": {str(k): list(v) for k, v in self.mlp.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> SliceSpec:
        """Inverse of :meth:`to_dict`."""
        return cls({int(k): tuple(int(i) for i in v) for k, v in data.get("heads", {}).items()},
                   {int(k): tuple(int(i) for i in v) for k, v in data.get("mlp", {}).items()})


# ---------------------------------------------------------------------------------------------
# tensor surgery


def _registrations(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, attribute) holding it (tied weights appear twice)."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((mod, name))
    return out


class _Surgeon:
    """Slices parameters in place and remembers which modules changed, for attribute updates."""

    def __init__(self, model: nn.Module, structure: StructureMap):
        self.model = model
        self.regs = _registrations(model)
        self.refs: dict[str, LinearRef] = {r.weight: r for r in structure.linears}
        self.done: set[tuple[str, int]] = set()

    def param(self, name: str) -> nn.Parameter:
        return self.model.get_parameter(name)

    def owner(self, name: str) -> nn.Module:
        return self.model.get_submodule(name.rpartition(".")[0])

    def cut(self, name: str, axis: int, idx: torch.Tensor, old: int) -> None:
        """Keep ``idx`` along ``axis`` of parameter ``name`` (and the bias of its outputs)."""
        if (name, axis) in self.done:
            return
        self.done.add((name, axis))
        p = self.param(name)
        self._replace(p, p.detach().index_select(axis, idx))
        owner = self.owner(name)
        out_axis = self.out_axis(name)
        if axis == out_axis:
            for b in list(owner._parameters.values()):
                if b is not None and b is not p and b.dim() == 1 and b.shape[0] == old:
                    self._replace(b, b.detach().index_select(0, idx))
        self._fix_owner(owner, p.shape[1 - axis] if p.dim() == 2 else None, axis == out_axis,
                        old, len(idx))

    def out_axis(self, name: str) -> int:
        ref = self.refs.get(name)
        return 0 if ref is None or ref.op == "linear" else 1

    def _replace(self, old: nn.Parameter, data: torch.Tensor) -> None:
        new = nn.Parameter(data.contiguous().clone(), requires_grad=old.requires_grad)
        for mod, attr in self.regs.pop(id(old), []):
            mod._parameters[attr] = new
            self.regs.setdefault(id(new), []).append((mod, attr))

    @staticmethod
    def _fix_owner(owner: nn.Module, other: int | None, is_out: bool, old: int, new: int) -> None:
        """Update the owner's size attributes; ``other`` is the size of the axis not cut."""
        if isinstance(owner, nn.Linear):
            if is_out:
                owner.out_features = new
            else:
                owner.in_features = new
            return
        if isinstance(owner, nn.MultiheadAttention):
            return
        for attr, val in list(vars(owner).items()):
            if type(val) is int and val == old and (is_out or val != other):
                setattr(owner, attr, new)


def _rows(parts: int, heads: int, hd: int, kept: list[int]) -> torch.Tensor:
    """Indices of the kept heads in a projection laid out ``(parts, heads, hd)``."""
    base = torch.tensor(kept)[:, None] * hd + torch.arange(hd)  # (kept, hd)
    return torch.cat([base.flatten() + p * heads * hd for p in range(parts)])


def _check_kept(kind: str, site: int, kept, total: int) -> list[int]:
    kept = sorted(set(int(i) for i in kept))
    if not kept:
        raise ConfigError([f"{kind}[{site}]: keeps no unit; at least one must stay"], "slice spec")
    if kept[0] < 0 or kept[-1] >= total:
        raise ConfigError([f"{kind}[{site}]: indices must be in 0..{total - 1}, got {kept}"],
                          "slice spec")
    return kept


def _slice_attention(s: _Surgeon, model: nn.Module, i: int, site: AttentionSite,
                     kept: list[int], skip: int) -> None:
    """Slice one attention site; bit j of ``skip`` leaves the j-th candidate attribute as is."""
    h, hd = site.heads, site.head_dim
    mod = model.get_submodule(site.module) if site.module else model
    if isinstance(mod, nn.MultiheadAttention):
        _slice_mha(s, mod, kept)
        return
    if not site.q or not site.k or not site.v or not site.out:
        raise UnsupportedModelError(f"attention site {i} ({site.module or 'root'}): its q/k/v/"
                                    "output projections were not all found, so heads cannot be cut")
    if site.fused_qkv:
        for w in site.q:
            rows = s.param(w).shape[s.out_axis(w)]
            if rows != 3 * h * hd:
                raise UnsupportedModelError(
                    f"attention site {i}: fused qkv weight {w} has {rows} outputs, not 3 x "
                    f"{h} heads x {hd}")
            s.cut(w, s.out_axis(w), _rows(3, h, hd, kept), rows)
        hk, kept_kv = h, kept
    else:
        kv_rows = s.param(site.k[0]).shape[s.out_axis(site.k[0])]
        hk = kv_rows // hd
        if hk < 1 or h % hk:
            raise UnsupportedModelError(f"attention site {i}: key projection width {kv_rows} is "
                                        f"not a divisor group of {h} heads x {hd}")
        rep = h // hk
        kept_kv = sorted({j // rep for j in kept})
        if rep > 1 and sorted(kept) != [g * rep + r for g in kept_kv for r in range(rep)]:
            raise ConfigError([f"heads[{i}]: grouped-query attention ({h} query heads share "
                               f"{hk} key/value heads): keep whole groups of {rep}, got {kept}"],
                              "slice spec")
        for w in site.q:
            s.cut(w, s.out_axis(w), _rows(1, h, hd, kept), h * hd)
        for w in (*site.k, *site.v):
            s.cut(w, s.out_axis(w), _rows(1, hk, hd, kept_kv), hk * hd)
    for w in site.out:
        s.cut(w, 1 - s.out_axis(w), _rows(1, h, hd, kept), h * hd)
    new = {h: len(kept), h * hd: len(kept) * hd, hk: len(kept_kv), hk * hd: len(kept_kv) * hd}
    for j, (attr, val) in enumerate(_attr_cands(mod, site, hk)):
        if not (skip >> j) & 1:
            setattr(mod, attr, new[val])


def _slice_mha(s: _Surgeon, mha: nn.MultiheadAttention, kept: list[int]) -> None:
    h, hd = mha.num_heads, mha.head_dim
    names = {id(p): n for n, p in s.model.named_parameters()}
    idx = _rows(1, h, hd, kept)
    if mha.in_proj_weight is not None:
        s.cut(names[id(mha.in_proj_weight)], 0, _rows(3, h, hd, kept), 3 * h * hd)
    else:
        for p in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight):
            s.cut(names[id(p)], 0, idx, h * hd)
        if mha.in_proj_bias is not None:
            s._replace(mha.in_proj_bias,
                       mha.in_proj_bias.detach().index_select(0, _rows(3, h, hd, kept)))
    s.cut(names[id(mha.out_proj.weight)], 1, idx, h * hd)
    mha.out_proj.in_features = len(kept) * hd
    mha.__class__ = SlicedMultiheadAttention
    mha.num_heads = len(kept)
    mha._qkv_same_embed_dim = False  # keeps TransformerEncoderLayer off its fused fast path


def _slice_mlp(s: _Surgeon, site, kept: list[int]) -> None:
    idx = torch.tensor(kept)
    for w in site.fc1:
        s.cut(w, s.out_axis(w), idx, site.hidden)
    s.cut(site.fc2, 1 - s.out_axis(site.fc2), idx, site.hidden)


# ---------------------------------------------------------------------------------------------
# checking


def _outputs(out) -> list[torch.Tensor]:
    flat = out.to_tuple() if hasattr(out, "to_tuple") else out
    return [t for t in tree_flatten(flat)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


@torch.no_grad()
def masked_reference(model: nn.Module, structure: StructureMap, spec: SliceSpec) -> nn.Module:
    """A copy of ``model`` with the pruned heads' and units' contributions zeroed (full size)."""
    ref = copy.deepcopy(model)
    s = _Surgeon(ref, structure)
    for i, kept in spec.heads.items():
        site = structure.attention[i]
        drop = sorted(set(range(site.heads)) - set(kept))
        if not drop:
            continue
        mod = ref.get_submodule(site.module) if site.module else ref
        if isinstance(mod, nn.MultiheadAttention):
            mod.out_proj.weight[:, _rows(1, site.heads, site.head_dim, drop)] = 0
            continue
        for w in site.out:
            s.param(w).index_fill_(1 - s.out_axis(w), _rows(1, site.heads, site.head_dim, drop), 0)
    for i, kept in spec.mlp.items():
        site = structure.mlps[i]
        drop = torch.tensor(sorted(set(range(site.hidden)) - set(kept)), dtype=torch.long)
        if len(drop):
            s.param(site.fc2).index_fill_(1 - s.out_axis(site.fc2), drop, 0)
    return ref


@torch.no_grad()
def compare(model: nn.Module, ref: nn.Module, inputs: dict) -> str | None:
    """``None`` when ``model(**inputs)`` matches ``ref(**inputs)`` (relative error < 1e-4)."""
    model.eval()
    ref.eval()
    try:
        got = _outputs(model(**inputs))
    except Exception as e:  # noqa: BLE001 - any failure of the sliced forward is the finding
        return f"the sliced forward failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    want = _outputs(ref(**inputs))
    if len(got) != len(want):
        return f"the sliced model returns {len(got)} tensors, the original {len(want)}"
    for j, (a, b) in enumerate(zip(got, want, strict=True)):
        if a.shape != b.shape:
            return f"output {j} has shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        err = float((a - b).norm() / b.norm().clamp_min(1e-12))
        if not err < 1e-4:
            return f"output {j} differs from the masked original (relative error {err:.2e})"
    return None


# ---------------------------------------------------------------------------------------------
# public API


def slice_model(model: nn.Module, structure: StructureMap, spec: SliceSpec,
                inplace: bool = False, check_inputs: dict | None = None) -> nn.Module:
    """Return ``model`` with only the kept heads and MLP units: smaller weight tensors.

    Args:
        model: The model ``structure`` was discovered on.
        structure: Its :class:`StructureMap`.
        spec: Kept units per site; sites not named are kept whole.
        inplace: Slice ``model`` itself (else a deep copy).
        check_inputs: Example inputs; when given, the sliced model must reproduce the original
            with the pruned units zeroed (relative error < 1e-4), else
            :class:`UnsupportedModelError` says which forward could not take the new sizes.

    Raises:
        ConfigError: A site index or unit index out of range, a site keeping nothing, grouped
            heads cut across a group.
        UnsupportedModelError: The projections of a site cannot be cut, or the check failed.
    """
    problems = [f"heads[{i}]: no attention site {i}; the model has {len(structure.attention)}"
                for i in spec.heads if not 0 <= i < len(structure.attention)]
    problems += [f"mlp[{i}]: no MLP site {i}; the model has {len(structure.mlps)}"
                 for i in spec.mlp if not 0 <= i < len(structure.mlps)]
    if problems:
        raise ConfigError(problems, "slice spec")
    heads = {i: _check_kept("heads", i, k, structure.attention[i].heads)
             for i, k in spec.heads.items()}
    mlp = {i: _check_kept("mlp", i, k, structure.mlps[i].hidden) for i, k in spec.mlp.items()}
    heads = {i: k for i, k in heads.items() if len(k) < structure.attention[i].heads}
    mlp = {i: k for i, k in mlp.items() if len(k) < structure.mlps[i].hidden}
    ref = masked_reference(model, structure, spec) if check_inputs is not None else None
    trials = 2 ** min(4, _n_attr_cands(model, structure, heads)) if ref is not None else 1
    for trial in range(trials):  # bit j of ``trial`` set: leave the j-th candidate attribute
        out = model if inplace and ref is None else copy.deepcopy(model)
        s = _Surgeon(out, structure)
        with torch.no_grad():
            for i, kept in heads.items():
                _slice_attention(s, out, i, structure.attention[i], kept, trial)
            for i, kept in mlp.items():
                _slice_mlp(s, structure.mlps[i], kept)
        if ref is None:
            return out
        why = compare(out, ref, check_inputs)
        if why is None:
            return _adopt(model, out) if inplace else out
    where = ", ".join(f"attention {i} ({structure.attention[i].module or 'root'})"
                      for i in heads) or "MLPs only"
    raise UnsupportedModelError(
        f"cannot slice this model ({where}): {why}. The weights were cut, but the model's "
        "forward does not adapt to fewer heads/units (e.g. it reshapes the attention output to "
        "a width read from its input instead of -1); tried "
        f"{trials} way(s) of updating the head-count attributes found by value")


def _attr_cands(mod: nn.Module, site: AttentionSite, hk: int) -> list[tuple[str, int]]:
    """Integer attributes of the attention module holding a head count or heads x head_dim."""
    h, hd = site.heads, site.head_dim
    vals = {h, h * hd, hk, hk * hd}
    return [(a, v) for a, v in vars(mod).items() if type(v) is int and v in vals
            and (v != hd or h == hd)]


def _n_attr_cands(model: nn.Module, structure: StructureMap, heads: Mapping) -> int:
    n = 0
    for i in heads:
        site = structure.attention[i]
        mod = model.get_submodule(site.module) if site.module else model
        n = max(n, len(_attr_cands(mod, site, site.heads // _group(model, structure, i))))
    return n


def _adopt(model: nn.Module, sliced: nn.Module) -> nn.Module:
    """Make ``model`` (the caller's object) become ``sliced``."""
    model.__dict__.update(sliced.__dict__)
    return model


def sliceable(model: nn.Module, structure: StructureMap, inputs: dict) -> dict[str, dict[int, str]]:
    """Which sites can be sliced: ``{"heads": {site: reason}, "mlp": {site: reason}}`` (failures).

    Tries removing one unit of every site at once (one forward); only when that fails is each
    site tried alone.
    """
    out: dict[str, dict[int, str]] = {"heads": {}, "mlp": {}}
    cands = {}
    for i, a in enumerate(structure.attention):
        step = _group(model, structure, i)
        if a.heads <= step:
            out["heads"][i] = f"has {a.heads} head(s) in groups of {step}: nothing to remove"
        else:
            cands[i] = tuple(range(a.heads - step))
    mcands = {i: tuple(range(m.hidden - 1)) for i, m in enumerate(structure.mlps) if m.hidden > 1}
    for kind, table in (("heads", cands), ("mlp", mcands)):
        def spec(d, kind=kind):
            return SliceSpec(heads=d) if kind == "heads" else SliceSpec(mlp=d)
        try:
            slice_model(model, structure, spec(table), check_inputs=inputs)
            continue
        except (UnsupportedModelError, ConfigError):
            pass
        for i, kept in table.items():
            try:
                slice_model(model, structure, spec({i: kept}), check_inputs=inputs)
            except (UnsupportedModelError, ConfigError) as e:
                out[kind][i] = str(e)
    return out


def _group(model: nn.Module, structure: StructureMap, i: int) -> int:
    """Query heads per key/value head of attention site ``i`` (1 unless grouped-query)."""
    site = structure.attention[i]
    if site.fused_qkv or not site.k:
        return 1
    refs = {r.weight: r for r in structure.linears}
    ref = refs.get(site.k[0])
    if ref is None:
        return 1
    hk = ref.out_features // site.head_dim
    return site.heads // hk if hk and site.heads % hk == 0 else 1


def head_groups(model: nn.Module, structure: StructureMap) -> list[int]:
    """Per attention site, the number of query heads sharing one key/value head."""
    return [_group(model, structure, i) for i in range(len(structure.attention))]


__all__ = ["SliceSpec", "SlicedMultiheadAttention", "compare", "head_groups", "masked_reference",
           "slice_model", "sliceable"]
