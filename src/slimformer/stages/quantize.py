"""The ``quantize`` stage: post-training quantization; later stages see the inference form."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import PrivateAttr, model_serializer, model_validator

from slimformer.errors import ModelLoadError
from slimformer.quantize.config import QuantConfig
from slimformer.report.model import StageRecord
from slimformer.stages.context import RunContext
from slimformer.store.manifest import stage_entry

if TYPE_CHECKING:
    from slimformer.stages.artifact import Artifact, Restored

# order rules (see slimformer.stages.HANDLERS)
SAVES = "quantized"  # the artifact it writes: <output>/quantized/
QUANTIZES = True
AFTER_QUANTIZED = "the model is quantized already (one quantize stage per recipe)"


# tokens per calibration window of a causal LM quantized weight-only (QuantConfig.calib_window)
# and the calibration rows packed into them when the stage names none
CAUSAL_WINDOW, CAUSAL_ROWS = 512, 512


# fields quant_config() may set where the stage leaves them unset (by task or bit-width)
TASK_DEFAULTED = ("act_dynamic", "embedding_bits", "calib_window", "calib_samples",
                  "rotate_inputs")


class QuantizeStage(QuantConfig):
    """Post-training quantization (see :class:`~slimformer.quantize.config.QuantConfig`).

    The model that later stages see is the quantized one, in inference form; with ``save`` it is
    also written to ``<output>/quantized/``.
    """

    type: Literal["quantize"] = "quantize"
    save: bool = True
    _method_given: bool = PrivateAttr(default=True)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_method(cls, data, handler):
        """Whether the stage named its method (the config fills one in when it does not)."""
        stage = handler(data)
        if isinstance(data, dict):
            stage._method_given = "method" in data
        return stage

    @model_serializer(mode="wrap")
    def _as_given(self, handler):
        """The dump without what :meth:`quant_config` fills in where the stage left it unset.

        The method and the task defaults: a dumped recipe, read again, runs the same.
        """
        out = handler(self)
        if isinstance(out, dict):
            unset = set(TASK_DEFAULTED) - self.model_fields_set
            for k in unset | ({"method"} if not self._method_given else set()):
                out.pop(k, None)
        return out

    def quant_config(self, task: str | None = None) -> QuantConfig:
        """The plain config, without the stage fields, with the defaults of the model's task.

        A causal LM (``task`` ``causal-lm``) whose stage leaves ``act_dynamic`` unset gets
        per-token run-time activation ranges where the method takes them (min/max or
        percentile, asymmetric, no power-of-two scales): a decoder's massive activations sit on
        a few tokens, and one static range per tensor flattens the rest (SmolLM2-135M W8A8 on
        held-out nyt text: perplexity 44.67 static vs 41.65 per token, float 41.24).

        A causal LM quantized weight-only to 4 bits or fewer whose stage leaves
        ``embedding_bits`` unset gets 8-bit embedding tables (per row): a small LM's vocabulary
        table is most of what stays float (SmolLM2-135M INT4 g128 GPTQ: decoder file 214 ->
        132 MB, perplexity 52.25 -> 52.15 through ONNX Runtime, float 43.08), as NNCF's
        ``compress_weights`` keeps embeddings at 8 bits.

        A causal LM quantized weight-only whose stage leaves ``calib_window`` unset calibrates
        on its rows packed into windows of :data:`CAUSAL_WINDOW` tokens (the same tokens as
        long contexts; the budget's judge rows too), on :data:`CAUSAL_ROWS` rows unless
        ``calib_samples`` is set (SmolLM2-135M INT4 g128 GPTQ on nyt sentences, perplexity on
        4,096 held-out tokens, float 41.24: 128 rows 47.21, packed 46.50, 448 rows packed
        44.76).

        Any model whose stage sets neither ``method`` nor ``act_dynamic`` and quantizes some
        activation to 4 bits or fewer (static grids would take repq) gets per-token run-time
        ranges with min/max and float attention (:func:`low_bit_dynamic`). One that quantizes
        some activation to 4 bits or fewer and leaves ``rotate_inputs`` unset gets ``auto``:
        the online input rotation, kept where it lowers the held-out output error (minilm-vader
        W4A4 through the CLI, 2,000 test rows: accuracy 0.7735 -> 0.7855, float 0.7855,
        agreement 0.902 -> 0.931; vit-fmnist W3A3 a tie, 0.8565 -> 0.8560). Not at 8
        bits, where the rotation's float matmuls cost deployed speed (MiniLM-L6 W8A8 in ONNX
        Runtime: 1.70x -> 1.55x over float at batch 1).
        """
        fields = self.model_dump(exclude={"type", "save"})
        cfg = QuantConfig(**fields)
        unset, extra = set(self.model_fields) - self.model_fields_set, {}
        if "rotate_inputs" in unset and low_bit_dynamic(cfg):
            fields["rotate_inputs"] = "auto"
            cfg = QuantConfig(**fields)
        if not self._method_given and "act_dynamic" in unset and low_bit_dynamic(cfg):
            return QuantConfig(**fields, act_dynamic="token")  # the dump left both out
        if task != "causal-lm":
            return cfg
        if "act_dynamic" in unset and not cfg.act_dynamic_clash():
            extra["act_dynamic"] = "token"
        if "embedding_bits" in unset and cfg.weight_only and cfg.weight_bits <= 4:
            extra["embedding_bits"] = 8
        if "calib_window" in unset and cfg.weight_only:
            extra["calib_window"] = CAUSAL_WINDOW
            if "calib_samples" in unset:
                extra["calib_samples"] = CAUSAL_ROWS
        return QuantConfig(**{**fields, **extra}) if extra else cfg


def low_bit_dynamic(cfg: QuantConfig) -> bool:
    """Whether ``cfg`` (method and ``act_dynamic`` left to their defaults) takes per-token ranges.

    True where some Linear input is quantized to 4 bits or fewer and run-time ranges fit
    (asymmetric, free scales; not weight-only). Measured against the static default (repq with
    quantized attention), test rows never calibrated on, AMD EPYC (docs/quantize.md "Low-bit
    activations"): minilm-vader W4A4 accuracy / agreement with float 0.749 / 0.859 -> 0.777 /
    0.903 (float 0.778), vit-fmnist W3A3 0.830 -> 0.865, W4A4 0.863 -> 0.871, W2A4 0.633 ->
    0.685 (float 0.867).
    """
    if cfg.weight_only or cfg.symmetric or cfg.power_of_two_scales:
        return False
    bits = [cfg.act_bits] + [o.act_bits for o in cfg.overrides if o.act_bits is not None]
    return min(bits) <= 4


def run(ctx: RunContext, stage: QuantizeStage) -> StageRecord:
    """Calibrate on the recipe's calibration split, switch the run to the inference form."""
    from slimformer.models.evaluate import model_size
    from slimformer.quantize.api import quantize
    from slimformer.quantize.inference import to_inference
    from slimformer.quantize.serialize import save_quantized

    calib = ctx.data.get("calib")
    cfg = stage.quant_config(getattr(ctx.loaded, "task", None))
    res = quantize(ctx.model, cfg, calib, ctx.structure,
                   progress=ctx.progress)
    if cfg.rotate_inputs != stage.rotate_inputs:
        res.notes.insert(0, f"rotate_inputs {cfg.rotate_inputs}: the default for activations of "
                            "4 bits or fewer (the online input rotation, kept where it lowers "
                            "the held-out output error; set rotate_inputs: off for none)")
    if cfg.act_dynamic != stage.act_dynamic:
        why = ("a causal LM (" if getattr(ctx.loaded, "task", None) == "causal-lm" else
               "activations of 4 bits or fewer (min/max, attention float; ")
        res.notes.insert(0, f"act_dynamic {cfg.act_dynamic}: the default for {why}per-token "
                            "run-time activation ranges; set act_dynamic: off for static ones)")
    if cfg.calib_window != stage.calib_window:
        rows = (f", calib_samples {cfg.calib_samples}"
                if cfg.calib_samples != stage.calib_samples else "")
        res.notes.insert(0, f"calib_window {cfg.calib_window}{rows}: the default for a causal "
                            "LM quantized weight-only (set calib_window: null for the rows as "
                            "they are)")
    if cfg.embedding_bits != stage.embedding_bits:
        res.notes.insert(0, f"embedding_bits {cfg.embedding_bits}: the default for a causal LM "
                            f"with {cfg.weight_bits}-bit weights (embedding tables per row; "
                            "set embedding_bits to choose, --embedding-bits 0 keeps them float)")
    ctx.model = to_inference(res.model, inplace=True)  # res.model is not used simulated again
    rec = StageRecord(index=0, type=stage.type,  # what ran: the task's defaults applied
                      config={**stage.model_dump(mode="json"), "method": cfg.method,
                              "act_dynamic": cfg.act_dynamic,
                              "embedding_bits": cfg.embedding_bits,
                              "calib_window": cfg.calib_window,
                              "calib_samples": cfg.calib_samples})
    rec.metrics = {"calib_samples": res.calib_samples, "calib_seconds": round(res.seconds, 2),
                   "peak_rss_gb": _peak_rss_gb(), "method": cfg.method, "bits": _bits(cfg),
                   "act_dynamic": cfg.act_dynamic}
    cov = res.model.quant.coverage  # the reasons for float parameters are in the notes
    if cov is not None:
        rec.metrics |= {"weights_quantized": cov.quantized, "weights_total": cov.total,
                        "weights_float": cov.total - cov.quantized}
    if res.float_activations:  # the output-floor fallback (notes: which, and why)
        from slimformer.quantize.fallback import float_cost

        frac, _ = float_cost(res.model, set(res.float_activations))
        rec.metrics |= {"activations_float": len(res.float_activations),
                        "float_input_mac_fraction": round(frac, 4)}
    for c in res.site_choices:  # smooth: auto, judged at the model output (notes: the sites)
        if c.site == "smooth":
            rec.metrics |= {"smooth": c.kept, **{f"smooth_error_{k}": round(v, 6)
                                                 for k, v in c.errors.items()}}
    if res.budget is not None:  # the budget fallback (notes: which sites, and the metrics)
        b = res.budget
        rec.metrics |= {"budget": cfg.budget or f"{cfg.min_output_sqnr_db:g}dB",
                        "linears_8bit": len(res.eight_bit), "bytes_8bit": b["bytes_8bit"]}
        rec.metrics |= {f"budget_{k}_{w}": round(v, 4) for w in ("before", "after")
                        for k, v in b[w].items() if k != "labelled"}
    rec.notes = res.notes
    rec.size = model_size(ctx.model)  # bit-packed weights: the report's headline size
    history = list(ctx.history)
    entry = stage_entry("quantize", cfg, {**rec.metrics, "size": rec.size})
    ctx.history.append(entry)
    if stage.save:
        spec, model, sspec = ctx.model_spec, ctx.model, ctx.slice_spec
        ctx.artifacts[SAVES] = lambda d: save_quantized(model, d, spec, sspec, history,
                                                        result=entry["result"])
    return rec


def _peak_rss_gb() -> float | None:
    """The process's peak resident memory so far (GB; after calibration: its peak included)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)  # KiB on Linux


def _bits(cfg: QuantConfig) -> str:
    """``W8A8``; weight-only ``W4A32 g128`` (float activations, groups of 128 columns)."""
    if not cfg.weight_only:
        return f"W{cfg.weight_bits}A{cfg.act_bits}"
    return f"W{cfg.weight_bits}A32" + (f" g{cfg.group_size}" if cfg.group_size else "") + \
        (" awq" if cfg.awq else "")


def restore(r: Restored, entry: dict, art: Artifact) -> None:
    """Replay a recorded quantize: the recorded quantizers around a copy of the (sliced) base.

    The folder's codes and quantizer states are loaded into the copy; ``r.loaded`` stays the
    float reference.

    Raises:
        ModelLoadError: The stage is recorded in a folder that holds no quantized weights.
    """
    import copy
    import dataclasses

    from slimformer.quantize.serialize import quantized_from

    if art.kind != SAVES:
        raise ModelLoadError(f"{art.manifest}: a quantize stage is recorded before the "
                             f"{art.kind} stage that wrote the folder; re-create the folder")
    work = dataclasses.replace(r.loaded, module=copy.deepcopy(r.loaded.module))
    r.module = quantized_from(work, art.meta, art.folder)
