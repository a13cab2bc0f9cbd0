"""The ``evaluate`` stage: metric (or output fidelity, or task metrics), agreement, latency, size.

A Hugging Face model whose task is ``sentence-embedding``, ``image-features`` or ``causal-lm``
gets its task's metrics vs the float model (:mod:`slimformer.stages.taskquality`) on the
evaluation rows, which never include calibration rows.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from slimformer.report.model import StageRecord
from slimformer.stages.context import RunContext, _Strict
from slimformer.stages.quality import measure


class EvaluateStage(_Strict):
    """Measure the model as it stands: metric, agreement with the input model, latency, size."""

    type: Literal["evaluate"] = "evaluate"
    latency_batch_sizes: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        default_factory=lambda: [1, 32])
    latency_repeats: Annotated[int, Field(ge=1, le=1000)] = 20
    # stop repeating a batch size once this many seconds are spent (at least 3 timed runs)
    latency_budget_s: Annotated[float, Field(gt=0, le=3600)] | None = None


def run(ctx: RunContext, stage: EvaluateStage) -> StageRecord:
    """Metric, agreement with the input model, latency per batch size, size."""
    from slimformer.data.datasets import latency_inputs
    from slimformer.models.evaluate import agreement, measure_latency, model_size

    rec = StageRecord(index=0, type=stage.type, config=stage.model_dump())
    q = measure(ctx)  # kept from the stage before when it measured this model already
    if q.preds is not None:
        if q.accuracy is not None:
            rec.metrics["accuracy"] = q.accuracy
        if ctx.reference_preds is None:
            ctx.reference_preds = q.preds
        rec.metrics["agreement"] = agreement(q.preds, ctx.reference_preds)
        rec.metrics["samples"] = len(q.labels)
    if q.fidelity is not None:  # without labels or class scores: fidelity vs the float model
        rec.metrics |= q.fidelity
    if q.task is not None:  # a task's own metrics (stages.taskquality), on held-out rows
        rec.metrics |= q.task
    for b in stage.latency_batch_sizes:
        if ctx.progress:
            ctx.progress(f"latency batch {b}", 0, 1)
        stats = measure_latency(ctx.model, latency_inputs(ctx.eval_data, b),
                                repeats=stage.latency_repeats, budget_s=stage.latency_budget_s)
        rec.latency[f"batch={b}"] = stats
    rec.size = model_size(ctx.model)
    rec.size["macs_per_sample"] = int(ctx.structure.macs)
    return rec
