"""Typed configuration of post-training quantization (also the recipe's ``quantize`` stage)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from slimformer.quantize.budget import budget_field
from slimformer.quantize.spill import parse_bytes


def _bits(v: int) -> int:
    if not 2 <= v <= 8:
        raise ValueError("must be 2..8")
    return v


Bits = Annotated[int, AfterValidator(_bits)]
METHODS = ("minmax", "percentile", "repq", "repquant", "gptq")
WEIGHT_ONLY_METHODS = ("minmax", "gptq")  # round to nearest, error-compensating rounding
DYNAMIC_METHODS = ("minmax", "percentile")  # static ranges left for the attention inputs


def _group(v: int | None) -> int | None:
    if v is not None and (v < 8 or v > 4096 or v & (v - 1)):
        raise ValueError("must be a power of two from 8 to 4096 (e.g. 32, 64, 128)")
    return v


def _memory(v: str | None) -> str | None:
    if v is not None:
        parse_bytes(v)
    return v


def _alphas(v: list[float]) -> list[float]:
    if not v or any(not 0 < a <= 1 for a in v) or len(set(v)) != len(v):
        raise ValueError(f"must be distinct migration strengths in (0, 1], at least one (got {v}; "
                         "no migration is always tried; smooth: off turns it off)")
    return v


def default_method(fields: dict) -> str:
    """The method of a config that names none (``fields``: the config's raw input).

    ``gptq`` with ``weight_only``, ``minmax`` with ``act_dynamic`` or ``rotate_inputs: on``;
    else ``minmax`` at W8A8 and ``repq`` below. At 8-bit weights and activations (no override
    below, no power-of-two scales) min/max with float attention, SmoothQuant migration and
    outlier channels was the most faithful on every trained model measured (docs/quantize.md:
    all-MiniLM-L6-v2 neighbour agreement 0.953 vs 0.906 for repq, which fell back to min/max
    with quantized attention there), at half the calibration time; RepQ's per-channel ranges
    and log-sqrt2 softmax pay off below 8 bits.
    """
    if fields.get("weight_only"):
        return "gptq"
    if fields.get("act_dynamic", "off") not in ("off", False) or \
            fields.get("rotate_inputs") in ("on", True):  # YAML reads a bare on as True
        return "minmax"
    rows = [fields] + [o if isinstance(o, dict) else dict(o) for o in fields.get("overrides") or []
                       if isinstance(o, dict | LayerOverride)]
    bits = [r.get(k) or 8 for r in rows for k in ("weight_bits", "act_bits")]
    w8a8 = all(not isinstance(b, int) or b >= 8 for b in bits)  # bad values: the fields' errors
    return "minmax" if w8a8 and not fields.get("power_of_two_scales") else "repq"


class LayerOverride(BaseModel):
    """Bit-widths for the Linears whose weight names match ``pattern`` (fnmatch glob)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pattern: str
    weight_bits: Bits | None = None
    act_bits: Bits | None = None


class QuantConfig(BaseModel):
    """How to quantize.

    Attributes:
        method: ``minmax`` / ``percentile`` baselines (per-channel weights, per-tensor
            activations), ``repq`` (per-channel post-norm activations reparameterized to one
            scale, log-sqrt2 softmax) or ``repquant`` (repq + learned dual clipping + learned
            weight rounding); ``gptq`` with ``weight_only``. Not given: ``gptq`` with
            ``weight_only``, ``minmax`` with ``act_dynamic`` or at W8A8, else ``repq``
            (:func:`default_method`).
        weight_bits / act_bits: Default bit-widths (2..8); ``act_bits`` also quantizes the
            attention matmul inputs and the attention probabilities.
        overrides: Ordered glob patterns over Linear weight names; the first match wins; a
            pattern that matches nothing is an error.
        keep_float: Glob patterns of Linear weight names left in float.
        softmax: Quantizer of attention probabilities (``none`` leaves them in float).
        attention: ``quantized``: the inputs of both attention matmuls (q, k, v) and the
            probabilities (per ``softmax``) are quantized; ``float``: both attention matmuls
            run in float, the Linears around them quantized, as LLM W8A8 schemes (SmoothQuant,
            ModelOpt) and ONNX Runtime's standard ``Attention`` op (the default export target
            at opset 23) execute them. ``auto``: ``quantized`` for repq / repquant (RepQ's
            log-sqrt2 softmax), with ``power_of_two_scales`` (fixed-point targets) and where
            ``softmax`` names a quantizer; else ``float`` (measured: all-MiniLM-L6-v2 minmax
            W8A8 nearest-neighbour agreement 0.906 -> 0.953, SmolLM2-135M perplexity
            50.9 -> 44.7, float 41.2).
        calib_samples: Calibration rows used.
        percentile: Clipping percentile of the ``percentile`` baseline.
        clip_steps / recon_steps: Optimization steps of repquant's dual clipping and weight
            rounding per layer.
        power_of_two_scales: Round activation and weight scales to powers of two (FPGA targets:
            every quantized tensor is then exactly an ``ap_fixed<W, I>``). With repq/repquant,
            per-channel ranges only where they fold into a norm's affine.
        embedding_bits: Weight-only quantization of embedding tables (``nn.Embedding``
            lookups), per row (2..8 bits); None keeps them in float. Large vocabularies dominate
            the size of small text models.
        symmetric: Symmetric signed grids (zero point 0), as TensorRT requires; weights and
            activations. Scales are ``max(|lo|, |hi|) / (2^(b-1) - 1)``; codes are kept as
            ``uint8`` with zero point ``2^(b-1)`` (int8 ``code - 2^(b-1)`` in the QDQ export),
            uniform attention probabilities use the non-negative half ``[0, 2^(b-1) - 1]``.
        head_bits: Weight-only below this many bits: the model's output Linears (whose output
            the model returns: an LM's vocabulary projection, a classifier) get weights of
            this many bits instead (unless an ``overrides`` pattern names them), as NNCF's
            ``compress_weights`` and llama.cpp's 4-bit formats keep the head at 8 / 6 bits: a
            4-bit head loses the most per byte (SmolLM2-135M INT4 g128: perplexity 56.7 -> 54.4,
            float 41.2, for 0.3 MB). None: the head as the others.
        weight_only: Quantize the weights only; activations (and attention) stay in float, as
            LLM runtimes on CPUs execute them. Methods (default ``gptq``): ``minmax`` (round
            to nearest) or ``gptq`` (error-compensating rounding from each Linear's
            calibration inputs, calibrated one block at a time:
            :mod:`~slimformer.quantize.blockwise`).
        group_size: Weight-only: one scale and zero point per ``group_size`` consecutive input
            columns of each output row (a power of two, e.g. 32/64/128); a Linear whose input
            size it does not divide gets the largest power of two below it that does (from 8;
            else per-output-channel ranges), noted. None: per output channel.
        awq: Weight-only: activation-aware per-input-channel scales (AWQ), searched by each
            Linear group's output error and folded into the norm that feeds them (nothing added
            at inference); Linears without such a norm keep their weights as they are.
        act_order: gptq: columns in order of decreasing Hessian diagonal (group ranges are then
            fixed from the weights before rounding). None: on (SmolLM2-135M INT4 g128, 128 nyt
            rows: perplexity 50.12 without, 47.78 with, float 41.24; 4,096 held-out tokens).
        gptq: Quantized activations (minmax, percentile, repq): the weights rounded by GPTQ on
            their calibrated per-channel ranges, from the Hessians of the quantized model's own
            inputs, kept where the model output error falls (:mod:`~slimformer.quantize.gptqacts`).
            Weight-only takes ``method: gptq`` instead; repquant has its learned rounding. None:
            on at 4 weight bits or fewer (held-out output error 0.074 -> 0.065 on vit-fmnist
            W3A3, 0.134 -> 0.128 on minilm-vader W4A4, 0.118 -> 0.066 on DINOv2-small W4A8),
            off at more (see :meth:`gptq_on`).
        clip_search: gptq: each group's range shrunk from its min/max by the factor (1 to 0.5)
            that minimizes its rounding error weighted by the Hessian diagonal (GPTQ's MSE grid,
            AWQ's clip search). None: on (SmolLM2-135M INT4 g128 with act_order, 128 nyt rows:
            perplexity 47.78 without, 46.66 with; float 41.24).
        repq_sites: ``auto``: repq/repquant choose per site (RepQ per-channel ranges, per-tensor
            min/max or MSE search; log-sqrt2 or uniform softmax under ``softmax: auto``) by
            calibration error, so they do not lose to the baselines: from 8 calibration rows on,
            a seeded quarter of them is held out, every choice must also lower the error there
            (else the simpler one stays), and the method falls back to ``minmax`` unless its
            model output error on those rows is 5% lower (see ``QuantResult.site_choices``);
            ``all``: RepQ per channel at every post-norm and MLP fc2 input (the published
            method, for ablations; the held-out comparison with min/max is only noted).
        min_output_sqnr_db: At W8A8 (every Linear at 8 bits), the model output's SQNR vs float on
            the calibration data must reach this, else :class:`CalibrationError` names the worst
            sites; below it the fallback (:mod:`~slimformer.quantize.fallback`) first keeps the
            fewest activation quantizers float (ranked by their measured effect on the output)
            that bring the output back over it, and records them in ``float_activations``; None
            disables the check. With a ``budget`` too, both must hold.
        budget: How far from float the model may be (:mod:`~slimformer.quantize.budget`):
            ``<x>pt`` (accuracy points lost vs float on labelled held-out rows, top-1 agreement
            points on unlabelled ones), ``<x>%ppl`` (relative perplexity increase, causal LMs)
            or ``<x>dB`` (model output SQNR). At any bit-widths the fallback
            (:mod:`~slimformer.quantize.fallback`) moves the fewest activation sites, ranked by
            their share of the output error, first to 8 bits (weights and input; recorded in
            ``overrides``) and then float (``float_activations``) until it holds on calibration
            rows no quantizer saw; unreachable: :class:`CalibrationError`. None: only the
            W8A8 floor. With ``weight_only`` the sites' only tier is 8-bit weights (the
            Linears sharing an input; no float tier).
        smooth: ``auto`` (default): SmoothQuant-style migration of activation outliers into
            the weights before calibration (:mod:`~slimformer.quantize.smooth`), per site where a
            scale can be folded exactly into the norm or Linear producing the input (nothing
            added at inference), with the strength chosen per site by the quantized Linears'
            local error (no migration where none lowers it), then kept only where the model
            output error on held-out calibration rows drops (min/max on both sides,
            :mod:`~slimformer.quantize.smoothjudge`; recorded in ``site_choices`` and the
            notes); not applied with ``weight_only`` (see ``awq``). ``on``: the per-site
            choice without the model-level judgement. ``off``: never.
        smooth_alphas: The migration strengths ``a`` tried per site
            (``s = max|X|^a / max|W|^(1-a)``), each in (0, 1]; no migration is always a
            candidate.
        calib_window: Token rows (``input_ids``): the first ``calib_samples`` rows' real tokens
            concatenated in row order and cut into windows of this many tokens, calibrated on
            as rows (the same tokens, long contexts: a causal LM then calibrates on the running
            text it reads, as GPTQ and AWQ take 2048-token segments of C4); the rows after them
            (the budget's judge rows) likewise, apart. None: the rows as given. The quantize
            stage sets 512 for a causal LM quantized weight-only.
        max_memory: Peak memory budget of calibration (``4GB``, ``512MiB``; None: unbounded,
            whole-model calibration): minmax / percentile then calibrate one block at a time
            (:mod:`~slimformer.quantize.blockacts`; only one block's observations held) and
            block inputs/outputs held while the process is over it go to memory-mapped files
            (:mod:`~slimformer.quantize.spill`); below the model's own weights: ConfigError.
        act_dynamic: ``off`` (default): every activation range is calibrated (static).
            ``tensor`` / ``token``: the inputs of the Linears are quantized at run time on a
            grid from their own min/max (asymmetric, 0 inside), per tensor or per token (each
            row of the last axis, e.g. each token of ``(B, T, C)``), as ONNX Runtime's
            ``DynamicQuantizeLinear`` (per tensor) and the per-token graph of the export
            compute it; a massive token then widens only its own row's grid. Attention matmul
            inputs and probabilities keep calibrated ranges. Methods ``minmax`` (default
            with it) or ``percentile`` (their ranges for the attention inputs); not with
            ``weight_only``, ``symmetric`` or ``power_of_two_scales``. With a batch, a
            per-tensor range spans every row of it (padding included).
        outlier_channels: The most input channels per Linear input quantizer kept float
            (:mod:`~slimformer.quantize.outliers`): the few channels whose values dwarf the
            rest (massive activations of trained models) are split out of the quantized
            product where that lowers the Linear's output error on the calibration rows; the
            notes list them. Per-tensor inputs of plain Linears, static or ``act_dynamic``
            (not RepQ's per-channel sites, nor with ``power_of_two_scales``). 0: off.
        rotate: A random orthogonal rotation of the residual stream folded into the weights
            before the weights are quantized (:mod:`~slimformer.quantize.rotate`, QuaRot /
            SpinQuant's ``R1``: exact in float, spreads large input columns over all of them).
            ``auto`` (default): with ``weight_only`` at 4 bits or fewer, where the model's
            structure allows it (pre-norm RMSNorms read by Linears only); the notes say why not
            elsewhere. ``on``: also at more bits; a model that does not allow it is an error.
            ``off``: never. Recorded as ``on`` / ``off`` (what ran) in the saved config.
        rotate_inputs: ``on``: every per-tensor activation quantizer feeding plain Linears
            multiplies its input by a seeded orthogonal ``R`` at run time (QuaRot's online
            Hadamard, :mod:`~slimformer.quantize.inrotate`: Kronecker factors, ``C (a + b)``
            multiply-adds per row) and its Linears take ``W R``: exact in float, the channels
            that dwarf the rest spread over all of them before the grid. Methods ``minmax`` /
            ``percentile``, static or ``act_dynamic``; not ``weight_only`` (see ``rotate``)
            nor ``power_of_two_scales`` (fixed-point targets have no float rotation). Exported
            as ``Mul, MatMul, MatMul`` before each rotated input's Q/DQ; not to QONNX or hls4ml.
            ``auto``: calibrated with and without it on part of the calibration rows, kept
            where the model output error on the others falls
            (:mod:`~slimformer.quantize.rotatejudge`); nothing where it does not go. ``off``
            (default). Recorded as ``on`` / ``off`` (what ran) in the saved config.
        float_activations: Glob patterns of activation quantizer names (``in:<weight>``,
            ``norm:<module>:<bits>``, ``<module>:q|k|v``) whose input stays float (the weights
            after them stay quantized); a pattern that matches nothing is an error.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal[METHODS] = "repq"  # type: ignore[valid-type]
    weight_bits: Bits = 8
    act_bits: Bits = 8
    overrides: list[LayerOverride] = Field(default_factory=list)
    keep_float: list[str] = Field(default_factory=list)
    softmax: Literal["auto", "log_sqrt2", "log2", "uniform", "none"] = "auto"
    attention: Literal["auto", "quantized", "float"] = "auto"
    calib_samples: Annotated[int, Field(ge=1, le=100_000)] = 128
    calib_batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    percentile: Annotated[float, Field(gt=90.0, le=100.0)] = 99.99
    clip_steps: Annotated[int, Field(ge=0, le=10_000)] = 100
    recon_steps: Annotated[int, Field(ge=0, le=100_000)] = 100
    power_of_two_scales: bool = False
    embedding_bits: Bits | None = None
    symmetric: bool = False
    weight_only: bool = False
    head_bits: Bits | None = 8
    group_size: Annotated[int | None, AfterValidator(_group)] = None
    awq: bool = False
    gptq: bool | None = None
    act_order: bool | None = None
    clip_search: bool | None = None
    repq_sites: Literal["auto", "all"] = "auto"
    min_output_sqnr_db: float | None = 10.0
    budget: Annotated[str | None, AfterValidator(budget_field)] = None
    float_activations: list[str] = Field(default_factory=list)
    smooth: Literal["auto", "on", "off"] = "auto"
    act_dynamic: Literal["off", "tensor", "token"] = "off"
    outlier_channels: Annotated[int, Field(ge=0, le=256)] = 8
    rotate: Literal["auto", "on", "off"] = "auto"
    rotate_inputs: Literal["auto", "on", "off"] = "off"
    max_memory: Annotated[str | None, AfterValidator(_memory)] = None
    calib_window: Annotated[int | None, Field(ge=16, le=65536)] = None
    smooth_alphas: Annotated[list[float], AfterValidator(_alphas)] = Field(
        default_factory=lambda: [0.3, 0.5, 0.7, 0.85])
    seed: int = 0

    @field_validator("smooth", "act_dynamic", "rotate", "rotate_inputs", mode="before")
    @classmethod
    def _yaml_switch(cls, value):
        """YAML 1.1 reads a bare ``on`` / ``off`` (a recipe, ``--set smooth=on``) as a bool."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, data):
        """A config that names no method gets :func:`default_method`'s."""
        if isinstance(data, dict) and "method" not in data:
            data = {**data, "method": default_method(data)}
        return data

    def rotate_on(self) -> bool:
        """Whether the residual rotation is tried (``rotate``): weight-only, ``auto`` at <= 4 bits."""
        if not self.weight_only or self.rotate == "off":
            return False
        return self.rotate == "on" or self.weight_bits <= 4

    def rotate_inputs_fits(self) -> bool:
        """Whether the online input rotation goes with the other settings (``rotate_inputs``)."""
        return not (self.weight_only or self.power_of_two_scales
                    or self.method not in ("minmax", "percentile"))

    def gptq_on(self) -> bool:
        """Whether the weights of quantized activations are rounded by GPTQ (``gptq``)."""
        if self.weight_only or self.method not in ("minmax", "percentile", "repq"):
            return False
        return self.gptq if self.gptq is not None else self.weight_bits <= 4

    @model_validator(mode="after")
    def _weight_only(self) -> QuantConfig:
        if self.weight_only and self.method not in WEIGHT_ONLY_METHODS:
            raise ValueError(f"weight_only takes method {' or '.join(WEIGHT_ONLY_METHODS)} "
                             f"(got {self.method}: it calibrates activations)")
        if self.gptq is True and (self.weight_only or self.method == "repquant"):
            raise ValueError("gptq: true rounds the weights of a model with quantized "
                             "activations (methods minmax, percentile, repq); weight-only takes "
                             "method: gptq, repquant its learned rounding (recon_steps)")
        if not self.weight_only:
            asked = [k for k, on in (("method gptq", self.method == "gptq"),
                                     ("group_size", self.group_size is not None),
                                     ("awq", self.awq), ("act_order", self.act_order is True),
                                     ("clip_search", self.clip_search is True),
                                     ("rotate: on", self.rotate == "on"))
                     if on]
            if asked:
                raise ValueError(f"{', '.join(asked)} need weight_only: true (weight-only "
                                 "quantization; activations stay float)")
        if self.rotate_inputs == "on" and not self.rotate_inputs_fits():
            clash = [k for k, on in (("weight_only", self.weight_only),
                                     ("power_of_two_scales", self.power_of_two_scales),
                                     (f"method {self.method}",
                                      self.method not in ("minmax", "percentile"))) if on]
            if clash:
                raise ValueError(
                    f"rotate_inputs: on (an online rotation of each Linear's quantized input) "
                    f"does not go with {', '.join(clash)}: it takes method minmax or "
                    "percentile with quantized activations and free scales (weight-only "
                    "models take rotate, the residual rotation)")
        if self.act_dynamic != "off":
            clash = self.act_dynamic_clash()
            if clash:
                raise ValueError(
                    f"act_dynamic {self.act_dynamic} (run-time asymmetric activation ranges) "
                    f"does not go with {', '.join(clash)}: it takes method "
                    f"{' or '.join(DYNAMIC_METHODS)} (static ranges for the attention inputs), "
                    "quantized activations, asymmetric grids with free scales")
        if self.attention == "float" and self.softmax not in ("auto", "none"):
            raise ValueError(f"softmax {self.softmax} quantizes the attention probabilities, "
                             "attention: float leaves them float; choose one (attention: "
                             "quantized or auto with a softmax quantizer)")
        return self

    def act_dynamic_clash(self) -> list[str]:
        """The settings that rule out ``act_dynamic`` (run-time ranges); empty where it fits."""
        return [k for k, on in (("weight_only", self.weight_only), ("symmetric", self.symmetric),
                                ("power_of_two_scales", self.power_of_two_scales),
                                (f"method {self.method}", self.method not in DYNAMIC_METHODS))
                if on]

    @property
    def attention_kind(self) -> str:
        """``quantized`` or ``float``: what ``attention`` resolves to (see the class)."""
        if self.attention != "auto":
            return self.attention
        if self.method in ("repq", "repquant") or self.power_of_two_scales or \
                self.softmax not in ("auto", "none"):
            return "quantized"
        return "float"

    @property
    def softmax_kind(self) -> str:
        """The softmax quantizer built (``auto``: log-sqrt2 for repq/repquant, else uniform).

        With ``auto``, repq/repquant then choose per site between log-sqrt2 and uniform by the
        calibration error of the probabilities.
        """
        if self.weight_only or self.attention_kind == "float":
            return "none"
        if self.softmax != "auto":
            return self.softmax
        return "log_sqrt2" if self.method in ("repq", "repquant") else "uniform"

    @property
    def min_calib_samples(self) -> int:
        """Fewest calibration rows a method can work with."""
        return 8 if self.method == "repquant" else 1
