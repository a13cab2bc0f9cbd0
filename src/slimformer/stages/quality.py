"""The current model's quality on the evaluation rows, and the loss budget every stage meets.

Each stage that changes or deploys the model (quantize, prune, search, export, hls) is compared
with its input on the evaluation rows: accuracy where the rows have labels and the model class
scores; without labels, the output SQNR vs the float model (a deployed file: its agreement with
the model it was made from). A Hugging Face model with a task of
:data:`~slimformer.stages.taskquality.TASKS` is judged by its task metrics instead: a causal LM
by its perplexity (budget: at most ``max_perplexity_ratio`` times its input's), a sentence encoder
or vision backbone by the mean cosine of its embeddings / features with the float model's
(budget: ``min_embedding_cosine``; the probe / k-NN accuracy is reported beside it).
A loss past the recipe's ``max_loss`` (:class:`LossBudget`) becomes a
warning in the stage record (``warnings``), in the manifest entry of the stage, in the report's
headline and on the CLI; with ``max_loss.fail`` it is a :class:`~slimformer.errors.StageError`
and the run writes nothing. The measurement of a model is kept (:func:`measure`) so an evaluate
stage next to the stage does not evaluate it twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from pydantic import Field, model_validator

from slimformer.errors import StageError
from slimformer.report.model import StageRecord
from slimformer.stages.context import RunContext, _Strict, evaluate_model
from slimformer.stages.taskquality import TASKS, task_metrics

if TYPE_CHECKING:
    import torch

GATED = ("quantize", "qat", "prune", "search", "export", "hls")
# gated stages that leave the model as it is: measured only where their record is compared
# (an export that evaluates nothing, e.g. ``slimformer export onnx``, costs no evaluation)
KEEPS_MODEL = ("export",)


class LossBudget(_Strict):
    """How much quality one stage may lose against its input before slimformer warns.

    ``max_loss: 3`` is short for ``max_loss: {accuracy_points: 3}``. A field set to null turns
    its check off.

    Attributes:
        accuracy_points: Largest accuracy drop in percentage points (5: 0.96 -> 0.91 passes,
            0.96 -> 0.90 warns). For a deployed file (export, hls) without labels: the largest
            share of rows, in points, whose predicted class differs from the input model's.
        min_sqnr_db: Without labels (output fidelity only): the floor of the output SQNR vs the
            float model; a stage that takes it below the floor (and below its input's) warns.
            10 dB is an output error of a tenth of the signal's power (cosine about 0.95).
        max_perplexity_ratio: Causal LMs: the largest perplexity, as a multiple of the
            input model's on the same held-out tokens (2: 20.0 -> 40.0 passes, 41.0 warns).
        min_embedding_cosine: Sentence encoders and vision backbones: the floor of the mean
            cosine of their embeddings / features with the float model's on the evaluation rows
            (0.95: a W8A8 MiniLM keeps about 0.99; a broken one falls far below).
        fail: Make a loss past the budget an error (StageError, exit 2) instead of a warning;
            the run then writes no report and no model (only resumable state, as any failed
            run).
    """

    accuracy_points: Annotated[float, Field(ge=0, le=100)] | None = 5.0
    min_sqnr_db: Annotated[float, Field(ge=-100, le=200)] | None = 10.0
    max_perplexity_ratio: Annotated[float, Field(ge=1, le=1000)] | None = 2.0
    min_embedding_cosine: Annotated[float, Field(ge=-1, le=1)] | None = 0.95
    fail: bool = False

    @model_validator(mode="before")
    @classmethod
    def _number(cls, v):
        if isinstance(v, int | float) and not isinstance(v, bool):
            return {"accuracy_points": v}
        return v


@dataclass
class Quality:
    """One model measured on the evaluation rows.

    Attributes:
        model: The module measured (the key of the kept measurement).
        preds: (N,) predicted classes, or None for a model without class scores.
        labels: (N,) labels as the data gives them (zeros without labels), or None.
        accuracy: Share of correct predictions, or None without labels or class scores.
        fidelity: Without labels or class scores: ``output_cosine_min``,
            ``output_sqnr_db_min``, ``samples``, ``outputs`` (and ``agreement_with_float``).
        task: The task metrics of a model with a task of ``taskquality.TASKS``
            (:func:`slimformer.stages.taskquality.task_metrics`), else None.
    """

    model: object
    preds: torch.Tensor | None
    labels: torch.Tensor | None
    accuracy: float | None
    fidelity: dict | None
    task: dict | None = None


def measure(ctx: RunContext) -> Quality:
    """The quality of ``ctx.model`` on the evaluation rows, measured once per model."""
    q = ctx.measured
    if q is not None and q.model is ctx.model:
        return q
    task = getattr(ctx.loaded, "task", None)
    if task in TASKS and ctx.data is not None:
        found = task_metrics(ctx.model, ctx.loaded.module, task, ctx.data, min(ctx.batch_size, 64),
                             ctx.task_cache)
        ctx.measured = Quality(ctx.model, None, None, None, None, found)
        return ctx.measured
    has_labels = getattr(ctx.eval_data, "has_labels", True)
    preds = labels = accuracy = fidelity = None
    if _has_class_scores(ctx.model, ctx.eval_data):
        preds, labels = evaluate_model(ctx.model, ctx.eval_data, ctx.batch_size, ctx.progress)
        if has_labels:
            accuracy = float((preds == labels).float().mean())
    if not has_labels or preds is None:  # without labels: fidelity against the float model
        fidelity = _fidelity(ctx)
    ctx.measured = Quality(ctx.model, preds, labels, accuracy, fidelity)
    return ctx.measured


def runtime_metrics(ctx: RunContext, rec: StageRecord, preds):
    """Accuracy and agreements of a runtime's predictions ``preds (N,)`` on ``ctx.eval_data``.

    Beside the model's own predictions (:func:`measure`, measured once) and the float reference's;
    returns the labels (None without labels) for further runtimes to score against.
    """
    from slimformer.models.evaluate import agreement

    q = measure(ctx)
    torch_preds, labels = (q.preds, q.labels) if q.preds is not None else \
        evaluate_model(ctx.model, ctx.eval_data, ctx.batch_size)
    if getattr(ctx.eval_data, "has_labels", True):
        rec.metrics["accuracy"] = float((preds == labels).float().mean())
    rec.metrics["agreement_with_pytorch"] = agreement(preds, torch_preds)
    if ctx.reference_preds is not None:
        rec.metrics["agreement"] = agreement(preds, ctx.reference_preds)
    return labels


def run(ctx: RunContext, index: int, stage, handler: Callable[[RunContext, object], StageRecord],
        budget: LossBudget) -> StageRecord:
    """Run one stage through ``handler``; a gated stage is compared with its input (:func:`check`).

    Raises:
        StageError: A loss past the budget with ``budget.fail``.
    """
    if stage.type not in GATED:
        return handler(ctx, stage)
    keeps = stage.type in KEEPS_MODEL
    before, entries = None if keeps else measure(ctx), len(ctx.history)
    rec = handler(ctx, stage)
    if not keeps:  # the stage may have changed the model in place: measure it afresh
        ctx.measured = None
    check(ctx, index, rec, before, budget)
    if rec.warnings and len(ctx.history) > entries:  # the stage's manifest entry says it too
        ctx.history[-1].setdefault("result", {}).setdefault("warnings", []).extend(rec.warnings)
    return rec


def check(ctx: RunContext, index: int, rec: StageRecord, before: Quality | None,
          budget: LossBudget) -> None:
    """Compare the stage's result with its input ``before``; warn (or raise) past ``budget``.

    ``before`` None: the stage left the model as it was (:data:`KEEPS_MODEL`); it is measured
    here where the record has something to compare.

    Adds ``metrics["vs_input"]`` (what was compared, both values, the loss and the budget) and,
    past the budget, a line to ``rec.warnings``.

    Raises:
        StageError: Past the budget with ``budget.fail``.
    """
    found = _compare(ctx, rec, before)
    if found is None:
        return
    what, b, a, kind = found
    rows = len(ctx.eval_data)
    entry = {"metric": what, "input": _num(b), "output": _num(a)}
    if kind == "perplexity":
        limit = budget.max_perplexity_ratio
        entry |= {"ratio": _num(a / b) if b > 0 else "inf", "budget_ratio": limit}
        over = limit is not None and a > limit * b
        text = (f"{what} {b:.2f} -> {a:.2f} on the held-out tokens: more than {limit:g}x the input's "
                "(max_loss.max_perplexity_ratio)") if over else ""
    elif kind == "cosine":
        floor = budget.min_embedding_cosine
        entry |= {"floor": floor}
        over = floor is not None and a < floor and a < b
        text = (f"{what} {b:.4f} -> {a:.4f} vs the float model on the {rows} evaluation rows, "
                f"below the "
                f"{floor:g} floor (max_loss.min_embedding_cosine)") if over else ""
    elif kind == "sqnr":
        floor = budget.min_sqnr_db
        entry |= {"floor_db": floor}
        over = floor is not None and a < floor and a < b
        text = (f"{what} {_db(b)} -> {_db(a)} vs the float model on the {rows} evaluation rows, "
                f"below the {floor:g} dB floor (max_loss.min_sqnr_db)") if over else ""
    else:
        loss = 100 * (b - a)
        limit = budget.accuracy_points
        entry |= {"loss_points": round(loss, 2), "budget_points": limit}
        over = limit is not None and loss > limit
        text = (f"{what} {b:.4f} -> {a:.4f} on the {rows} evaluation rows: {loss:.1f} points "
                f"lost, past the budget of {limit:g} (max_loss.accuracy_points)") if over else ""
    entry["within_budget"] = not over
    rec.metrics["vs_input"] = entry
    if not over:
        return
    if budget.fail:
        raise StageError(f"stages[{index}] ({rec.type}): {text}; max_loss.fail (--fail-on-loss) "
                         "makes this an error: no report or model was written. Allowed: a loss within "
                         "the budget; raise it (max_loss, --max-loss) or change the stage's "
                         "settings (e.g. more fine-tuning, more bits)")
    rec.warnings.append(f"{rec.type} (stage {index}): {text}")


def _compare(ctx: RunContext, rec: StageRecord, before: Quality | None):
    """``(what, input value, output value, kind)`` of the stage, or None when not comparable."""
    m = rec.metrics
    if rec.type in ("export", "hls"):
        key = "accuracy" if rec.type == "export" else "csim_accuracy_csim"
        if _finite(m.get(key)) and before is None:
            before = measure(ctx)  # kept from the stage's own evaluation
        if _finite(m.get(key)) and before.accuracy is not None:
            where = "ONNX Runtime accuracy" if rec.type == "export" else "C-simulation accuracy"
            return where, before.accuracy, m[key], "accuracy"
        if rec.type == "export" and _finite(m.get("agreement_with_pytorch")):
            return "agreement with the model", 1.0, m["agreement_with_pytorch"], "agreement"
        return None
    if ctx.model is before.model:  # e.g. a search worker: the model was left as it was
        return None
    after = measure(ctx)
    if before.task and after.task:
        return _compare_task(before.task, after.task)
    if before.accuracy is not None and after.accuracy is not None:
        return "accuracy", before.accuracy, after.accuracy, "accuracy"
    if before.fidelity and after.fidelity:
        return ("output SQNR", before.fidelity["output_sqnr_db_min"],
                after.fidelity["output_sqnr_db_min"], "sqnr")
    return None


def _compare_task(b: dict, a: dict):
    """The gated comparison of two task measurements: perplexity, else the mean cosine."""
    if "perplexity" in a:
        return "perplexity", b["perplexity"], a["perplexity"], "perplexity"
    key = next(k for k in a if k.endswith("_cosine_mean"))
    return key.replace("_", " "), b[key], a[key], "cosine"


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


def _finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _num(v: float) -> float | str:
    return round(v, 4) if math.isfinite(v) else str(v)  # JSON has no inf


def _db(v: float) -> str:
    return f"{v:.1f} dB" if math.isfinite(v) else "exact"
