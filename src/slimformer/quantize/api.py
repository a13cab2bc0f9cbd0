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
from slimformer.quantize.check import WeakSite
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.state import QuantizedModel

Progress = Callable[[str, int, int], None] | None


@dataclass
class QuantResult:
    """A quantized model and what calibration did.

    Attributes:
        weak_sites: Quantizers that represent their calibration data badly (SQNR below the floor
            of their bit-width, or data spread under one step), worst first; also in ``notes``.
        output_sqnr_db: SQNR of the model's outputs vs float on the calibration data (dB).
    """

    model: QuantizedModel
    calib_samples: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    weak_sites: list[WeakSite] = field(default_factory=list)
    output_sqnr_db: float | None = None


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


def _observe(qmodel: QuantizedModel, calib_data, config: QuantConfig) -> None:
    """Observe the calibration data in at least two batches, each quantizer told which batch.

    The per-site choice (:mod:`~slimformer.quantize.select`) cross-validates across batches, so
    rows of one input never sit on both sides.
    """
    from slimformer.quantize.act import ActQuantizer

    n = min(config.calib_samples, len(calib_data))
    acts = [m for m in qmodel.quant.modules() if isinstance(m, ActQuantizer)]
    with torch.no_grad():
        for i, inputs in enumerate(_batches(calib_data, min(config.calib_batch_size,
                                                            max(1, -(-n // 2))), n)):
            for act in acts:
                act.group = i
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

    Seeded by ``config.seed``; the caller's global torch RNG state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _quantize(model, config, calib_data, structure, progress, inplace)


def _quantize(model: nn.Module, config: QuantConfig, calib_data, structure, progress,
              inplace: bool) -> QuantResult:
    from slimformer.quantize.build import build
    from slimformer.quantize.reconstruct import reconstruct_linear
    from slimformer.quantize.repq import reparameterize
    from slimformer.quantize.select import MARGIN, calibrate_weights, select_sites

    t0 = time.perf_counter()
    n = min(config.calib_samples, len(calib_data))
    if n < config.min_calib_samples:
        raise CalibrationError(f"method {config.method} needs at least "
                               f"{config.min_calib_samples} calibration samples, got {n}")
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
    _observe(qmodel, calib_data, config)
    how = {"minmax": "minmax", "percentile": "percentile"}.get(config.method, "search")
    for act in state.acts.values():
        act.calibrate(how, config.percentile)
    for a in state.attention.values():
        for act in (a.q_in, a.k_in, a.v_in):
            act.calibrate(how, config.percentile)
        if not a.probs_float:
            a.probs.calibrate()
    if config.method in ("repq", "repquant") and config.repq_sites == "auto":  # RepQ where it helps
        notes += select_sites(state, softmax_auto=config.softmax == "auto")
    tick("calibrate", 1, 1)

    if config.method == "repquant" and config.clip_steps:
        notes += _dual_clipping(qmodel, calib_data, config, tick)
    if config.method in ("repq", "repquant"):
        notes += reparameterize(qmodel, structure)
    if not structure.norms:
        notes.append("no norm feeds a Linear: norm reparameterization skipped")
    calibrate_weights(state, search=config.method in ("repq", "repquant"))

    if config.method == "repquant" and config.recon_steps:
        # the rounding is learned on 3/4 of the calibration rows and kept only if it lowers the
        # model output error on the other quarter (a few outputs, e.g. 2 logits a row, overfit)
        fit, held = _Rows(calib_data, 0, n - n // 4), _Rows(calib_data, n - n // 4, n)
        calls: dict[str, int] = {}
        x_fp = _capture_float_inputs(qmodel, fit, config, calls=calls)
        by_name = {lq.name: lq for lq in state.linears.values()}
        lqs = [by_name[n] for n in x_fp]  # execution order (of first calls)
        kept = 0
        for i, lq in enumerate(lqs):
            # sequential: this layer's inputs with every upstream layer fully quantized; a layer
            # run several times per forward (shared) is captured over all its calls
            x_q = _capture_one(qmodel, lq, fit, config, calls=calls[lq.name])
            if x_q.shape != x_fp[lq.name].shape:  # calls per forward depend on the data
                notes.append(f"{lq.name}: weight rounding not learned (its calls per forward "
                             "vary between batches)")
                continue
            before, after = reconstruct_linear(lq, x_q, x_fp[lq.name], config.recon_steps)
            kept += after < before
            tick("weight rounding", i + 1, len(lqs))
        notes.append(f"learned weight rounding kept for {kept} of {len(lqs)} layers (lower "
                     "held-out output error than nearest rounding)")
        refs = _float_outputs(qmodel, held, config)  # once, for both roundings
        with_round = _output_error(qmodel, held, config, refs)
        saved = {lq.name: lq.alpha for lq in lqs}
        for lq in lqs:
            lq.alpha = None
        nearest = _output_error(qmodel, held, config, refs)
        if with_round < MARGIN * nearest:  # clearly better: small gains do not carry over
            for lq in lqs:
                lq.alpha = saved[lq.name]
            notes.append(f"learned rounding kept: model output error {nearest:.4g} -> "
                         f"{with_round:.4g} on held-out calibration rows")
        else:
            notes.append(f"learned rounding dropped: it did not cut the model output error on "
                         f"held-out calibration rows by {100 * (1 - MARGIN):.0f}% ({nearest:.4g} "
                         f"-> {with_round:.4g})")
    state.set_mode("quant")
    weak, out_db = _check(qmodel, calib_data, config, notes)
    for act in state.acts.values():
        act._rows, act._min, act._max = [], None, None
    return QuantResult(qmodel, n, time.perf_counter() - t0, notes, weak, out_db)


def _dual_clipping(qmodel: QuantizedModel, calib_data, config: QuantConfig, tick) -> list[str]:
    """Learn the dual clipping of every per-channel activation quantizer; notes.

    Each site's bounds must lower its Linears' output error on held-out rows
    (:func:`~slimformer.quantize.repq.learn_dual_clipping`); then the model as a whole must gain:
    the output error vs float on the calibration rows with the learned bounds must beat the
    observed ranges by :data:`~slimformer.quantize.select.MARGIN`, else every range goes back.
    A layer-local gain does not always carry to the output (a rare large token clipped).
    """
    from slimformer.quantize.repq import learn_dual_clipping
    from slimformer.quantize.select import MARGIN, calibrate_weights

    state, notes = qmodel.quant, []
    per_channel = [act for act in state.acts.values() if act.per_channel]
    observed = {act.name: (act.lo.detach().clone(), act.hi.detach().clone())
                for act in per_channel}
    kept = 0
    for i, act in enumerate(per_channel):
        ws = [lq.matrix().detach() for lq in state.linears.values() if lq.act is act]
        gain = learn_dual_clipping(act, ws, config.clip_steps)
        kept += gain > 0
        if gain > 0:
            notes.append(f"{act.name}: dual clipping cut the held-out output error by "
                         f"{100 * gain:.1f}%")
        tick("dual clipping", i + 1, len(per_channel))
    if kept < len(per_channel):
        notes.append(f"dual clipping not kept at {len(per_channel) - kept} of {len(per_channel)}"
                     " site(s): no clear gain on held-out calibration rows")
    if not kept:
        return notes
    calibrate_weights(state, search=True)  # the quantized model before reparameterization
    clipped = {act.name: (act.lo.detach().clone(), act.hi.detach().clone())
               for act in per_channel}
    refs = _float_outputs(qmodel, calib_data, config)  # once, for both settings
    with_clip = _output_error(qmodel, calib_data, config, refs)
    for act in per_channel:
        act.set_range(*observed[act.name])
    without = _output_error(qmodel, calib_data, config, refs)
    state.set_mode("observe")
    if with_clip < MARGIN * without:
        for act in per_channel:
            act.set_range(*clipped[act.name])
        notes.append(f"dual clipping kept at {kept} site(s): model output error {without:.4g} ->"
                     f" {with_clip:.4g} on the calibration rows")
    else:
        notes.append(f"dual clipping dropped: its {kept} site(s) did not cut the model output "
                     f"error by {100 * (1 - MARGIN):.0f}% ({without:.4g} -> {with_clip:.4g})")
    return notes


def _check(qmodel: QuantizedModel, calib_data, config: QuantConfig,
           notes: list[str]) -> tuple[list[WeakSite], float | None]:
    """Weak sites and the output SQNR; raises when the output collapsed at W8A8."""
    from slimformer.quantize.check import output_sqnr, site_errors

    weak, site_db = site_errors(qmodel.quant)
    out_db = output_sqnr(qmodel, _batches(calib_data, config.calib_batch_size,
                                          config.calib_samples))
    if out_db is not None:
        notes.append(f"model output SQNR vs float on the calibration data: {out_db:.1f} dB")
    for w in weak[:10]:
        notes.append(f"weak site: {w}")
    if len(weak) > 10:
        notes.append(f"... and {len(weak) - 10} more weak site(s)")
    full8 = min(b for lq in qmodel.quant.linears.values() for b in (lq.wq.bits, lq.act.bits)) \
        if len(qmodel.quant.linears) else 0
    floor = config.min_output_sqnr_db
    if floor is not None and full8 >= 8 and out_db is not None and out_db < floor:
        worst = [(w.name, w.sqnr_db) for w in weak]
        worst += sorted(((k, v) for k, v in site_db.items() if k not in dict(worst)),
                        key=lambda kv: kv[1])
        worst = worst[:5]
        raise CalibrationError(
            f"the quantized model's output is at {out_db:.1f} dB SQNR vs float on the "
            f"calibration data, below the {floor:g} dB floor for 8-bit weights and activations: "
            "the quantizers lost the signal. Worst sites (weak ones first): " +
            "; ".join(f"{n} {d:.1f} dB" for n, d in worst) +
            ". Check the scale of the model's activations and the calibration data, or set "
            "min_output_sqnr_db: null to accept it")
    return weak, out_db


class _Rows:
    """Rows ``start .. stop`` of a data set (indexable, with a length), without copying."""

    def __init__(self, data, start: int, stop: int):
        self.data, self.start, self.stop = data, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        return self.data[self.start + i]


def _sample_rows(x: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """``rows`` rows of ``x`` drawn with a fixed seed (the same rows for equally long inputs)."""
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:rows]]


def _float_outputs(qmodel: QuantizedModel, calib_data, config: QuantConfig) -> list:
    """The float model's output leaves per calibration batch.

    The reference of :func:`_output_error`, computed once when several settings are compared.
    """
    from slimformer.models.outputs import leaves

    state, refs = qmodel.quant, []
    with torch.no_grad():
        state.set_mode("float")
        for inputs in _batches(calib_data, config.calib_batch_size, config.calib_samples):
            refs.append(leaves(qmodel(**inputs)))
    return refs


def _output_error(qmodel: QuantizedModel, calib_data, config: QuantConfig,
                  refs: list | None = None) -> float:
    """Output error of the quantized vs the float model on the calibration data.

    Every output counts: the mean over batches of :func:`~slimformer.models.outputs.normalized_mse`
    (so base models without class scores are judged on all their outputs). ``refs``: the float
    outputs from :func:`_float_outputs` (computed here when None).
    """
    from slimformer.models.outputs import leaves, normalized_mse

    refs = _float_outputs(qmodel, calib_data, config) if refs is None else refs
    state, total = qmodel.quant, 0.0
    state.set_mode("quant")
    with torch.no_grad():
        for inputs, ref in zip(_batches(calib_data, config.calib_batch_size,
                                        config.calib_samples), refs, strict=True):
            total += float(normalized_mse(leaves(qmodel(**inputs)), ref))
    return total / max(len(refs), 1)


class _Stop(Exception):
    """Ends a forward pass once the layer being captured has run."""


def _capture_one(qmodel: QuantizedModel, target, calib_data, config: QuantConfig,
                 rows: int = 4096, calls: int = 1) -> torch.Tensor:
    """Inputs of one Linear in the quantized model (rows sampled as in :func:`_capture_inputs`).

    ``calls``: executions of the layer per forward; each forward stops after the last of them.
    """
    qmodel.quant.set_mode("quant")
    parts: list[torch.Tensor] = []
    seen = [0]

    def grab(x):
        parts.append(x.detach().reshape(-1, x.shape[-1]))
        seen[0] += 1
        if seen[0] % calls == 0:
            raise _Stop
        return target.act(x)

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
                          rows: int = 4096, calls: dict[str, int] | None = None
                          ) -> dict[str, torch.Tensor]:
    """Inputs ``(rows, in)`` of every quantized Linear in the float model, in execution order.

    Rows are drawn as in :func:`_capture_one`, so both captures of a layer hold the same rows;
    every call of a layer run several times per forward counts. ``calls``, when given, receives
    the executions per forward of each layer.
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
    forwards = len(range(0, min(config.calib_samples, len(calib_data)), config.calib_batch_size))
    for name, parts in captured.items():
        if calls is not None:
            calls[name] = max(1, len(parts) // max(forwards, 1))
        x = torch.cat(parts)
        if x.shape[-1] != widths[name]:
            continue  # convolutions: inputs are images, not rows
        out[name] = _sample_rows(x, rows, config.seed)
    state.set_mode("quant")
    return out
