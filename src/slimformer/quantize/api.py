"""``quantize(model, config, calib_data) -> QuantResult``: calibrate, reparameterize, reconstruct.

The phases of each method are one table, :data:`~slimformer.quantize.phases.PHASES` (build the
quantizers -> observe the calibration rows -> ranges -> [repq, repquant: per-site choice] ->
[repquant: dual clipping] -> [repq, repquant: reparameterize] -> weight ranges -> [repquant:
learned rounding] -> quant mode).

repq / repquant (from 8 calibration rows) fit all of that on 3/4 of the calibration rows and
validate every per-site choice on the seeded rest (:mod:`~slimformer.quantize.holdout`); the
result is compared with min/max fitted on the same rows and falls back to it unless clearly
better on the held-out rows.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from slimformer.errors import CalibrationError, UnsupportedModelError
from slimformer.quantize.capture import batches as _batches
from slimformer.quantize.capture import fit_batch
from slimformer.quantize.capture import float_outputs as _float_outputs
from slimformer.quantize.capture import output_error as _output_error
from slimformer.quantize.check import WeakSite
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.fallback import Fallback
from slimformer.quantize.holdout import SiteChoice
from slimformer.quantize.phases import calibrate as _calibrate
from slimformer.quantize.state import QuantizedModel

Progress = Callable[[str, int, int], None] | None


@dataclass
class QuantResult:
    """A quantized model and what calibration did.

    Attributes:
        weak_sites: Quantizers that represent their calibration data badly (SQNR below the floor
            of their bit-width, or data spread under one step), worst first; also in ``notes``.
        output_sqnr_db: SQNR of the model's outputs vs float on the calibration data (dB).
        site_choices: repq / repquant: every per-site choice with the held-out error of each
            candidate (:class:`~slimformer.quantize.holdout.SiteChoice`), the method's own
            (``site == "model"``: repq vs the min/max baseline) last.
        float_activations: Activation quantizers the budget fallback kept float
            (:mod:`~slimformer.quantize.fallback`; block-wise calibration calls it per block
            where a block's output falls under the floor), also in ``model.config`` and
            ``notes``.
        eight_bit: Linear weights the budget fallback moved to 8 bits with their inputs (configs
            below 8 bits), also in ``model.config.overrides``.
        budget: What the fallback measured on its judge rows: ``before`` / ``after`` (metrics
            of :meth:`~slimformer.quantize.judge.Judge.measure`), ``bytes_8bit`` (packed weight
            bytes added), ``sites_8bit`` (activation sites at 8 bits); None when it did nothing.
    """

    model: QuantizedModel
    calib_samples: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    weak_sites: list[WeakSite] = field(default_factory=list)
    output_sqnr_db: float | None = None
    site_choices: list[SiteChoice] = field(default_factory=list)
    float_activations: list[str] = field(default_factory=list)
    eight_bit: list[str] = field(default_factory=list)
    budget: dict | None = None


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
    from slimformer.quantize.holdout import split

    t0 = time.perf_counter()
    asked_rows, packed = config.calib_samples, None
    if config.calib_window:
        from slimformer.data.datasets import pack_windows

        rows = min(config.calib_samples, len(calib_data))
        calib_data, first = pack_windows(calib_data, config.calib_window, rows)
        packed = (f"calibration: {rows} rows packed into {first} window(s) of "
                  f"{config.calib_window} tokens (running text: calib_window)")
        config = config.model_copy(update={"calib_samples": max(first, 1)})
    n = min(config.calib_samples, len(calib_data))
    if n < config.min_calib_samples:
        raise CalibrationError(f"method {config.method} needs at least "
                               f"{config.min_calib_samples} calibration samples, got {n}")
    _finite_inputs(calib_data, n, config)
    repq = config.method in ("repq", "repquant")
    fit, held = split(calib_data, n, config.seed) if repq else (calib_data, None)
    original = copy.deepcopy(model) if inplace and held is not None else model
    own = inplace and held is not None  # ``original`` is a copy of ours (quantized in place)
    source = model
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    asked = config.calib_batch_size
    config, fitted = fit_batch(model, calib_data, config)
    probe = _short(next(_batches(calib_data, 2, 2)))
    if structure is None:
        from slimformer.models.structure import discover

        structure = discover(model, probe, require_attention=False)  # build() says why
    rotated: list[str] = []
    if config.rotate_on():  # weight-only, before any weight is looked at
        model, structure, config, rotated = _rotate(source, model, structure, config, probe,
                                                    inplace)
    tick = (lambda s, d, t: progress(s, d, t)) if progress else (lambda *a: None)
    choices: list[SiteChoice] = []
    smoothed: list[str] = []
    if config.smooth != "off" and not config.weight_only:  # on the float model, before all
        from slimformer.quantize.smoothjudge import migrate_judged

        smoothed = migrate_judged(model, structure, calib_data, config, choices, tick)
        if held is not None:  # the min/max comparison starts from the same smoothed model
            original, own = copy.deepcopy(model), True
    if config.rotate_inputs == "auto":  # on the (smoothed) float model, left as it was
        label, judged = "off", []
        if config.rotate_inputs_fits():
            from slimformer.quantize.rotatejudge import rotate_judged

            label, judged = rotate_judged(model, structure, calib_data, config, choices, tick)
        config = config.model_copy(update={"rotate_inputs": label})
        smoothed += judged
    qmodel, notes = _calibrate(model, config, fit, structure, tick, held, choices)
    notes[:0] = rotated + smoothed + ([fitted] if fitted else [])
    if held is not None:
        notes.insert(0, f"{len(fit)} calibration rows fit, {len(held)} held out (seeded) to "
                        "validate every per-site choice")
        qmodel = _against_minmax(qmodel, original, config, calib_data, fit, held, structure,
                                 notes, choices, tick, own)
        del original, model  # after a fallback to min/max: repq's float copy is dropped
    early = [p for p in qmodel.config.float_activations if p not in config.float_activations]
    weak, out_db, fb = _check(qmodel, calib_data, config, notes, tick)
    qmodel.quant.forget()  # the calibration observations
    if packed:
        notes.insert(0, packed)
    if (qmodel.config.calib_batch_size, qmodel.config.calib_samples) != (asked, asked_rows):
        qmodel.config = qmodel.config.model_copy(  # the artifact records what was asked
            update={"calib_batch_size": asked, "calib_samples": asked_rows})
    res = QuantResult(qmodel, n, time.perf_counter() - t0, notes, weak, out_db, choices,
                      float_activations=early)  # by the per-block check (block-wise)
    if fb is not None:
        res.float_activations, res.eight_bit = [*early, *fb.kept], fb.eight_bit_linears
        res.budget = {"before": fb.before, "after": fb.after, "bytes_8bit": fb.bytes_delta,
                      "sites_8bit": fb.eight_bit}
    return res


def _rotate(source: nn.Module, model: nn.Module, structure, config: QuantConfig, probe: dict,
            inplace: bool):
    """``(model, structure, config, notes)`` after the residual rotation (``config.rotate``).

    ``config.rotate`` becomes what ran (``on`` / ``off``), so the saved folder knows whether its
    head was untied. A rotation whose check fails is undone by copying ``source`` again.
    """
    from slimformer.models.structure import discover
    from slimformer.quantize.rotate import rotate_checked

    if inplace:
        status, notes = "not applicable", ["residual rotation not applicable: quantize(inplace="
                                           "True) could not restore the model if its check failed"]
    else:
        status, notes = rotate_checked(model, structure, probe, config.seed)
    if status == "applied":
        structure = discover(model, probe, require_attention=False)  # the untied head
        return model, structure, config.model_copy(update={"rotate": "on"}), notes
    if config.rotate == "on":
        raise UnsupportedModelError(f"{notes[0]}; rotate: auto or off quantizes without it")
    if status == "failed":
        model = copy.deepcopy(source).eval()
    return model, structure, config.model_copy(update={"rotate": "off"}), notes


PROBE_TOKENS = 64  # token positions of the rows structure discovery traces


def _short(inputs: dict) -> dict:
    """Text rows cut to :data:`PROBE_TOKENS` positions for tracing (other inputs as they are).

    The trace keeps every intermediate tensor: two 512-token rows of SmolLM2-135M held 4 GB.
    Inputs sharing the ``attention_mask``'s ``(B, T)`` are cut to its first (right padding) or
    last (left padding) ``PROBE_TOKENS`` positions, whichever keeps a real token in every row.
    """
    mask = inputs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] <= PROBE_TOKENS:
        return inputs
    head = slice(0, PROBE_TOKENS)
    cut = head if bool(mask[:, head].any(1).all()) else slice(-PROBE_TOKENS, None)
    return {k: v[:, cut] if isinstance(v, torch.Tensor) and v.dim() >= 2
            and v.shape[:2] == mask.shape else v for k, v in inputs.items()}


def _finite_inputs(calib_data, n: int, config: QuantConfig) -> None:
    """CalibrationError naming the input and row where the calibration rows hold NaN or inf.

    Checked before anything runs: block-wise calibration and the smoothing pass see the blocks
    before the layers in front of them, so the layer a NaN reaches first would be misnamed.
    """
    row = 0
    for inputs in _batches(calib_data, config.calib_batch_size, n):
        for name, x in inputs.items():
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1)  # (B,)
                if bool(bad.any()):
                    raise CalibrationError(
                        f"NaN or inf in the calibration data: input {name!r}, row "
                        f"{row + int(bad.nonzero()[0])} of the calibration rows; every value "
                        "must be finite (check the data or its preprocessing)")
        row += len(next(iter(inputs.values())))


def _against_minmax(qmodel: QuantizedModel, original: nn.Module, config: QuantConfig,
                    calib_data, fit, held, structure, notes: list[str],
                    choices: list[SiteChoice], tick=lambda *a: None,
                    own: bool = False) -> QuantizedModel:
    """The repq / repquant model, or the min/max one where that has the lower held-out error.

    Both are fitted on the same ``fit`` rows and judged by the model output error vs float on the
    ``held`` rows; unless repq / repquant is lower by :data:`~slimformer.quantize.holdout.MARGIN`
    the min/max model calibrated on all calibration rows is returned (``repq_sites: all``, the
    published method for ablations, is kept and the loss noted). ``own``: ``original`` is a copy
    the min/max models may wrap (min/max leaves its weights as they are), else it is copied.
    """
    from slimformer.quantize.select import MARGIN

    def base() -> nn.Module:
        return (original if own else copy.deepcopy(original)).eval()

    # the same attention as the method's (min/max alone would leave it float under auto)
    baseline = config.model_copy(update={"method": "minmax", "attention": config.attention_kind})
    refs = _float_outputs(qmodel, held, config)
    mine = _output_error(qmodel, held, config, refs)
    qmodel.quant.set_mode("quant")  # its weight caches dropped (rebuilt when it runs again)
    mm, _ = _calibrate(base(), baseline, fit, structure,
                       lambda s, d, t: tick(f"min/max baseline: {s}", d, t), None, [])
    mm.quant.forget()  # its observations: only its held-out error is used
    theirs = _output_error(mm, held, config, refs)
    mm.release()
    del mm, refs
    better = mine < MARGIN * theirs  # a tie goes to min/max: it is then fitted on all the rows
    keep = better or config.repq_sites == "all"
    choices.append(SiteChoice("model", "method", {"minmax": theirs, config.method: mine},
                              config.method if keep else "minmax",
                              "" if better else f"; {config.method} not {100 * (1 - MARGIN):.0f}%"
                              " below min/max on held-out rows" +
                              (" (kept: repq_sites all)" if keep else "")))
    head = (f"model output error vs float on the held-out calibration rows: {config.method} "
            f"{mine:.4g}, minmax {theirs:.4g}: ")
    if better:
        notes.append(head + f"{config.method} kept")
        return qmodel
    if keep:
        notes.append(head + f"{config.method} kept as asked (repq_sites: all), though min/max "
                     "is better here")
        return qmodel
    notes.append(head + f"fell back to minmax calibrated on all rows ({config.method} was not "
                 f"{100 * (1 - MARGIN):.0f}% better: its choices did not carry to the model "
                 "output)")
    qmodel.quant.forget()  # dropped: its observations, weight caches and hooks
    qmodel.quant.set_mode("float")
    qmodel.release()
    mm, _ = _calibrate(base(), baseline, calib_data, structure,
                       lambda s, d, t: tick(f"min/max on all rows: {s}", d, t), None, [])
    return mm


def _check(qmodel: QuantizedModel, calib_data, config: QuantConfig, notes: list[str],
           progress=None) -> tuple[list[WeakSite], float | None, Fallback | None]:
    """Weak sites, the output SQNR and what the budget fallback moved to 8 bits or float.

    The criteria: the config's ``budget`` and, at W8A8, ``min_output_sqnr_db`` (checked first on
    the calibration rows, as without a budget). Where they fail, the fewest activation sites
    move to 8 bits, then float (:mod:`~slimformer.quantize.fallback`; ``qmodel.config`` then
    records them in ``overrides`` / ``float_activations``); raises where even every site float
    misses them.
    """
    from slimformer.quantize.budget import Budget, parse_budget
    from slimformer.quantize.check import output_sqnr, site_errors
    from slimformer.quantize.fallback import fallback

    tick = progress or (lambda *a: None)
    n = min(config.calib_samples, len(calib_data))
    total = -(-n // config.calib_batch_size)

    def counted():
        for i, b in enumerate(_batches(calib_data, config.calib_batch_size, n)):
            tick("check: model output vs float", i, total)
            yield b
        tick("check: model output vs float", total, total)

    def measure():
        tick("check: every quantizer on its data", 0, 1)
        w, dbs = site_errors(qmodel.quant)
        return w, dbs, output_sqnr(qmodel, counted())

    weak, site_db, out_db = measure()
    full8 = min(b for lq in qmodel.quant.linears.values() for b in (lq.wq.bits, lq.act.bits)) \
        if len(qmodel.quant.linears) else 0
    floor = config.min_output_sqnr_db
    low = floor is not None and full8 >= 8 and out_db is not None and out_db < floor
    criteria = [parse_budget(config.budget)] if config.budget else []
    if floor is not None and full8 >= 8 and (criteria or low):
        criteria.append(Budget("db", floor))
    fb = fallback(qmodel, calib_data, config, criteria, progress) if criteria else None
    worst = [(w.name, w.sqnr_db) for w in weak]
    worst += sorted(((k, v) for k, v in site_db.items() if k not in dict(worst)),
                    key=lambda kv: kv[1])
    if fb is not None and not fb.met and not config.budget:
        raise CalibrationError(
            f"the quantized model's output is at {out_db:.1f} dB SQNR vs float on the "
            f"calibration data, below the {floor:g} dB floor for 8-bit weights and "
            "activations, also with every activation quantizer kept float: the quantizers "
            "lost the signal. Worst sites (weak ones first): " +
            "; ".join(f"{n} {d:.1f} dB" for n, d in worst[:5]) +
            ". Check the scale of the model's activations and the calibration data, or set "
            "min_output_sqnr_db: null to accept it")
    if fb is not None and not fb.met:
        raise CalibrationError(
            f"budget {config.budget} cannot be met: " + "; ".join(fb.notes) + ". Worst sites "
            "(weak ones first): " + "; ".join(f"{n} {d:.1f} dB" for n, d in worst[:5]) +
            ". Allowed: a looser budget (e.g. more points, a lower dB), more bits, or no budget")
    if low or fb is not None:
        notes.append(f"model output SQNR vs float on the calibration data: {out_db:.1f} dB" +
                     (f", below the {floor:g} dB floor" if low else ""))
    if fb is not None:
        notes += fb.notes
        qmodel.config = qmodel.config.model_copy(update={  # with what blocks already moved
            "overrides": [*fb.overrides, *qmodel.config.overrides],
            "float_activations": [*qmodel.config.float_activations, *fb.patterns()]})
        weak, site_db, out_db = measure()
        notes.append(f"after the fallback: {out_db:.1f} dB on the calibration data")
    elif out_db is not None and not low:
        notes.append(f"model output SQNR vs float on the calibration data: {out_db:.1f} dB")
    for w in weak[:10]:
        notes.append(f"weak site: {w}")
    if len(weak) > 10:
        notes.append(f"... and {len(weak) - 10} more weak site(s)")
    return weak, out_db, fb
