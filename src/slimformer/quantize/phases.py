"""The calibration phases of each method, as one explicit table: :data:`PHASES`.

``calibrate(model, config, data, ...)`` builds the quantizers, observes the calibration rows
inside :func:`calibrating` (every quantizer records what passes through it) and runs the
method's phases in order on one :class:`Calibration`:

============  ==============================================================================
minmax        ranges (min/max) -> outlier channels -> weights (min/max)
percentile    ranges (percentile) -> outlier channels -> weights (min/max)
repq          ranges (per-site choice) -> reparameterize -> outlier channels ->
              weights (searched) -> weight validation
repquant      ranges (per-site choice) -> dual clipping -> reparameterize ->
              outlier channels -> weights (searched) -> weight validation -> learned rounding
============  ==============================================================================

Each phase reads and records what it needs on the :class:`Calibration` (notes, per-site
choices, progress); a phase whose option is off (``repq_sites: all``, ``clip_steps: 0``,
``recon_steps: 0``, no held-out rows) does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from slimformer.quantize.capture import batches as _batches
from slimformer.quantize.capture import float_outputs, output_error
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.holdout import SiteChoice
from slimformer.quantize.state import QuantizedModel

Tick = Callable[[str, int, int], None]


@dataclass
class Calibration:
    """One calibration run: the model being quantized and what its phases record.

    Attributes:
        qmodel: The model with its quantizers.
        config: The quantization config.
        data: The rows the ranges are fitted on.
        held: Held-out rows (:func:`~slimformer.quantize.holdout.split`) every per-site choice is
            validated on; None: choices by cross-validation on ``data``.
        structure: The model's :class:`~slimformer.models.structure.StructureMap`.
        tick: ``tick(step, done, total)`` progress callback.
        choices: Every per-site choice (:class:`~slimformer.quantize.holdout.SiteChoice`).
        notes: What calibration did, in words.
        runner: How data is run when the model is one block
            (:class:`~slimformer.quantize.blockacts.BlockRunner`); None: the whole model.
    """

    qmodel: QuantizedModel
    config: QuantConfig
    data: object
    held: object | None
    structure: object
    tick: Tick
    choices: list[SiteChoice]
    notes: list[str] = field(default_factory=list)
    runner: object | None = None

    @property
    def searched(self) -> bool:
        """Whether the method searches ranges and chooses per site (repq, repquant)."""
        return self.config.method in ("repq", "repquant")

    def batches(self, data):
        """Input dicts of ``data`` in calibration batches."""
        if self.runner is not None:
            return self.runner.batches(data)
        return _batches(data, self.config.calib_batch_size, self.config.calib_samples)

    def held_rows(self) -> dict[str, torch.Tensor] | None:
        """Every quantizer's inputs on the held-out rows (None without held-out rows)."""
        from slimformer.quantize.holdout import held_samples

        return None if self.held is None else held_samples(self.qmodel, self.held, self.batches)

    def float_outputs(self, data) -> list:
        """The float outputs of ``data`` (the reference of :meth:`output_error`)."""
        if self.runner is not None:
            return self.runner.float_outputs(data)
        return float_outputs(self.qmodel, data, self.config)

    def output_error(self, data, refs: list, as_set: bool = False) -> float:
        """Output error vs float on ``data`` (:func:`~slimformer.quantize.capture.output_error`)."""
        if self.runner is not None:
            return self.runner.output_error(data, refs, as_set)
        return output_error(self.qmodel, data, self.config, refs, as_set=as_set)


@contextmanager
def calibrating(qmodel: QuantizedModel) -> Iterator[None]:
    """Inside: every quantizer observes what passes through it; after (also on an error): quant.

    Phases inside may run the model in other modes; the observations stay with the quantizers
    until :meth:`~slimformer.quantize.act.ActQuantizer.forget`.
    """
    qmodel.quant.set_mode("observe")
    try:
        yield
    finally:
        qmodel.quant.set_mode("quant")


def observe(run: Calibration) -> None:
    """Run the calibration rows through the model in at least two batches, each quantizer told which.

    The per-site choice (:mod:`~slimformer.quantize.select`) cross-validates across batches, so
    rows of one input never sit on both sides.
    """
    from slimformer.quantize.act import ActQuantizer

    config = run.config
    n = min(config.calib_samples, len(run.data))
    size = min(config.calib_batch_size, max(1, -(-n // 2)))
    acts = [m for m in run.qmodel.quant.modules() if isinstance(m, ActQuantizer)]
    total = -(-n // size)
    run.tick("calibrate", 0, total)
    with torch.no_grad():
        for i, inputs in enumerate(_batches(run.data, size, n)):
            for act in acts:
                act.group = i
            run.qmodel(**inputs)
            run.tick("calibrate", i + 1, total)


# ------------------------------------------------------------------------------------- phases


def _ranges(how: str) -> Callable[[Calibration], None]:
    def ranges(run: Calibration) -> None:
        """Every activation and probability range by ``how`` from the observations."""
        state = run.qmodel.quant
        for act in state.acts.values():
            act.calibrate(how, run.config.percentile)
        for a in state.attention.values():
            for act in (a.q_in, a.k_in, a.v_in):
                act.calibrate(how, run.config.percentile)
            if not a.probs_float:
                a.probs.calibrate()

    ranges.__name__ = f"ranges_{how}"
    return ranges


def choose_sites(run: Calibration) -> None:
    """Every range searched; ``repq_sites: auto``: RepQ, min/max or search per site by error.

    Under ``auto`` each site's range is fitted as its kept candidate (not searched first), and
    with held-out rows each choice must also lower the model output error.
    """
    from slimformer.quantize.select import select_sites
    from slimformer.quantize.validate import validate_sites

    cfg = run.config
    if cfg.repq_sites != "auto":
        _ranges("search")(run)
        return
    if cfg.softmax != "auto":  # select_sites chooses (and calibrates) the softmax under auto
        for a in run.qmodel.quant.attention.values():
            if not a.probs_float:
                a.probs.calibrate()
    run.notes += select_sites(run.qmodel.quant, softmax_auto=cfg.softmax == "auto",
                              held=run.held_rows(), record=run.choices, progress=run.tick)
    if run.held is not None:  # each site's choice must also lower the model output error
        refs = run.float_outputs(run.held)
        run.notes += validate_sites(
            run.qmodel, run.held, lambda q, d: run.output_error(d, refs, as_set=True),
            run.choices, progress=run.tick, blocks=run.runner is None)


def dual_clipping(run: Calibration) -> None:
    """repquant: learned dual clipping of the per-channel quantizers (``clip_steps``)."""
    from slimformer.quantize.clipping import dual_clipping as _dual

    if run.config.clip_steps:
        run.notes += _dual(run.qmodel, run.data if run.held is None else run.held, run.config,
                           run.tick, run.choices)


def reparameterize(run: Calibration) -> None:
    """RepQ: every per-channel activation quantizer folded to one layer-wise scale."""
    from slimformer.quantize.repq import reparameterize as _reparameterize

    run.notes += _reparameterize(run.qmodel, run.structure)


def outlier_channels(run: Calibration) -> None:
    """The few massive input channels of a Linear kept float where that lowers its error."""
    from slimformer.quantize.outliers import choose_outliers

    cfg = run.config
    run.notes += choose_outliers(run.qmodel.quant, cfg.outlier_channels,
                                 "percentile" if cfg.method == "percentile" else "minmax",
                                 cfg.percentile, progress=run.tick)


def _weights(search: bool) -> Callable[[Calibration], None]:
    def weights(run: Calibration) -> None:
        """Every weight range: min/max, or (``search``) min/max or MSE search per layer."""
        from slimformer.quantize.select import calibrate_weights

        if not run.structure.norms:
            run.notes.append("no norm feeds a Linear: norm reparameterization skipped")
        calibrate_weights(run.qmodel.quant, search=search,
                          held=run.held_rows() if search else None, record=run.choices,
                          progress=run.tick)

    weights.__name__ = "weights_searched" if search else "weights_minmax"
    return weights


def validate_weights(run: Calibration) -> None:
    """With held-out rows: a searched weight range stays only if it lowers the output error."""
    from slimformer.quantize.validate import validate_weights as _validate

    if run.held is None:
        return
    refs = run.float_outputs(run.held)
    run.notes += _validate(run.qmodel, run.held, lambda q, d: run.output_error(d, refs),
                           run.choices, progress=run.tick, blocks=run.runner is None)


def learned_rounding(run: Calibration) -> None:
    """repquant: learned weight rounding (``recon_steps``), kept only if the held-out rows gain."""
    from slimformer.quantize.rounding import learned_rounding as _rounding

    if run.config.recon_steps:
        _rounding(run)


def gptq_rounding(run: Calibration) -> None:
    """``gptq`` (on by default at 4 weight bits or fewer): GPTQ codes on the calibrated ranges."""
    from slimformer.quantize.gptqacts import gptq_rounding as _gptq

    if run.config.gptq_on():
        run.notes += _gptq(run)


def weights_blockwise(run: Calibration) -> None:
    """Weight-only (minmax, gptq; awq): every Linear one block at a time, activations float."""
    from slimformer.quantize.blockwise import quantize_weights

    run.notes += quantize_weights(run)


PHASES: dict[str, tuple[Callable[[Calibration], None], ...]] = {
    "minmax": (_ranges("minmax"), outlier_channels, _weights(search=False), gptq_rounding),
    "percentile": (_ranges("percentile"), outlier_channels, _weights(search=False),
                   gptq_rounding),
    "repq": (choose_sites, reparameterize, outlier_channels, _weights(search=True),
             validate_weights, gptq_rounding),
    "repquant": (choose_sites, dual_clipping, reparameterize, outlier_channels,
                 _weights(search=True), validate_weights, learned_rounding),
    "weight_only": (weights_blockwise,),  # any weight_only method; no activation observations
}
# calibration rows each activation quantizer samples per method (it keeps the last 2x): min/max
# takes its ranges from the observed extremes and reads the sample only to choose outlier channels
# (on 1,024 rows, outliers.ROWS) and to check each site; the others fit ranges on the sample. At
# 4,096 the samples of SmolLM2-135M's 121 quantizers held 3.6 GB
SAMPLE_ROWS = {"minmax": 1024, "percentile": 4096, "repq": 4096, "repquant": 4096}
# methods calibrated one block at a time (:mod:`~slimformer.quantize.blockacts`) where the model
# has blocks. repq runs block-wise too (its choices judged by each block's output on held-out
# rows) but is left out: on vit-digits-seq W4A4 it lost 0.9 dB / 2.2 accuracy points to the
# whole-model path (W8A8: -0.1 dB, same accuracy); repquant's dual clipping and learned rounding
# judge on the whole model's output. Only under a memory budget (``max_memory``): by default the
# whole-model path, since block-wise minmax beats whole-model repq on some models (fan-in BERT,
# 35.3 vs 31.1 dB) and repq's "never below minmax" then no longer holds
BLOCKWISE = ("minmax", "percentile")


def calibrate(model: nn.Module, config: QuantConfig, data, structure, tick: Tick, held,
              choices: list[SiteChoice]) -> tuple[QuantizedModel, list[str]]:
    """Build and calibrate the quantized model on ``data``; returns it (quant mode), notes.

    ``held``: held-out rows every per-site choice is validated on, recorded in ``choices``;
    None: choices by cross-validation on ``data``.
    """
    from slimformer.quantize.build import build

    qmodel = build(model, structure, config)
    rotated = []
    if config.rotate_inputs == "on":  # before anything is observed: the weights become W R
        from slimformer.quantize.inrotate import rotate_inputs

        rotated = rotate_inputs(qmodel, structure, config.seed)
    if not config.weight_only:
        from slimformer.quantize.act import ActQuantizer

        for m in qmodel.quant.modules():
            if isinstance(m, ActQuantizer):
                m.sample_rows = SAMPLE_ROWS[config.method]
    run = Calibration(qmodel, config, data, held, structure, tick, choices,
                      list(qmodel.quant.notes) + rotated)
    with calibrating(qmodel):
        if not config.weight_only and config.max_memory is not None \
                and config.method in BLOCKWISE:
            from slimformer.quantize.blockacts import calibrate_blocks

            if calibrate_blocks(run, PHASES[config.method]):
                return qmodel, run.notes
        if not config.weight_only:
            observe(run)
        for phase in PHASES["weight_only" if config.weight_only else config.method]:
            phase(run)
    return qmodel, run.notes
