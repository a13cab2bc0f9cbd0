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
        structure = discover(model, first, require_attention=False)  # build() says why
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
    if not structure.norms:
        notes.append("no norm feeds a Linear: norm reparameterization skipped")
    for lq in state.linears.values():
        lq.wq.calibrate(lq.matrix().detach(), search=config.method in ("repq", "repquant"))

    if config.method == "repquant" and config.recon_steps:
        x_fp = _capture_float_inputs(qmodel, calib_data, config)
        by_name = {lq.name: lq for lq in state.linears.values()}
        lqs = [by_name[n] for n in x_fp]  # execution order
        kept = 0
        for i, lq in enumerate(lqs):
            # sequential: this layer's inputs with every upstream layer fully quantized
            x_q = _capture_one(qmodel, lq, calib_data, config)[:len(x_fp[lq.name])]
            before, after = reconstruct_linear(lq, x_q, x_fp[lq.name], config.recon_steps)
            kept += after < before
            tick("weight rounding", i + 1, len(lqs))
        notes.append(f"learned weight rounding kept for {kept} of {len(lqs)} layers (lower "
                     "held-out output error than nearest rounding)")
        with_round = _output_error(qmodel, calib_data, config)
        saved = {lq.name: lq.alpha for lq in lqs}
        for lq in lqs:
            lq.alpha = None
        nearest = _output_error(qmodel, calib_data, config)
        if with_round < nearest:
            for lq in lqs:
                lq.alpha = saved[lq.name]
            notes.append(f"learned rounding kept: model output error {nearest:.4g} -> "
                         f"{with_round:.4g} on the calibration data")
        else:
            notes.append(f"learned rounding dropped: it raised the model output error on the "
                         f"calibration data ({nearest:.4g} -> {with_round:.4g})")
    state.set_mode("quant")
    for act in state.acts.values():
        act._rows, act._min, act._max = [], None, None
    return QuantResult(qmodel, n, time.perf_counter() - t0, notes)


def _sample_rows(x: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """``rows`` rows of ``x`` drawn with a fixed seed (the same rows for equally long inputs)."""
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:rows]]


def _output_error(qmodel: QuantizedModel, calib_data, config: QuantConfig) -> float:
    """Output error of the quantized vs the float model on the calibration data.

    Every output counts: the mean over batches of :func:`~slimformer.models.outputs.normalized_mse`
    (so base models without class scores are judged on all their outputs).
    """
    from slimformer.models.outputs import leaves, normalized_mse

    state, total, count = qmodel.quant, 0.0, 0
    with torch.no_grad():
        for inputs in _batches(calib_data, config.calib_batch_size, config.calib_samples):
            state.set_mode("float")
            ref = leaves(qmodel(**inputs))
            state.set_mode("quant")
            total += float(normalized_mse(leaves(qmodel(**inputs)), ref))
            count += 1
    return total / max(count, 1)


class _Stop(Exception):
    """Ends a forward pass once the layer being captured has run."""


def _capture_one(qmodel: QuantizedModel, target, calib_data, config: QuantConfig,
                 rows: int = 4096) -> torch.Tensor:
    """Inputs of one Linear in the quantized model (rows sampled as in :func:`_capture_inputs`)."""
    qmodel.quant.set_mode("quant")
    parts: list[torch.Tensor] = []

    def grab(x):
        parts.append(x.detach().reshape(-1, x.shape[-1]))
        raise _Stop

    target.act_in = grab
    try:
        with torch.no_grad():
            for inputs in _batches(calib_data, config.calib_batch_size, config.calib_samples):
                try:
                    qmodel(**inputs)
                except _Stop:
                    pass
    finally:
        del target.act_in
    return _sample_rows(torch.cat(parts), rows, config.seed)


def _capture_float_inputs(qmodel: QuantizedModel, calib_data, config: QuantConfig,
                          rows: int = 4096) -> dict[str, torch.Tensor]:
    """Inputs ``(rows, in)`` of every quantized Linear in the float model, in execution order.

    Rows are drawn as in :func:`_capture_one`, so both captures of a layer hold the same rows.
    """
    state = qmodel.quant
    state.set_mode("float")
    for lq in state.linears.values():
        lq.mode = "float"
    captured: dict[str, list[torch.Tensor]] = {}
    for lq in state.linears.values():
        def grab(x, lq=lq):
            captured.setdefault(lq.name, []).append(x.detach().reshape(-1, x.shape[-1]))
            return lq.act(x)

        lq.act_in = grab
    try:
        _run(qmodel, calib_data, config)
    finally:
        for lq in state.linears.values():
            del lq.act_in  # back to the class method
    out = {}
    widths = {lq.name: lq.matrix().shape[1] for lq in state.linears.values()}
    for name, parts in captured.items():
        x = torch.cat(parts)
        if x.shape[-1] != widths[name]:
            continue  # convolutions: inputs are images, not rows
        out[name] = _sample_rows(x, rows, config.seed)
    state.set_mode("quant")
    return out
