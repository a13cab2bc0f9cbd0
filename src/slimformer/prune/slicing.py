"""Physical slicing: remove attention heads, head dimensions and MLP units from weight tensors.

Everything is found through the :class:`~slimformer.models.structure.StructureMap`: the q/k/v and
output projections of each attention site, fc1/fc2 of each MLP, and the orientation of each weight
(``F.linear`` keeps ``(out, in)``; ``addmm``/``matmul`` as in GPT-2's Conv1D keep ``(in, out)``).
After the tensors shrink, integer attributes that the forward needs are updated *by value*, never
by name: on the attention module, attributes equal to the head count or to heads x head_dim (e.g.
``self.heads``, ``split_size``, ``attn_dim``); on a non-``nn.Linear`` owner of a sliced weight,
attributes equal to the old size of the sliced axis (e.g. Conv1D's ``nf``). ``nn.Linear`` and
``nn.MultiheadAttention`` are handled by type; a sliced ``nn.MultiheadAttention`` becomes a
:class:`SlicedMultiheadAttention` (same parameters, a forward that allows fewer heads).

Head dimensions (UPop's unit of attention) are cut in every head of a site alike, so heads stay of
equal size: ``dims[site] = (kept q/k dims, kept v dims)``; q and k always share theirs, v may keep
other dims where the model's forward allows (it reshapes with ``-1``; checked, never assumed).
When q/k lose dims, the scores' scale ``1/sqrt(head_dim)`` is kept: if the forward recomputes it
from the new size, the factor ``sqrt(d'/d)`` is folded into the query weights. Which attributes
to update and whether to fold is decided by trying the candidates against the masked original, so
head-dimension slicing needs ``check_inputs``.

With ``check_inputs``, the sliced model's output is compared with the original model whose pruned
units are zeroed (the exact function slicing must keep); a forward that hard-codes the width (e.g.
``reshape(B, T, C)`` with ``C`` read from the input) fails that check and raises
:class:`~slimformer.errors.UnsupportedModelError` saying so.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

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
        dims: Attention-site index -> ``(kept q/k dims, kept v dims)`` of every (kept) head,
            indices in ``0..head_dim-1``.
    Sites not in a mapping are kept whole.
    """

    heads: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    mlp: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    dims: Mapping[int, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready form (keys become strings)."""
        return {"heads": {str(k): list(v) for k, v in self.heads.items()},
                "mlp": {str(k): list(v) for k, v in self.mlp.items()},
                "dims": {str(k): {"qk": list(qk), "v": list(v)}
                         for k, (qk, v) in self.dims.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> SliceSpec:
        """Inverse of :meth:`to_dict`."""
        return cls({int(k): tuple(int(i) for i in v) for k, v in data.get("heads", {}).items()},
                   {int(k): tuple(int(i) for i in v) for k, v in data.get("mlp", {}).items()},
                   {int(k): (tuple(int(i) for i in v["qk"]), tuple(int(i) for i in v["v"]))
                    for k, v in data.get("dims", {}).items()})


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
        self.followers = structure.followers
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
            for path in self.followers.get(name, ()):  # a BatchNorm of these outputs
                self._cut_channels(self.model.get_submodule(path), idx, old)
        self._fix_owner(owner, p.shape[1 - axis] if p.dim() == 2 else None, axis == out_axis,
                        old, len(idx))

    def _cut_channels(self, mod: nn.Module, idx: torch.Tensor, old: int) -> None:
        """Keep channels ``idx`` of a per-channel module (affine parameters, running stats)."""
        for b in list(mod._parameters.values()):
            if b is not None and b.dim() == 1 and b.shape[0] == old:
                self._replace(b, b.detach().index_select(0, idx))
        for key, b in list(mod._buffers.items()):
            if b is not None and b.dim() == 1 and b.shape[0] == old:
                mod._buffers[key] = b.index_select(0, idx).clone()
        if getattr(mod, "num_features", None) == old:
            mod.num_features = len(idx)

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


def _rows(parts: int, heads: int, hd: int, kept, dims=None) -> torch.Tensor:
    """Indices of the kept heads in a projection laid out ``(parts, heads, hd)``.

    ``dims``: per part, the kept dims of each head (None: all of them).
    """
    out = []
    for p in range(parts):
        d = torch.arange(hd) if dims is None else torch.tensor(list(dims[p]), dtype=torch.long)
        base = torch.tensor(list(kept), dtype=torch.long)[:, None] * hd + d  # (kept, dims)
        out.append(base.flatten() + p * heads * hd)
    return torch.cat(out)


def _check_kept(kind: str, site: int, kept, total: int) -> list[int]:
    kept = sorted(set(int(i) for i in kept))
    if not kept:
        raise ConfigError([f"{kind}[{site}]: keeps no unit; at least one must stay"], "slice spec")
    if kept[0] < 0 or kept[-1] >= total:
        raise ConfigError([f"{kind}[{site}]: indices must be in 0..{total - 1}, got {kept}"],
                          "slice spec")
    return kept


def bias_name(model: nn.Module, name: str, size: int) -> str | None:
    """The 1-D parameter of ``size`` beside weight ``name`` on its owner (its bias), or None."""
    owner, _, attr = name.rpartition(".")
    for k, p in model.get_submodule(owner)._parameters.items():
        if k != attr and p is not None and p.dim() == 1 and p.shape[0] == size:
            return f"{owner}.{k}" if owner else k
    return None


def _bias_of(s: _Surgeon, name: str) -> torch.Tensor | None:
    """The bias of the outputs of weight ``name``."""
    p = s.param(name)
    b = bias_name(s.model, name, p.shape[s.out_axis(name)] if p.dim() == 2 else p.shape[0])
    return s.param(b) if b else None


def _kv_heads(s: _Surgeon, i: int, site: AttentionSite) -> int:
    if site.fused_qkv:
        return site.heads
    kv_rows = s.param(site.k[0]).shape[s.out_axis(site.k[0])]
    hk = kv_rows // site.head_dim
    if hk < 1 or site.heads % hk:
        raise UnsupportedModelError(f"attention site {i}: key projection width {kv_rows} is "
                                    f"not a divisor group of {site.heads} heads x {site.head_dim}")
    return hk


def _slice_attention(s: _Surgeon, model: nn.Module, i: int, site: AttentionSite, kept: list[int],
                     dims: tuple[list[int], list[int]] | None, choice: tuple[int, ...],
                     fold: bool) -> None:
    """Slice attention site ``i`` (``site``) of ``model`` through the surgeon ``s``.

    Args:
        s: The surgeon holding ``model``'s parameters.
        model: The model being sliced.
        i: Site index (for messages).
        site: The site.
        kept: Kept (query) heads.
        dims: Kept (q/k, v) dims of every head, None for all.
        choice: Per candidate attribute (:func:`_attr_cands` order), which new value it gets
            (an index past its options: left as it is).
        fold: Multiply the kept query rows by ``sqrt(d'/d)`` (the forward recomputes the scale).
    """
    h, hd = site.heads, site.head_dim
    qk, vd = dims if dims is not None else (list(range(hd)), list(range(hd)))
    mod = model.get_submodule(site.module) if site.module else model
    if isinstance(mod, nn.MultiheadAttention):
        if dims is not None:
            raise UnsupportedModelError(
                f"attention site {i} ({site.module}): nn.MultiheadAttention has one head_dim for "
                "q, k and v and a fused kernel; its head dimensions cannot be cut (heads can)")
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
            s.cut(w, s.out_axis(w), _rows(3, h, hd, kept, (qk, qk, vd)), rows)
        hk, kept_kv = h, kept
    else:
        hk = _kv_heads(s, i, site)
        rep = h // hk
        kept_kv = sorted({j // rep for j in kept})
        if rep > 1 and sorted(kept) != [g * rep + r for g in kept_kv for r in range(rep)]:
            raise ConfigError([f"heads[{i}]: grouped-query attention ({h} query heads share "
                               f"{hk} key/value heads): keep whole groups of {rep}, got {kept}"],
                              "slice spec")
        for w in site.q:
            s.cut(w, s.out_axis(w), _rows(1, h, hd, kept, (qk,)), h * hd)
        for w in site.k:
            s.cut(w, s.out_axis(w), _rows(1, hk, hd, kept_kv, (qk,)), hk * hd)
        for w in site.v:
            s.cut(w, s.out_axis(w), _rows(1, hk, hd, kept_kv, (vd,)), hk * hd)
    for w in site.out:
        s.cut(w, 1 - s.out_axis(w), _rows(1, h, hd, kept, (vd,)), h * hd)
    if fold and len(qk) != hd:
        f = math.sqrt(len(qk) / hd)
        for w in site.q:
            p, ax = s.param(w), s.out_axis(w)
            n = len(kept) * len(qk) if site.fused_qkv else p.shape[ax]
            p.narrow(ax, 0, n).mul_(f)
            b = _bias_of(s, w)
            if b is not None:
                b[:n].mul_(f)
    cands = _attr_cands(mod, site, hk, len(kept), len(kept_kv), len(qk), len(vd))
    for j, (attr, opts) in enumerate(cands):
        c = choice[j] if j < len(choice) else 0
        if c < len(opts):
            setattr(mod, attr, opts[c])


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
    parts = site.fc1_parts  # gate and up in one Linear: the same units of each half
    rows = torch.cat([idx + k * site.hidden for k in range(parts)])
    for w in site.fc1:
        s.cut(w, s.out_axis(w), rows, site.hidden * parts)
    for w in site.channelwise:  # depthwise convs between fc1 and fc2: (C, 1, *kernel)
        c = s.param(w).shape[0]
        s.cut(w, 0, rows if c == site.hidden * parts else idx, c)  # its bias and sizes too
    s.cut(site.fc2, 1 - s.out_axis(site.fc2), idx, site.hidden)


# ---------------------------------------------------------------------------------------------
# checking


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
    for i, (qk, vd) in spec.dims.items():
        site = structure.attention[i]
        h, hd = site.heads, site.head_dim
        drop_qk = sorted(set(range(hd)) - set(qk))
        drop_v = sorted(set(range(hd)) - set(vd))
        if drop_qk:  # a zero query dim adds nothing to the scores (k's dim is then irrelevant)
            rows = _rows(1, h, hd, range(h), (drop_qk,))
            for w in site.q:
                s.param(w).index_fill_(s.out_axis(w), rows, 0)
                b = _bias_of(s, w)
                if b is not None:
                    b.index_fill_(0, rows, 0)
        if drop_v:
            for w in site.out:
                s.param(w).index_fill_(1 - s.out_axis(w), _rows(1, h, hd, range(h), (drop_v,)), 0)
    for i, kept in spec.mlp.items():
        site = structure.mlps[i]
        drop = torch.tensor(sorted(set(range(site.hidden)) - set(kept)), dtype=torch.long)
        if len(drop):
            s.param(site.fc2).index_fill_(1 - s.out_axis(site.fc2), drop, 0)
    return ref


@torch.no_grad()
def compare(model: nn.Module, ref: nn.Module, inputs: dict, seed: int = 0) -> str | None:
    """``None`` when ``model(**inputs)`` matches ``ref(**inputs)`` (relative error < 1e-4).

    Every output (:func:`~slimformer.models.outputs.leaves`) is compared. Both forwards run on a
    forked RNG seeded with ``seed``, so a model that samples in ``forward`` (random patch
    dropout, ``torch.randperm``) draws the same numbers in both and the caller's RNG is untouched.
    """
    from slimformer.models.outputs import leaves, seeded_forward

    model.eval()
    ref.eval()
    try:
        got = leaves(seeded_forward(model, inputs, seed))
    except Exception as e:  # noqa: BLE001 - any failure of the sliced forward is the finding
        return f"the sliced forward failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    want = leaves(seeded_forward(ref, inputs, seed))
    if list(got) != list(want):
        return f"the sliced model returns outputs {list(got)}, the original {list(want)}"
    for k, b in want.items():
        a = got[k]
        if a.shape != b.shape:
            return f"output {k} has shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        if not b.is_floating_point():
            if not torch.equal(a, b):
                return f"output {k} differs from the masked original"
            continue
        err = float((a - b).norm() / b.norm().clamp_min(1e-12))
        if not err < 1e-4:
            return f"output {k} differs from the masked original (relative error {err:.2e})"
    return None


# ---------------------------------------------------------------------------------------------
# public API


def slice_model(model: nn.Module, structure: StructureMap, spec: SliceSpec,
                inplace: bool = False, check_inputs: dict | None = None) -> nn.Module:
    """Return ``model`` with only the kept heads, head dims and MLP units: smaller weight tensors.

    Args:
        model: The model ``structure`` was discovered on.
        structure: Its :class:`StructureMap`.
        spec: Kept units per site; sites not named are kept whole.
        inplace: Slice ``model`` itself (else a deep copy).
        check_inputs: Example inputs; when given, the sliced model must reproduce the original
            with the pruned units zeroed (relative error < 1e-4), else
            :class:`UnsupportedModelError` says which forward could not take the new sizes.
            Required when ``spec.dims`` cuts head dimensions.

    Raises:
        ConfigError: A site index or unit index out of range, a site keeping nothing, grouped
            heads cut across a group, head dims cut without ``check_inputs``.
        UnsupportedModelError: The projections of a site cannot be cut, or the check failed.
    """
    n_att = len(structure.attention)
    problems = [f"{kind}[{i}]: no attention site {i}; the model has {n_att}"
                for kind, table in (("heads", spec.heads), ("dims", spec.dims))
                for i in table if not 0 <= i < n_att]
    problems += [f"mlp[{i}]: no MLP site {i}; the model has {len(structure.mlps)}"
                 for i in spec.mlp if not 0 <= i < len(structure.mlps)]
    if problems:
        raise ConfigError(problems, "slice spec")
    heads = {i: _check_kept("heads", i, k, structure.attention[i].heads)
             for i, k in spec.heads.items()}
    mlp = {i: _check_kept("mlp", i, k, structure.mlps[i].hidden) for i, k in spec.mlp.items()}
    dims = {i: (_check_kept("dims.qk", i, qk, structure.attention[i].head_dim),
                _check_kept("dims.v", i, vd, structure.attention[i].head_dim))
            for i, (qk, vd) in spec.dims.items()}
    heads = {i: k for i, k in heads.items() if len(k) < structure.attention[i].heads}
    mlp = {i: k for i, k in mlp.items() if len(k) < structure.mlps[i].hidden}
    dims = {i: d for i, d in dims.items()
            if min(len(d[0]), len(d[1])) < structure.attention[i].head_dim}
    if dims and check_inputs is None:
        raise ConfigError(["dims: cutting head dimensions needs check_inputs (example inputs): "
                           "which size attributes change and whether the scores' scale is "
                           "recomputed is decided by checking against the masked original"],
                          "slice spec")
    sites = sorted(set(heads) | set(dims))

    refs: dict = {}  # masked originals, built once per set of sites

    def attempt(ways: dict, only: list[int] | None, inputs) -> tuple[nn.Module, str | None]:
        """Slice (sites ``only``, else everything) with ``ways[module type]``; check it."""
        part = sites if only is None else only
        out = model if inplace and inputs is None else copy.deepcopy(model)
        s = _Surgeon(out, structure)
        with torch.no_grad():
            for i in part:
                site = structure.attention[i]
                choice, fold = ways.get(_kind(model, site), ((), False))
                _slice_attention(s, out, i, site, heads.get(i, list(range(site.heads))),
                                 dims.get(i), choice, fold)
            for i, kept in (mlp.items() if only is None else ()):
                _slice_mlp(s, structure.mlps[i], kept)
        if inputs is None:
            return out, None
        key = None if only is None else tuple(only)
        if key not in refs:
            sub = spec if only is None else SliceSpec({i: heads[i] for i in part if i in heads},
                                                      {}, {i: dims[i] for i in part if i in dims})
            refs[key] = masked_reference(model, structure, sub)
        return out, compare(out, refs[key], inputs)

    if check_inputs is None:
        return attempt({}, None, None)[0]
    # each kind of attention module (towers may differ) gets the first way that reproduces
    # the masked original, tried with only its own sites cut
    ways, why, out = {}, None, None
    by_kind: dict[type, list[int]] = {}
    for i in sites:
        by_kind.setdefault(_kind(model, structure.attention[i]), []).append(i)
    for kind, part in by_kind.items():
        trials = _trials(model, structure, part, heads, dims)
        for way in trials:
            out, why = attempt({kind: way}, part if len(by_kind) > 1 else None, check_inputs)
            if why is None:
                ways[kind] = way
                break
        else:
            where = ", ".join(f"attention {i} ({structure.attention[i].module or 'root'})"
                              for i in part)
            raise UnsupportedModelError(
                f"cannot slice this model ({where}): {why}. The weights were cut, but the "
                "model's forward does not adapt to fewer heads/units (e.g. it reshapes the "
                "attention output to a width read from its input instead of -1); tried "
                f"{len(trials)} way(s) of updating the size attributes found by value")
    if len(by_kind) != 1:  # one kind: its checked trial already cut everything
        out, why = attempt(ways, None, check_inputs)
    if why is not None:
        where = "all sites together" if sites else "MLPs only"
        raise UnsupportedModelError(f"cannot slice this model ({where}): {why}. The weights "
                                    "were cut, but the forward does not adapt to the new sizes")
    return _adopt(model, out) if inplace else out


def _kind(model: nn.Module, site: AttentionSite) -> type:
    return type(model.get_submodule(site.module) if site.module else model)


def _attr_cands(mod: nn.Module, site: AttentionSite, hk: int, nh: int, nhk: int, dqk: int,
                dv: int) -> list[tuple[str, list[int]]]:
    """Integer attributes of the attention module holding a size that changes, with its options.

    Sizes: head counts, head_dim, heads x head_dim (the q/k and the v sizes may differ).
    """
    h, hd = site.heads, site.head_dim
    new: dict[int, list[int]] = {}
    for old, vals in ((h, [nh]), (hk, [nhk]), (h * hd, [nh * dqk, nh * dv]),
                      (hk * hd, [nhk * dqk, nhk * dv]), (hd, [dqk, dv])):
        opts = new.setdefault(old, [])
        opts.extend(v for v in vals if v != old and v not in opts)
    return [(a, new[v]) for a, v in vars(mod).items() if type(v) is int and new.get(v)]


MAX_TRIALS = 64


def _trials(model: nn.Module, structure: StructureMap, sites: list[int], heads: Mapping,
            dims: Mapping) -> list[tuple[tuple[int, ...], bool]]:
    """Ways to update the size attributes: ``(choice per candidate position, fold)``.

    The first is the natural one (every candidate takes its first new value, no fold); the
    last option of each position leaves the attribute as it is.
    """
    n_opts: list[int] = []
    for i in sites:
        site = structure.attention[i]
        mod = model.get_submodule(site.module) if site.module else model
        g = _group(model, structure, i)
        nh = len(heads.get(i, range(site.heads)))
        qk, vd = dims.get(i, (range(site.head_dim), range(site.head_dim)))
        for j, (_, opts) in enumerate(_attr_cands(mod, site, site.heads // g, nh, max(1, nh // g),
                                                  len(qk), len(vd))):
            if j == len(n_opts):
                n_opts.append(1)
            n_opts[j] = max(n_opts[j], len(opts) + 1)
    folds = (False, True) if any(len(dims[i][0]) < structure.attention[i].head_dim
                                 for i in dims) else (False,)
    choices = list(itertools.islice(itertools.product(*[range(n) for n in n_opts]),
                                    MAX_TRIALS // len(folds)))
    return [(c, f) for f in folds for c in choices]


def _adopt(model: nn.Module, sliced: nn.Module) -> nn.Module:
    """Make ``model`` (the caller's object) become ``sliced``."""
    model.__dict__.update(sliced.__dict__)
    return model


def sliceable(model: nn.Module, structure: StructureMap, inputs: dict,
              kinds=("heads", "mlp")) -> dict[str, dict[int, str]]:
    """Which sites can be sliced: ``{kind: {site: reason}}`` of the failures, per kind asked.

    Kinds: ``heads``, ``mlp``, ``dims``. Tries removing one unit of every site at once (one
    forward); only when that fails is each site tried alone. For ``dims`` the result also holds
    ``"dims_mode": {site: "separate" | "joint"}``: whether v may keep other dims than q/k.
    """
    out: dict[str, dict[int, str]] = {k: {} for k in kinds}
    cands, mcands, dcands = {}, {}, {}
    for i, a in enumerate(structure.attention):
        step = _group(model, structure, i)
        if a.mixers:
            out.setdefault("heads", {})[i] = (
                f"its scores are mixed across heads by {', '.join(a.mixers)} (talking heads): "
                "every head feeds every other, so no head can be removed alone")
        elif a.heads <= step:
            out.setdefault("heads", {})[i] = (f"has {a.heads} head(s) in groups of {step}: "
                                              "nothing to remove")
        else:
            cands[i] = tuple(range(a.heads - step))
        mod = model.get_submodule(a.module) if a.module else model
        if isinstance(mod, nn.MultiheadAttention):
            out.setdefault("dims", {})[i] = ("nn.MultiheadAttention: one head_dim for q, k and v "
                                             "and a fused kernel; its head dims cannot be cut")
        elif a.head_dim < 2:
            out.setdefault("dims", {})[i] = "head_dim 1: nothing to remove"
        else:
            dcands[i] = a.head_dim
    mcands = {i: tuple(range(m.hidden - 1)) for i, m in enumerate(structure.mlps) if m.hidden > 1}

    def ok(spec: SliceSpec) -> str | None:
        try:
            slice_model(model, structure, spec, check_inputs=inputs)
        except (UnsupportedModelError, ConfigError) as e:
            return str(e)
        return None

    for kind, table in (("heads", cands), ("mlp", mcands)):
        if kind not in kinds or not table:
            continue
        def spec(d, kind=kind):
            return SliceSpec(heads=d) if kind == "heads" else SliceSpec(mlp=d)
        if ok(spec(table)) is None:
            continue
        for i, kept in table.items():
            why = ok(spec({i: kept}))
            if why is not None:
                out[kind][i] = why
    if "dims" in kinds:
        out["dims_mode"] = {}
    if "dims" in kinds and dcands:
        alld = {i: tuple(range(hd)) for i, hd in dcands.items()}
        # v keeps one dim more than q/k: only a forward that takes unequal sizes passes
        sep = {i: (alld[i][2:], alld[i][1:]) for i in dcands if dcands[i] > 2}
        joint = {i: (alld[i][1:], alld[i][1:]) for i in dcands}
        for mode, table in (("separate", sep), ("joint", joint)):
            if len(table) == len(dcands) and ok(SliceSpec(dims=table)) is None:
                out["dims_mode"] = dict.fromkeys(dcands, mode)
                break
        else:
            for i in dcands:
                if i in sep and ok(SliceSpec(dims={i: sep[i]})) is None:
                    out["dims_mode"][i] = "separate"
                    continue
                why = ok(SliceSpec(dims={i: joint[i]}))
                if why is None:
                    out["dims_mode"][i] = "joint"
                else:
                    out["dims"][i] = why
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
