"""The ``evaluate`` stage: metric (or output fidelity), agreement, latency, size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from slimformer.report.model import StageRecord
from slimformer.stages.context import RunContext, _Strict, evaluate_model

if TYPE_CHECKING:
    import torch


class EvaluateStage(_Strict):
    """Measure the model as it stands: metric, agreement with the input model, latency, size."""

    type: Literal["evaluate"] = "evaluate"
    latency_batch_sizes: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        default_factory=lambda: [1, 32])
    latency_repeats: Annotated[int, Field(ge=1, le=1000)] = 20


def run(ctx: RunContext, stage: EvaluateStage) -> StageRecord:
    """Metric, agreement with the input model, latency per batch size, size."""
    from slimformer.data.datasets import latency_inputs
    from slimformer.models.evaluate import agreement, measure_latency, model_size

    rec = StageRecord(index=0, type=stage.type, config=stage.model_dump())
    if _has_class_scores(ctx.model, ctx.eval_data):
        preds, labels = evaluate_model(ctx.model, ctx.eval_data, ctx.batch_size,
                                       ctx.progress)
        if getattr(ctx.eval_data, "has_labels", True):  # without labels: agreement, fidelity
            rec.metrics["accuracy"] = float((preds == labels).float().mean())
        if ctx.reference_preds is None:
            ctx.reference_preds = preds
        rec.metrics["agreement"] = agreement(preds, ctx.reference_preds)
        rec.metrics["samples"] = len(labels)
    if not getattr(ctx.eval_data, "has_labels", True) or "agreement" not in rec.metrics:
        rec.metrics |= _fidelity(ctx)
    for b in stage.latency_batch_sizes:
        if ctx.progress:
            ctx.progress(f"latency batch {b}", 0, 1)
        stats = measure_latency(ctx.model, latency_inputs(ctx.eval_data, b),
                                repeats=stage.latency_repeats)
        rec.latency[f"batch={b}"] = stats
    rec.size = model_size(ctx.model)
    rec.size["macs_per_sample"] = int(ctx.structure.macs)
    return rec


def _has_class_scores(model: torch.nn.Module, dataset) -> bool:
    """Whether ``model`` returns class scores that fit the data's labels (else: fidelity)."""
    import torch

    from slimformer.models import outputs as O
    from slimformer.models.evaluate import run_batch

    with torch.no_grad():
        out = run_batch(model, {k: v[:2] for k, v in dataset.inputs.items()})
    labels = dataset.labels[:2] if dataset.labels is not None else torch.zeros(2, dtype=torch.long)
    return O.fits_labels(O.class_scores(out), labels)


def _fidelity(ctx: RunContext) -> dict:
    """All outputs of the current model vs the loaded float model: cosine, SQNR, agreement."""
    from slimformer.data.datasets import make_loader
    from slimformer.models.evaluate import compare_to_reference

    res = compare_to_reference(ctx.model, ctx.loaded.module,
                               make_loader(ctx.eval_data, ctx.batch_size))
    out = {"output_cosine_min": round(res["cosine"], 6),
           "output_sqnr_db_min": round(res["sqnr_db"], 2), "samples": len(ctx.eval_data),
           "outputs": len(res["outputs"])}
    if res.get("agreement") is not None:
        out["agreement_with_float"] = res["agreement"]
    return out
