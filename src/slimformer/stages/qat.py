"""The ``qat`` stage: quantization-aware fine-tuning of the quantized model; saved as ``quantized``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from slimformer.errors import ModelLoadError, StageError
from slimformer.qat.config import QatConfig
from slimformer.report.model import StageRecord
from slimformer.stages.context import RunContext
from slimformer.store.manifest import stage_entry

if TYPE_CHECKING:
    from slimformer.stages.artifact import Artifact, Restored

# order rules (see slimformer.stages.HANDLERS)
SAVES = "quantized"  # an ordinary quantized artifact, the qat stage recorded after quantize
QUANTIZES = True  # the model stays quantized: no prune / quantize after it
AFTER_QUANTIZED = None
NEEDS_QUANTIZED = ("qat fine-tunes a quantized model: put a quantize stage before it, or start "
                   "from a quantized folder (slimformer quantize --out DIR)")


class QatStage(QatConfig):
    """Quantization-aware fine-tuning (see :class:`~slimformer.qat.config.QatConfig`).

    Distills the float model into the quantized one on ``rows`` rows of the train split (a
    user's own data: its calibration rows). Later stages see the fine-tuned model in the form
    the quantize stage left (inference form); with ``save`` it is written to
    ``<output>/quantized/``, an ordinary quantized artifact with this stage recorded.
    """

    type: Literal["qat"] = "qat"
    save: bool = True

    def qat_config(self) -> QatConfig:
        """The plain config, without the stage fields."""
        return QatConfig(**self.model_dump(exclude={"type", "save"}))


def run(ctx: RunContext, stage: QatStage) -> StageRecord:
    """Fine-tune ``ctx.model`` with the float model as teacher; later stages get the result."""
    from slimformer.models.evaluate import model_size
    from slimformer.qat.api import qat
    from slimformer.quantize.serialize import save_quantized
    from slimformer.stages.quantize import _peak_rss_gb

    cfg = stage.qat_config()
    rows = ctx.data.sample("train", cfg.rows)
    res = qat(ctx.model, ctx.loaded.module, cfg, rows, getattr(ctx.loaded, "task", None),
              progress=ctx.progress)
    ctx.model = res.model
    log = res.log
    first, best = log.judgements[0].metrics, log.best.metrics
    rec = StageRecord(index=0, type=stage.type, config=stage.model_dump(mode="json"))
    rec.metrics = {"steps": log.steps, "best_step": log.best_step, "stopped": log.stopped,
                   "loss": res.loss, "metric": res.metric, "fit_rows": res.fit_rows,
                   "held_rows": res.held_rows, "seconds": round(log.seconds, 2),
                   "cpu_seconds": round(log.cpu_seconds, 2),
                   "cpu_seconds_per_step": round(log.cpu_seconds / max(log.steps, 1), 4),
                   "peak_rss_gb": _peak_rss_gb(),
                   f"held_{res.metric}_before": round(first[res.metric], 4),
                   f"held_{res.metric}_after": round(best[res.metric], 4),
                   "held_db_before": round(first["db"], 3), "held_db_after": round(best["db"], 3),
                   "writeback_db": round(min(res.writeback_db, 999.0), 1)}
    rec.notes = res.notes
    rec.size = model_size(ctx.model)
    history = list(ctx.history)
    entry = stage_entry("qat", cfg, {**rec.metrics, "size": rec.size})
    ctx.history.append(entry)
    if stage.save:
        spec, model, sspec = ctx.model_spec, ctx.model, ctx.slice_spec
        before, quant, after = _split_history(history)
        ctx.artifacts[SAVES] = lambda d: save_quantized(
            model, d, spec, sspec, before, config=quant["config"], result=quant["result"],
            after=[*after, entry])
    return rec


def _split_history(history: list[dict]) -> tuple[list[dict], dict, list[dict]]:
    """``(entries before the quantize stage, its entry, entries after it)``.

    Raises:
        StageError: No quantize stage recorded (a search's model: fine-tuned, not saved).
    """
    idx = max((i for i, e in enumerate(history) if e.get("stage") == "quantize"), default=None)
    if idx is None:
        raise StageError("qat saves a quantized folder, and no quantize stage is recorded before "
                         "it (the model came from a search): give the qat stage save: false, or "
                         "quantize the chosen sub-network first")
    return history[:idx], history[idx], history[idx + 1:]


def restore(r: Restored, entry: dict, art: Artifact) -> None:
    """Replay a recorded qat: nothing to redo, the folder's tensors are the fine-tuned ones.

    The quantize stage's restore (recorded before this one) built the quantizers and loaded them.

    Raises:
        ModelLoadError: The stage is recorded in a folder that holds no quantized weights, or
            without a quantize stage before it.
    """
    if art.kind != SAVES or "quantize" not in r.applied:
        raise ModelLoadError(f"{art.manifest}: a qat stage is recorded without the quantized "
                             f"weights it fine-tuned ({art.kind} folder, stages before it: "
                             f"{', '.join(r.applied) or 'none'}); re-create the folder")
