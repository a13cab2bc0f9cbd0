"""A post-training quantized model as a Brevitas model whose step 0 reproduces it.

``to_brevitas(qmodel)`` copies the model inside a :class:`~slimformer.quantize.state.QuantizedModel`
(reparameterized folds already in its weights and norms) and replaces every ``nn.Linear`` whose
weight is a quantized site (found by parameter identity, not by name) with a
:class:`~slimformer.qat.layers.QatLinear`:

- weight quantizer: our per-channel scale and zero point at our bit-width, as learned parameters;
  the weight is the float one, except where its rounding does not give our integer codes (learned
  rounding, GPTQ, inference-form codes): there it is the grid value of our code, so every code
  matches at step 0;
- input quantizer: our activation quantizer's per-tensor scale and zero point as learned
  parameters, one Brevitas quantizer shared by the Linears that shared ours; RepQ's per-channel
  affine, where it stayed before the quantizer, as a fixed :class:`~slimformer.qat.layers.InputAffine`
  (an online input rotation as :class:`~slimformer.qat.layers.InputRotation` before it);
  inputs our model keeps float (``keep_float``, weight-only) stay float; inputs quantized on
  their own range at run time (``act_dynamic``) get Brevitas's dynamic proxy computing our grid
  (:class:`~slimformer.qat.layers.RunTimeInput`), nothing learned there; outlier input channels
  (``ActQuantizer.outliers``) stay float in the Brevitas layer (:meth:`QatLinear.split_out`).

Everything else stays as it was: float modules, and our own attention (q, k, v, probabilities)
and embedding quantizers, which the returned ``QuantizedModel`` still applies (in their simulated,
differentiable form; the fine-tuning learns the attention ranges in that form,
:func:`~slimformer.qat.train.attention_ranges`).
"""

from __future__ import annotations

import copy

import torch
from brevitas.core.scaling.standalone import ParameterScaling
from brevitas.core.zero_point import ParameterZeroPoint
from torch import nn

from slimformer.errors import CalibrationError, UnsupportedModelError
from slimformer.qat.layers import (
    AsymmetricInput,
    AsymmetricWeight,
    InputAffine,
    InputRotation,
    QatLinear,
    RunTimeInput,
    SymmetricInput,
    SymmetricWeight,
    quantizer_kwargs,
)
from slimformer.quantize.quantizers import uniform_codes
from slimformer.quantize.state import LinearQuant, QuantizedModel, QuantState, shared_params


@torch.no_grad()
def to_brevitas(qmodel: QuantizedModel) -> QuantizedModel:
    """A copy of ``qmodel`` with Brevitas Linears (see module doc); ``qmodel`` is left as it is.

    Quantized weights that are not an ``nn.Linear``'s (convolutions such as a ViT's patch
    embedding, GPT-2 Conv1D, packed attention projections, expert tensors) keep our own
    quantizers, applied by the returned ``QuantizedModel`` (frozen: not learned).

    Raises:
        UnsupportedModelError: A Linear's quantizer uses weight groups or a per-channel input
            quantizer: not converted yet.
    """
    src = copy.deepcopy(qmodel)
    src._rebind()
    state: QuantState = src.quant
    # a Brevitas layer learns its own copy of the weight: written back into a parameter another
    # module also holds (SmolLM2's head and embedding table) it would move that one too
    tied = shared_params(src.model)
    found = [(parent, child_name, state.linear_site(child.weight))
             for parent in list(src.model.modules())
             for child_name, child in list(parent.named_children())
             if isinstance(child, nn.Linear) and state.linear_site(child.weight) is not None
             and id(child.weight) not in tied]
    _check_supported([lq for _, _, lq in found], state.weight_only)
    inputs: dict[int, tuple[nn.Module | None, object]] = {}  # id(act) -> (affine, shared proxy)
    for parent, child_name, lq in found:
        setattr(parent, child_name, _convert(getattr(parent, child_name), lq, state, inputs))
    done = {lq.name for _, _, lq in found}
    rest = QuantState()  # our quantizers that stay: attention, embeddings, non-Linear weights
    rest.attention, rest.embeddings = state.attention, state.embeddings
    for key, lq in state.linears.items():
        if lq.name not in done:
            rest.linears[key] = lq
    rest.has_mha, rest.weight_only, rest.notes = state.has_mha, state.weight_only, list(state.notes)
    kept = [lq.name for lq in state.linears.values()
            if lq.name not in done and id(lq.param[0]) in tied]
    if kept:
        rest.notes.append(f"QAT: {len(kept)} Linear weight(s) tied to another module's "
                          f"parameter kept frozen with our quantizer ({', '.join(kept[:3])}): "
                          "a learned copy would untie them")
    for a in rest.attention.values():
        a.inference = False  # the simulated (differentiable) form of the log2 probabilities
        a.probs.ste = True  # log grids: gradients reach the scores, q, k and their Linears
    out = QuantizedModel(src.model, rest, src.config)
    rest.set_mode("quant")
    return out


def learned_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The learned scales and zero points of the Brevitas quantizers in ``model``, by name."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, (ParameterScaling, ParameterZeroPoint)):
            found[f"{name}.value"] = m.value
    return found


def _check_supported(linears: list[LinearQuant], weight_only: bool) -> None:
    problems = []
    for lq in linears:
        if lq.group is not None:
            problems.append(f"{lq.name}: weight groups of {lq.group} columns")
        if lq.act.lo.numel() > 1 and not (weight_only or lq.act.keep_float):
            problems.append(f"{lq.name}: per-channel input quantizer {lq.act.name}")
    if problems:
        raise UnsupportedModelError(
            "not converted to Brevitas yet (supported: per-channel weights, per-tensor inputs "
            "with or without outlier channels, float or power-of-two scales): " + "; ".join(problems[:4]))


def _convert(lin: nn.Linear, lq: LinearQuant, state: QuantState,
             inputs: dict[int, tuple[nn.Module | None, object]]) -> nn.Module:
    """The Brevitas replacement of ``lin`` (with its input affine in front when there is one)."""
    wq, act = lq.wq, lq.act
    kw = quantizer_kwargs("weight_", wq.scale, wq.zero, wq.bits, wq.symmetric, wq.pow2)
    affine = None
    if state.weight_only or act.keep_float:
        kw["input_quant"] = None
    elif id(act) in inputs:
        affine, kw["input_quant"] = inputs[id(act)]
    elif act.dynamic is not None:  # run-time ranges: nothing learned, our rule (layers.RunTimeScale)
        kw.update(input_bit_width=act.bits, input_per_token=act.dynamic == "token")
        kw["input_quant"] = RunTimeInput
    else:
        scale, zero = act.scale_zero()
        kw.update(quantizer_kwargs("input_", scale.reshape(()), zero.reshape(()), act.bits,
                                   act.symmetric, act.pow2))
        kw["input_quant"] = SymmetricInput if act.symmetric else AsymmetricInput
        if act.shift is not None:
            affine = InputAffine(act.shift, act.inv_r)
    w = lin.weight
    layer = QatLinear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                      weight_quant=SymmetricWeight if wq.symmetric else AsymmetricWeight,
                      return_quant_tensor=False, device=w.device, dtype=w.dtype, **kw)
    layer.site = lq.name  # the LinearQuant it came from (qat.writeback writes back to it)
    if kw["input_quant"] is not None and act.outliers is not None:
        layer.split_out(act.outliers)  # kept float, as our quantizer keeps them
    if kw["input_quant"] is not None and id(act) not in inputs:
        inputs[id(act)] = (affine, layer.input_quant)
    if lin.bias is not None:
        layer.bias.copy_(lin.bias)
    layer.weight.copy_(_initial_weight(lq, layer))
    front = [] if act.rot_signs is None else [InputRotation(act.rot_signs, act.rot_a, act.rot_b)]
    front += [] if affine is None else [affine]
    return nn.Sequential(*front, layer) if front else layer


def _initial_weight(lq: LinearQuant, layer: QatLinear) -> torch.Tensor:
    """The float weight ``(out, in)``, snapped to our code's grid value where rounding differs."""
    wq = lq.wq
    ours = (lq.int_weight.float() if lq.int_weight is not None
            else uniform_codes(lq.quantized_matrix(), wq.scale, wq.zero, wq.bits))  # (out, in)
    offset = 2 ** (wq.bits - 1) if wq.symmetric else 0  # Brevitas's signed codes are ours - 2^(b-1)
    grid = (ours - wq.zero) * wq.scale
    layer.weight.copy_(lq.param[0])
    codes = layer.quant_weight().int().float() + offset
    weight = torch.where(codes == ours, lq.param[0], grid)
    layer.weight.copy_(weight)
    if not torch.equal(layer.quant_weight().int().float() + offset, ours):
        raise CalibrationError(f"{lq.name}: the Brevitas weight quantizer does not reproduce our "
                               "integer codes from their grid values")
    return weight
