"""Build the quantizers of a model from its structure map and a config (no calibration yet)."""

from __future__ import annotations

import fnmatch

from torch import nn

from slimformer.errors import ConfigError, UnsupportedModelError
from slimformer.quantize.act import ActQuantizer, ProbQuantizer
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.coverage import KEEP_FLOAT, weight_coverage
from slimformer.quantize.quantizers import WeightQuantizer
from slimformer.quantize.repq import folds_into_norm
from slimformer.quantize.state import (
    AttentionQuant,
    EmbeddingQuant,
    LinearQuant,
    QuantizedModel,
    QuantState,
    check_patterns,
    key_of,
    match_override,
    shared_params,
)


def _reparameterizable(model: nn.Module, params: dict, names: list[str]) -> set[str]:
    """The weights RepQ may rescale in place.

    Used by no other op (a tied embedding table would change with them) and owned by a layer that
    has a bias or is an ``nn.Linear`` (one is added for the zero-point shift).
    """
    shared = shared_params(model)
    ok = set()
    for name in names:
        p = params.get(name)
        if p is None or id(p) in shared:
            continue
        path, _, attr = name.rpartition(".")
        owner = model.get_submodule(path)
        bias = "in_proj_bias" if attr == "in_proj_weight" else "bias"
        if isinstance(owner, nn.Linear) or isinstance(getattr(owner, bias, None), nn.Parameter):
            ok.add(name)
    return ok


def build(model: nn.Module, smap, config: QuantConfig) -> QuantizedModel:
    """Wrap ``model`` with (uncalibrated) quantizers for every Linear, conv and attention site."""
    params = dict(model.named_parameters())
    convs = {f"{c}.weight" for c in smap.convs}
    batched = {b.weight: b for b in getattr(smap, "batched", [])}
    # nn.MultiheadAttention: packed in_proj (or separate q/k/v) and out_proj, applied inside
    # multi_head_attention_forward (quantized by intercept.mha_forward)
    mha = [w for s in smap.attention if s.kind == "mha" for w in (*s.q, *s.k, *s.v, *s.out)]
    names = list(dict.fromkeys([r.weight for r in smap.linears] + mha + sorted(convs) +
                               list(batched)))
    check_patterns(names, config)
    if config.softmax != "auto" and config.softmax_kind != "none" and not smap.attention:
        raise UnsupportedModelError("the config quantizes attention probabilities (softmax="
                                    f"{config.softmax_kind}) but no attention was found; set "
                                    "softmax: none (or auto) to quantize the Linears only")
    state = QuantState()
    grouped: list[str] = []  # notes of Linears whose group size had to change
    if not smap.attention and not config.weight_only:
        state.notes.append("no attention found: no softmax quantizer built (softmax: "
                           f"{config.softmax}); the Linears are quantized")
    per_channel = config.method in ("repq", "repquant")
    norm_of = {w: n for n in smap.norms for w in n.linears}
    refit = _reparameterizable(model, params, [w for n in smap.norms for w in n.linears] +
                               [m.fc2 for m in smap.mlps]) if per_channel else set()
    fc2s = {m.fc2 for m in smap.mlps}
    shared: dict[str, ActQuantizer] = {}
    refs = {r.weight: r for r in smap.linears}
    heads = _heads(smap, config)
    left: dict[str, str] = {}  # found matmul weights left float -> why
    for name in names:
        if any(fnmatch.fnmatchcase(name, p) for p in config.keep_float):
            state.notes.append(f"{name}: kept in float (keep_float)")
            left[name] = KEEP_FLOAT
            continue
        if name not in params:
            raise UnsupportedModelError(f"weight {name} found in the data flow is not a parameter")
        axis = None
        if name not in convs and params[name].dim() >= 3:
            b = batched.get(name)
            if b is None or b.axis is None:
                why = b.reason if b is not None else "3+-axis weight applied by an op not traced"
                state.notes.append(f"{name}: left float ({why})")
                left[name] = why
                continue
            axis = b.axis
        wbits, abits = match_override(name, config)
        if name in heads and wbits < config.head_bits:
            state.notes.append(f"{name}: the model's output Linear at {config.head_bits}-bit "
                               f"weights, not {wbits} (head_bits)")
            wbits = config.head_bits
        norm = norm_of.get(name) if axis is None else None  # experts: own per-tensor input
        if norm is not None:
            akey = f"norm:{norm.module}:{abits}"
            if akey not in shared:
                pc = per_channel and all(w in refit for w in norm.linears)
                if per_channel and not pc:
                    state.notes.append(f"{norm.module}: per-channel ranges not tried (a "
                                       "consumer weight is shared with another op, or has no "
                                       "bias to take RepQ's zero-point shift)")
                elif pc and config.power_of_two_scales and not folds_into_norm(model, norm):
                    pc = False
                    state.notes.append(f"{norm.module}: per-channel ranges not tried (power-of-"
                                       "two scales are for fixed-point targets, and RepQ's fold "
                                       "here would leave a per-channel affine they cannot apply)")
                shared[akey] = ActQuantizer(akey, abits, per_channel=pc)
                state.acts[key_of(akey)] = shared[akey]
            act = shared[akey]
        else:
            # MLP fc2 inputs (after the activation function) are calibrated per channel too
            # and reparameterized like post-norm ones (repq/repquant)
            # not with power-of-two scales: the affine kept after the activation has no
            # fixed-point form
            act = ActQuantizer(f"in:{name}", abits,
                               per_channel=name in refit and name in fc2s and axis is None
                               and not config.power_of_two_scales)
            state.acts[key_of(f"in:{name}")] = act
        lq = LinearQuant(name, params[name], act, wbits, _transposed(params[name],
                                                                     refs.get(name)), axis)
        if config.group_size is not None:
            lq.group = _group(lq, name in convs, config.group_size, grouped)
        state.linears[key_of(name)] = lq
        state.by_id[id(params[name])] = lq
    state.notes += _same_notes(grouped)
    if config.embedding_bits is not None:
        for mname, mod in model.named_modules():
            if isinstance(mod, nn.Embedding):
                eq = EmbeddingQuant(f"{mname}.weight", mod.weight, config.embedding_bits)
                eq.calibrate()
                state.embeddings[key_of(eq.name)] = eq
                state.emb_by_id[id(mod.weight)] = eq
    state.param_ids = {id(p) for p in model.parameters()}
    state.weight_only = config.weight_only
    for site in [] if config.weight_only else smap.attention:  # weight-only: attention float
        state.has_mha |= site.kind == "mha"
        key = key_of(site.module)
        if key in state.attention:
            raise ConfigError([f"two attention sites in one module {site.module}: not supported"])
        state.attention[key] = aq = AttentionQuant(site.module, config.act_bits,
                                                   config.softmax_kind)
        if config.attention_kind == "float":
            for act in (aq.q_in, aq.k_in, aq.v_in):
                act.keep_float = True
    if smap.attention and not config.weight_only and config.attention_kind == "float":
        state.notes.append(f"attention: {len(smap.attention)} site(s) in float (q, k, v and the "
                           f"probabilities; attention: {config.attention}), the Linears around "
                           "them quantized")
    if config.act_dynamic != "off":  # the Linear inputs; attention inputs stay static
        for act in state.acts.values():
            act.dynamic = config.act_dynamic
        state.notes.append(f"{len(state.acts)} Linear input quantizer(s) with run-time ranges "
                           f"per {config.act_dynamic} (act_dynamic)")
    _float_activations(state, config.float_activations)
    for m in state.modules():
        if isinstance(m, (ActQuantizer, WeightQuantizer, ProbQuantizer)):
            m.symmetric = config.symmetric
        if isinstance(m, (ActQuantizer, WeightQuantizer)):
            m.pow2 = config.power_of_two_scales
    if config.power_of_two_scales or config.symmetric:
        for eq in state.embeddings.values():
            eq.calibrate()
    state.coverage = weight_coverage(model, state, left)
    state.notes.append(state.coverage.summary())
    return QuantizedModel(model, state, config)


def _heads(smap, config: QuantConfig) -> set[str]:
    """Weight-only: the output Linears that ``head_bits`` applies to (no override names them)."""
    if not config.weight_only or config.head_bits is None:
        return set()
    return {r.weight for r in smap.linears if r.output
            and not any(fnmatch.fnmatchcase(r.weight, o.pattern) for o in config.overrides)}


def _float_activations(state: QuantState, patterns: list[str]) -> None:
    """Mark the activation quantizers matching ``patterns`` float (noted); typed if one is unused."""
    if not patterns:
        return
    acts = [m for m in state.modules() if isinstance(m, ActQuantizer)]
    unused = [f"float_activations[{i}]: {p!r} matches no activation quantizer"
              for i, p in enumerate(patterns)
              if not any(fnmatch.fnmatchcase(a.name, p) for a in acts)]
    if unused:
        raise ConfigError([*unused, "(activation quantizers look like: " +
                           ", ".join(a.name for a in acts[:3]) + " ...)"], "quantize config")
    kept = [a for a in acts if any(fnmatch.fnmatchcase(a.name, p) for p in patterns)]
    for a in kept:
        a.keep_float = True
    state.notes.append(f"{len(kept)} activation quantizer(s) kept float (float_activations): " +
                       ", ".join(a.name for a in kept))


def _same_notes(notes: list[str]) -> list[str]:
    """``"<weight>: <what>"`` notes, one per distinct ``<what>``, naming the first and a count."""
    by_what: dict[str, list[str]] = {}
    for n in notes:
        name, _, what = n.partition(": ")
        by_what.setdefault(what, []).append(name)
    return [f"{names[0]}: {what}" + (f" (and {len(names) - 1} more Linear(s) alike)"
                                      if len(names) > 1 else "")
            for what, names in by_what.items()]


def _group(lq: LinearQuant, conv: bool, size: int, notes: list[str]) -> int | None:
    """The Linear's group: ``size``, or a smaller power of two that divides its columns; noted.

    As NNCF's ``ADJUST`` fallback: the largest power of two below ``size`` (at least 8) that
    divides the input columns, else None (per output channel).
    """
    cols = lq.full_matrix().shape[1]
    if conv or lq.axis is not None:
        why = "a convolution" if conv else "a batched weight"
        notes.append(f"{lq.name}: per-output-channel weight ranges, not groups of {size} ({why})")
        return None
    g = size
    while g >= 8 and cols % g:
        g //= 2
    if g != size:
        notes.append(f"{lq.name}: {cols} input columns are not a multiple of {size}: " +
                     (f"groups of {g}" if g >= 8 else "per-output-channel weight ranges"))
    return g if g >= 8 else None


def _transposed(param, ref) -> bool:
    """Whether a 2-D weight is stored ``(in, out)`` (GPT-2 Conv1D), by its shape where it tells.

    ``ref`` (the discovered LinearRef) gives the sizes the op contracted and produced; a square
    weight falls back to the op (``addmm`` / ``matmul`` / ``mm`` take ``(in, out)``).
    """
    if ref is None or param.dim() != 2:
        return False
    io, oi = (ref.in_features, ref.out_features), (ref.out_features, ref.in_features)
    if io != oi and tuple(param.shape) in (io, oi):
        return tuple(param.shape) == io
    return ref.op in ("addmm", "matmul", "mm")
