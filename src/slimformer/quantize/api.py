"""``quantize(model, config, calib_data) -> QuantResult``: calibrate, reparameterize, reconstruct.

Flow (all methods): build quantizers from the structure map -> observe calibration data in float
-> set ranges -> [repquant: learn dual clipping of per-channel post-norm quantizers] -> [repq,
repquant: reparameterize per-channel scales to one layer-wise scale] -> calibrate weight
quantizers -> [repquant: learn weight rounding with activation quantizers in place] -> quant mode.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from slimformer.errors import CalibrationError
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.state import QuantizedModel

Progress = Callable[[str, int, int], None] | None


@dataclass
class QuantResult:
    """A quantized model and what calibration did."""

    model: QuantizedModel
    calib_samples: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def _batches(calib_data, batch_size: int, limit: int):
    """Yield input dicts from a TensorDictDataset (first ``limit`` rows)."""
    from slimformer.data.datasets import trim_padding

    n = min(limit, len(calib_data))
    for i in range(0, n, batch_size):
        rows = [calib_data[j] for j in range(i, min(n, i + batch_size))]
        yield trim_padding(rows)[0]


def _run(qmodel: QuantizedModel, calib_data, config: QuantConfig) -> None:
    with torch.no_grad():
        for inputs in _batches(calib_data, config.calib_batch_size, config.calib_samples):
            qmodel(**inputs)


def quantize(model: nn.Module, config: QuantConfig, calib_data, structure=None,
             progress: Progress = None, inplace: bool = False) -> QuantResult:
    """Quantize ``model`` post-training.

    Args:
        model: The float model (copied unless ``inplace``).
        config: Method, bit-widths, overrides.
        calib_data: A data set whose items are ``({name: tensor}, label)`` (labels unused).
        structure: Its :class:`~slimformer.models.structure.StructureMap` (discovered if None).
        progress: ``progress(step, done, total)`` callback.
        inplace: Modify ``model`` itself (reparameterization changes its weights).
    """
    from slimformer.quantize.build import build
    from slimformer.quantize.reconstruct import reconstruct_linear
    from slimformer.quantize.repq import learn_dual_clipping, reparameterize

    t0 = time.perf_counter()
    n = min(config.calib_samples, len(calib_data))
    if n < config.min_calib_samples:
        raise CalibrationError(f"method {config.method} needs at least "
                               f"{config.min_calib_samples} calibration samples, got {n}")
    torch.manual_seed(config.seed)
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    if structure is None:
        from slimformer.models.structure import discover

        first = next(_batches(calib_data, 2, 2))
        structure = discover(model, first, require_attention=config.softmax_kind != "none")
    qmodel = build(model, structure, config)
    state = qmodel.quant
    notes = list(state.notes)
    tick = (lambda s, d, t: progress(s, d, t)) if progress else (lambda *a: None)

    tick("calibrate", 0, 1)
    state.set_mode("observe")
    _run(qmodel, calib_data, config)
    how = {"minmax": "minmax", "percentile": "percentile"}.get(config.method, "search")
    for act in state.acts.values():
        act.calibrate(how, config.percentile)
    for a in state.attention.values():
        for act in (a.q_in, a.k_in, a.v_in):
            act.calibrate(how, config.percentile)
        if not a.probs_float:
            a.probs.calibrate()
    tick("calibrate", 1, 1)

    if config.method == "repquant" and config.clip_steps:
        per_channel = [act for act in state.acts.values() if act.per_channel]
        for i, act in enumerate(per_channel):
            ws = [lq.matrix().detach() for lq in state.linears.values() if lq.act is act]
            gain = learn_dual_clipping(act, ws, config.clip_steps)
            notes.append(f"{act.name}: dual clipping cut the output error by {100 * gain:.1f}%")
            tick("dual clipping", i + 1, len(per_channel))
    if config.method in ("repq", "repquant"):
        notes += reparameterize(qmodel, structure)
    elif not structure.norms:
        notes.append("no norm feeds a Linear: nothing to reparameterize")
    if config.method in ("repq", "repquant") and not structure.norms:
        notes.append("no norm feeds a Linear: reparameterization skipped")
    for lq in state.linears.values():
        lq.wq.calibrate(lq.matrix().detach(), search=config.method in ("repq", "repquant"))

    if config.method == "repquant" and config.recon_steps:
        inputs = _capture_inputs(qmodel, calib_data, config)
        lqs = list(state.linears.values())
        for i, lq in enumerate(lqs):
            x = inputs.get(lq.name)
            if x is not None:
                before, after = reconstruct_linear(lq, x, config.recon_steps)
                if before > 0:
                    notes.append(f"{lq.name}: learned rounding {before:.3g} -> {after:.3g} MSE")
            tick("weight rounding", i + 1, len(lqs))
    state.set_mode("quant")
    for act in state.acts.values():
        act._rows, act._min, act._max = [], None, None
    return QuantResult(qmodel, n, time.perf_counter() - t0, notes)


def _capture_inputs(qmodel: QuantizedModel, calib_data, config: QuantConfig,
                    rows: int = 1024) -> dict[str, torch.Tensor]:
    """Float inputs ``(rows, in)`` of every quantized Linear, with activation quantizers on."""
    state = qmodel.quant
    state.set_mode("quant")
    for lq in state.linears.values():
        lq.mode = "float"  # weights float while capturing; activations quantized upstream
    captured: dict[str, list[torch.Tensor]] = {}
    originals = {}
    for lq in state.linears.values():
        originals[lq.name] = lq.act_in

        def grab(x, lq=lq):
            flat = x.detach().reshape(-1, x.shape[-1]) if not lq.transposed else \
                x.detach().reshape(-1, x.shape[-1])
            captured.setdefault(lq.name, []).append(flat)
            return lq.act(x)

        lq.act_in = grab
    try:
        _run(qmodel, calib_data, config)
    finally:
        for lq in state.linears.values():
            del lq.act_in  # back to the class method
    gen = torch.Generator().manual_seed(config.seed)
    out = {}
    for name, parts in captured.items():
        x = torch.cat(parts)
        if x.shape[-1] != state.linears[next(k for k, v in state.linears.items()
                                             if v.name == name)].matrix().shape[1]:
            continue  # convolutions: inputs are images, not rows
        idx = torch.randperm(len(x), generator=gen)[:rows]
        out[name] = x[idx]
    state.set_mode("quant")
    return out
