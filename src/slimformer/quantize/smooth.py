"""SmoothQuant: activation-to-weight scale migration, folded into the float model.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models" (2023). A few input channels of a Linear can carry activations far larger than the rest;
a per-tensor activation quantizer then spends its grid on them. Dividing input channel ``j`` by
``s_j = max|X_j|^a / max|W_j|^(1-a)`` and multiplying weight column ``j`` by ``s_j`` keeps
``X W^T`` and moves the range into the weights (quantized per output channel). The division is
folded into what produces ``X``, so nothing is added at inference:

- ``norm``: a norm whose every consumer is a Linear (pre-norm q/k/v, gate/up): gain and shift
  ``/ s`` (:func:`~slimformer.quantize.awq.fold`);
- ``mlp``: a gated MLP's down projection reads ``act(gate) * up``: the up projection's output rows
  (and bias) ``/ s``; an MLP whose activation is positively homogeneous (ReLU): fc1's rows;
- ``attention``: the output projection reads ``P V`` per head: the value projection's rows ``/ s``
  (grouped-query attention: one scale per value channel, shared by the heads that read it).

Sites are found from the :class:`~slimformer.models.structure.StructureMap`, never by names.
Per site the strength ``a`` is chosen from ``config.smooth_alphas`` by the local error of the
site's Linears quantized as the config says (per-channel weights at their bits, per-tensor
min/max activations over every calibration row, the config's symmetric setting) on a sample of
calibration rows; no migration (``off``) stays unless a scale lowers that error by 5%. Each
kind of fold is then checked on two calibration rows (the float model's outputs within
:data:`PRESERVED_DB`) and undone where it does not hold (noted): which fc1 half of a gated MLP
is the linear one (``up``) is found that way.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from slimformer.quantize.quantizers import (
    dynamic_params,
    fake_uniform,
    symmetric_params,
    uniform_params,
)
from slimformer.quantize.state import shared_params

ROWS = 512  # calibration rows sampled per site for the local error
PRESERVED_DB = 60.0  # a fold must keep the float outputs at least this close (SQNR)
HOMOGENEOUS = {"relu", "leaky_relu"}  # act(x / s) == act(x) / s for s > 0


@dataclass
class _Site:
    """One input shared by Linears, and where a per-channel division of it can be folded.

    ``producers``: alternatives for ``(LinearQuant, first row, rows)`` whose output rows feed
    the input (tried in order, kept where the float outputs hold); ``index``: consumer input
    column -> producer row (grouped-query attention), None for the identity.
    """

    kind: str  # "norm" | "mlp" | "attention"
    name: str
    consumers: list
    norm: object = None
    producers: list = field(default_factory=list)
    index: torch.Tensor | None = None
    mx: torch.Tensor | None = None  # (C,) per consumer input channel, over every row
    mn: torch.Tensor | None = None  # (C,)
    rows: torch.Tensor | None = None  # (n, C) sampled rows
    scale: torch.Tensor | None = None  # (C,) chosen s, per consumer input column
    alpha: float = 0.0
    gain: float = 1.0  # local error with s / without


def migrate(model: torch.nn.Module, structure, data, config, choices: list | None = None,
            tick=None) -> list[str]:
    """Fold SmoothQuant scales into ``model`` (float, in place) where they lower the error; notes.

    Args:
        model: The float model (its weights change; its function does not).
        structure: Its :class:`~slimformer.models.structure.StructureMap`.
        data: Calibration rows (``({name: tensor}, label)`` items).
        config: The :class:`~slimformer.quantize.config.QuantConfig` (bits, symmetric, alphas).
        choices: Receives one :class:`~slimformer.quantize.holdout.SiteChoice` per site.
        tick: ``tick(step, done, total)`` progress callback.
    """
    from slimformer.quantize.build import build

    tick = tick or (lambda *a: None)
    probe = config.model_copy(update={"weight_only": True, "method": "minmax", "awq": False,
                                      "group_size": None, "act_order": False,
                                      "embedding_bits": None, "float_activations": [],
                                      "head_bits": None})  # the weights' bits as configured
    qmodel = build(model, structure, probe)  # wraps only: the model's weights are not changed
    sites, skipped = _sites(model, structure, qmodel)
    if not sites:
        return ["smooth: no site where a scale can be folded exactly (" +
                ("; ".join(f"{v} {k}" for k, v in skipped.items()) or "no Linear") + ")"]
    batches = _inputs(model, data, config)
    try:
        _observe(qmodel, sites, batches, config.seed, tick)
    except _NonFinite:  # calibration then names the first quantized layer where they appear
        return ["smooth: not applied: NaN or inf in the calibration activations"]
    tick("smooth", 0, len(sites))
    for i, site in enumerate(sites):
        _choose(site, config, choices)
        tick("smooth", i + 1, len(sites))
    chosen = [s for s in sites if s.alpha > 0]
    notes = _fold_checked(model, chosen, batches[0], qmodel)
    done = [s for s in chosen if s.alpha > 0]
    by_kind = Counter(s.kind for s in done)
    total = Counter(s.kind for s in sites)
    alphas = Counter(s.alpha for s in done)
    head = (f"smooth (SmoothQuant migration, folded): {len(done)} of {len(sites)} sites migrated ("
            + ", ".join(f"{k} {by_kind[k]}/{total[k]}" for k in ("norm", "mlp", "attention")
                        if total[k]) + ")")
    if done:
        gains = sorted(s.gain for s in done)
        head += ("; alpha " + ", ".join(f"{a:g} x{n}" for a, n in sorted(alphas.items())) +
                 f"; their local output error {gains[len(gains) // 2]:.2f}x (median, "
                 f"{gains[0]:.2f}x best) of no migration")
    notes.insert(0, head)
    if skipped:
        notes.append("smooth: left alone: " + "; ".join(f"{v} {k}" for k, v in skipped.items()))
    return notes


# ------------------------------------------------------------------------------------- sites


def _sites(model, smap, qmodel) -> tuple[list[_Site], Counter]:
    """Every site whose division can be folded exactly, and why the others cannot."""
    lqs = {lq.name: lq for lq in qmodel.quant.linears.values()}
    tied = shared_params(model)
    calls = {r.weight: r.calls for r in smap.linears}
    convs = {f"{c}.weight" for c in smap.convs}
    skipped: Counter = Counter()

    def plain(names) -> list | None:  # quantized 2-D Linears run once, weights not shared
        got = [lqs.get(n) for n in names]
        if not got or any(lq is None or lq.axis is not None or lq.name in convs or
                          calls.get(lq.name, 1) != 1 or id(lq.param[0]) in tied
                          for lq in got):
            return None
        return got

    sites = []
    for n in smap.norms:
        users = plain(n.linears)
        if not n.foldable:
            skipped["norms whose output also feeds " + "/".join(n.other_consumers[:2])] += 1
        elif users is None or not n.weight or smap.executions.get(n.module, 1) != 1:
            skipped["norms without a gain or with shared / float / batched Linears"] += 1
        else:
            sites.append(_Site("norm", n.module, users, norm=n))
    for m in smap.mlps:
        down, fc1 = plain([m.fc2]), plain(m.fc1)
        if down is None or fc1 is None or m.channelwise:
            skipped["MLPs with shared / float / conv Linears"] += 1
            continue
        hidden = down[0].full_matrix().shape[1]
        if m.gated and m.fc1_parts == 2:  # gate, up = fc1(x).chunk(2): up is one half
            prods = [(fc1[0], hidden, hidden), (fc1[0], 0, hidden)]
        elif m.gated and len(fc1) == 2:
            prods = [(fc1[1], 0, hidden), (fc1[0], 0, hidden)]
        elif not m.gated and len(fc1) == 1 and set(m.activation) <= HOMOGENEOUS:
            prods = [(fc1[0], 0, hidden)]
        else:
            skipped[f"MLPs after {'/'.join(m.activation)} (not positively homogeneous)"] += 1
            continue
        sites.append(_Site("mlp", m.fc2, down, producers=prods))
    for a in smap.attention:
        v, o = plain(a.v), plain(a.out)
        if a.kind == "mha" or a.fused_qkv or v is None or o is None or len(v) != 1 or \
                len(o) != 1:
            skipped["attention sites with fused / shared / packed value projections"] += 1
            continue
        index = _head_index(v[0].full_matrix().shape[0], o[0].full_matrix().shape[1], a)
        if index is None:
            skipped["attention sites whose value width does not map to the output's"] += 1
            continue
        cv = v[0].full_matrix().shape[0]
        sites.append(_Site("attention", a.out[0], o, producers=[(v[0], 0, cv)], index=index))
    return sites, skipped


def _head_index(cv: int, co: int, site) -> torch.Tensor | None:
    """Output-projection column -> value channel: identity, or grouped-query heads (``(co,)``)."""
    if cv == co:
        return torch.arange(co)
    d = site.head_dim
    if not d or co % cv or co != site.heads * d or cv % d:
        return None
    group = co // cv  # query heads per key/value head
    col = torch.arange(co)
    return (col // d) // group * d + col % d


# ----------------------------------------------------------------------------- observation


def _inputs(model, data, config) -> list[dict]:
    from slimformer.quantize.capture import batches

    out = list(batches(data, config.calib_batch_size, config.calib_samples))
    if "use_cache" in inspect.signature(model.forward).parameters:
        out = [{**b, "use_cache": False} for b in out]  # no KV cache (it holds the values)
    return out


class _NonFinite(Exception):
    """NaN or inf in a site's calibration input (left to calibration to report)."""


@torch.no_grad()
def _observe(qmodel, sites: list[_Site], batches: list[dict], seed: int, tick) -> None:
    """Per site: per-channel min/max of its input over every row, and ``ROWS`` sampled rows."""
    from slimformer.quantize.capture import real_positions

    current: list[dict] = [{}]
    gen = torch.Generator().manual_seed(seed)
    for lq in qmodel.quant.linears.values():
        lq.mode = "float"
    for site in sites:
        lq = site.consumers[0]

        def grab(x, site=site, lq=lq):
            flat = real_positions(x, current[0]).detach().reshape(-1, x.shape[-1]).float()
            if not torch.isfinite(flat).all():
                raise _NonFinite
            mx, mn = flat.amax(0), flat.amin(0)
            site.mx = mx if site.mx is None else torch.maximum(site.mx, mx)
            site.mn = mn if site.mn is None else torch.minimum(site.mn, mn)
            take = flat[torch.randperm(len(flat), generator=gen)[:ROWS]]
            rows = take if site.rows is None else torch.cat([site.rows, take])
            if len(rows) > 2 * ROWS:
                rows = rows[torch.randperm(len(rows), generator=gen)[:ROWS]]
            site.rows = rows
            return lq.act(x)

        lq.act_in = grab
    try:
        qmodel.quant.set_mode("float")
        for i, b in enumerate(batches):
            tick("smooth: observing the rows", i, len(batches))
            current[0] = b
            qmodel(**b)
        tick("smooth: observing the rows", len(batches), len(batches))
    finally:
        for site in sites:
            del site.consumers[0].act_in  # back to the class method
    for site in sites:
        if site.rows is not None and len(site.rows) > ROWS:
            site.rows = site.rows[torch.randperm(len(site.rows), generator=gen)[:ROWS]]


# ------------------------------------------------------------------------------------ choice


def _scale(site: _Site, alpha: float) -> torch.Tensor:
    """``s (C,)`` per consumer input column: ``max|X|^a / max|W|^(1-a)`` (per producer channel)."""
    amax = torch.maximum(site.mx.abs(), site.mn.abs())  # (C,)
    wmax = torch.stack([lq.full_matrix().detach().float().abs().amax(0)
                        for lq in site.consumers]).amax(0)  # (C,)
    if site.index is not None:  # one scale per value channel, shared by the heads reading it
        n = int(site.index.max()) + 1
        amax = torch.zeros(n).scatter_reduce(0, site.index, amax, "amax")
        wmax = torch.zeros(n).scatter_reduce(0, site.index, wmax, "amax")
    s = amax.clamp_min(1e-5).pow(alpha) / wmax.clamp_min(1e-5).pow(1 - alpha)
    s = torch.where(amax > 0, s.clamp(1e-5, 1e5), torch.ones_like(s))
    return s[site.index] if site.index is not None else s


@torch.no_grad()
def _local_error(site: _Site, s: torch.Tensor | None, symmetric: bool,
                 per_token: bool = False) -> float:
    """Sum over the site's Linears of ``||Q(X / s) Q(W s)^T - X W^T||^2 / ||X W^T||^2``.

    ``per_token``: ``Q`` of ``X / s`` on each row's own range (``act_dynamic: token``).
    """
    x = site.rows  # (n, C)
    one = torch.ones_like(site.mx)
    s = one if s is None else s
    lo, hi = (site.mn / s).min().reshape(1), (site.mx / s).max().reshape(1)
    total = 0.0
    for lq in site.consumers:
        params = symmetric_params if symmetric else uniform_params
        xs, zs = params(lo, hi, lq.act.bits)
        if per_token:
            xs, zs = dynamic_params(x / s, lq.act.bits, per_token=True)  # (n, 1) each
        xq = fake_uniform(x / s, xs, zs, lq.act.bits)  # (n, C)
        w = lq.full_matrix().detach().float()  # (out, C)
        ws = w * s
        wsc, wz = params(ws.amin(1, keepdim=True), ws.amax(1, keepdim=True), lq.wq.bits)
        wq = fake_uniform(ws, wsc, wz, lq.wq.bits)  # (out, C)
        y = x @ w.t()  # (n, out)
        total += float(((xq @ wq.t() - y) ** 2).sum() / (y ** 2).sum().clamp_min(1e-30))
    return total


def _choose(site: _Site, config, choices: list | None) -> None:
    """The site's alpha (0: no migration) by its local error; recorded in ``choices``."""
    from slimformer.quantize.holdout import MARGIN, SiteChoice

    if site.rows is None or not len(site.rows):
        return
    token = config.act_dynamic == "token"
    errs = {"off": _local_error(site, None, config.symmetric, token)}
    scales = {}
    for a in config.smooth_alphas:
        scales[a] = _scale(site, a)
        errs[f"{a:g}"] = _local_error(site, scales[a], config.symmetric, token)
    best = min(scales, key=lambda a: errs[f"{a:g}"])
    if errs[f"{best:g}"] < MARGIN * errs["off"]:
        site.alpha, site.scale = best, scales[best]
        site.gain = errs[f"{best:g}"] / errs["off"] if errs["off"] > 0 else 1.0
    if choices is not None:
        kept = f"{site.alpha:g}" if site.alpha else "off"
        why = "" if site.alpha else f"; no alpha {100 * (1 - MARGIN):.0f}% below off"
        choices.append(SiteChoice(f"smooth:{site.name}", "smoothing", errs, kept,
                                  f" ({site.kind}{why})"))


# -------------------------------------------------------------------------------------- fold


@torch.no_grad()
def _fold_checked(model, sites: list[_Site], batch: dict, qmodel) -> list[str]:
    """Fold every chosen site, one kind at a time, undoing a kind that changes the float model."""
    from slimformer.quantize.repq import _bias_of

    notes = []
    probe = {k: v[:2] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}
    ref = _leaves(model, probe)
    for kind in ("norm", "mlp", "attention"):
        todo = [s for s in sites if s.kind == kind]
        if not todo:
            continue
        db = -math.inf
        for t in range(max(1, *(len(s.producers) for s in todo))):
            saved = _save(model, todo, t, qmodel)
            ok = all(_fold(model, s, t, _bias_of) for s in todo)
            db = _sqnr(ref, _leaves(model, probe)) if ok else -math.inf
            if db >= PRESERVED_DB:
                break
            _restore(saved)
        else:
            for s in todo:
                s.alpha = 0.0
            notes.append(f"smooth: {len(todo)} {kind} site(s) not folded: the float outputs "
                         f"moved ({db:.1f} dB < {PRESERVED_DB:g} dB on 2 rows); undone")
    for lq in qmodel.quant.linears.values():
        lq._cache = None
    return notes


def _params(model, site: _Site, t: int, bias_of) -> list[torch.Tensor]:
    ps = [lq.param[0] for lq in site.consumers]
    if site.norm is not None:
        named = dict(model.named_parameters())
        ps += [named[n] for n in (site.norm.weight, site.norm.bias) if n in named]
    if site.producers:
        lq = site.producers[min(t, len(site.producers) - 1)][0]
        ps.append(lq.param[0])
        b = bias_of(model, lq)
        if b is not None:
            ps.append(b)
    return ps


def _save(model, sites: list[_Site], t: int, qmodel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from slimformer.quantize.repq import _bias_of

    seen: dict[int, tuple] = {}
    for s in sites:
        for p in _params(model, s, t, _bias_of):
            seen.setdefault(id(p), (p, p.detach().clone()))
    return list(seen.values())


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for p, v in saved:
        p.data.copy_(v)


def _fold(model, site: _Site, t: int, bias_of) -> bool:
    """Divide the site's input by ``site.scale`` where it is produced, multiply the columns."""
    from slimformer.quantize.awq import fold

    s = site.scale
    if site.norm is not None:
        return fold(model, site.norm, site.consumers, s)
    lq, first, n = site.producers[min(t, len(site.producers) - 1)]
    sv = s if site.index is None else torch.ones(n).index_copy(0, site.index, s)
    rows = lq.full_matrix()[first:first + n]  # (n, in) view of the producer's weight
    rows.div_(sv.to(rows.dtype)[:, None])
    b = bias_of(model, lq)
    if b is not None:
        b[first:first + n].div_(sv.to(b.dtype))
    for c in site.consumers:
        c.full_matrix().mul_(s.to(c.param[0].dtype))  # columns, in place on the parameter
    return True


def _leaves(model, inputs: dict) -> dict[str, torch.Tensor]:
    from slimformer.models.outputs import leaves

    return {k: v.detach().clone() for k, v in leaves(model(**inputs)).items()
            if v.is_floating_point()}


def _sqnr(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    """SQNR (dB) of every floating output together; -inf when the outputs differ in form."""
    if ref.keys() != got.keys() or any(ref[k].shape != got[k].shape for k in ref):
        return -math.inf
    from slimformer.quantize.check import power_sums

    sums = [power_sums(r, got[k]) for k, r in ref.items()]  # float64 in chunks: no copy
    sig, err = sum(s for s, _ in sums), sum(e for _, e in sums)
    return math.inf if err == 0 else 10 * math.log10(max(sig, 1e-300) / err)
