"""Build the quantizers of a model from its structure map and a config (no calibration yet)."""

from __future__ import annotations

import fnmatch

from torch import nn

from slimformer.errors import ConfigError, UnsupportedModelError
from slimformer.quantize.act import ActQuantizer, ProbQuantizer
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.quantizers import WeightQuantizer
from slimformer.quantize.state import (
    AttentionQuant,
    EmbeddingQuant,
    LinearQuant,
    QuantizedModel,
    QuantState,
    check_patterns,
    key_of,
    match_override,
)


def build(model: nn.Module, smap, config: QuantConfig) -> QuantizedModel:
    """Wrap ``model`` with (uncalibrated) quantizers for every Linear, conv and attention site."""
    params = dict(model.named_parameters())
    names = [r.weight for r in smap.linears] + [f"{c}.weight" for c in smap.convs]
    check_patterns(names, config)
    if config.softmax != "auto" and config.softmax_kind != "none" and not smap.attention:
        raise UnsupportedModelError("the config quantizes attention probabilities (softmax="
                                    f"{config.softmax_kind}) but no attention was found; set "
                                    "softmax: none (or auto) to quantize the Linears only")
    state = QuantState()
    if not smap.attention:
        state.notes.append("no attention found: no softmax quantizer built (softmax: "
                           f"{config.softmax}); the Linears are quantized")
    per_channel = config.method in ("repq", "repquant")
    norm_of = {w: n for n in smap.norms for w in n.linears}
    fc2s = {m.fc2 for m in smap.mlps}
    shared: dict[str, ActQuantizer] = {}
    refs = {r.weight: r for r in smap.linears}
    for name in names:
        if any(fnmatch.fnmatchcase(name, p) for p in config.keep_float):
            state.notes.append(f"{name}: kept in float (keep_float)")
            continue
        if name not in params:
            raise UnsupportedModelError(f"weight {name} found in the data flow is not a parameter")
        wbits, abits = match_override(name, config)
        norm = norm_of.get(name)
        if norm is not None:
            akey = f"norm:{norm.module}:{abits}"
            if akey not in shared:
                shared[akey] = ActQuantizer(akey, abits, per_channel=per_channel)
                state.acts[key_of(akey)] = shared[akey]
            act = shared[akey]
        else:
            # MLP fc2 inputs (after the activation function) are calibrated per channel too
            # and reparameterized like post-norm ones (repq/repquant)
            act = ActQuantizer(f"in:{name}", abits, per_channel=per_channel and name in fc2s)
            state.acts[key_of(f"in:{name}")] = act
        ref = refs.get(name)
        transposed = ref is not None and ref.op in ("addmm", "matmul", "mm")
        lq = LinearQuant(name, params[name], act, wbits, transposed)
        state.linears[key_of(name)] = lq
        state.by_id[id(params[name])] = lq
    if config.embedding_bits is not None:
        for mname, mod in model.named_modules():
            if isinstance(mod, nn.Embedding):
                eq = EmbeddingQuant(f"{mname}.weight", mod.weight, config.embedding_bits)
                eq.calibrate()
                state.embeddings[key_of(eq.name)] = eq
                state.emb_by_id[id(mod.weight)] = eq
    state.param_ids = {id(p) for p in model.parameters()}
    for site in smap.attention:
        state.has_mha |= site.kind == "mha"
        key = key_of(site.module)
        if key in state.attention:
            raise ConfigError([f"two attention sites in one module {site.module}: not supported"])
        state.attention[key] = AttentionQuant(site.module, config.act_bits, config.softmax_kind)
    for m in state.modules():
        if isinstance(m, (ActQuantizer, WeightQuantizer, ProbQuantizer)):
            m.symmetric = config.symmetric
        if isinstance(m, (ActQuantizer, WeightQuantizer)):
            m.pow2 = config.power_of_two_scales
    if config.power_of_two_scales or config.symmetric:
        for eq in state.embeddings.values():
            eq.calibrate()
    return QuantizedModel(model, state, config)
