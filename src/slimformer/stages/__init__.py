"""The stages of a run: one module per stage with its recipe schema, handler, restore and order.

Each module holds ``<Name>Stage`` (the recipe schema: the algorithm's config plus stage fields)
and ``run(ctx, stage) -> StageRecord``; a stage that changes the model also holds, beside it,
``restore(restored, entry, artifact)`` (replays its recorded manifest entry on a restored model,
see :mod:`slimformer.stages.artifact`) and its order rules (``SAVES``, ``QUANTIZES``,
``AFTER_QUANTIZED``). :data:`HANDLERS` is the explicit table the pipeline (and through it the
CLI), the recipe's order checks and the artifact restore dispatch on. Stages sit between the
pipeline and the algorithm packages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slimformer.stages import evaluate, export, generate, hls, prune, qat, quantize, search


@dataclass(frozen=True)
class Handler:
    """One stage type.

    Attributes:
        schema: The recipe schema (``QuantizeStage``, ...).
        run: ``run(ctx, stage) -> StageRecord``.
        restore: ``restore(restored, entry, artifact)``: replays the stage's manifest entry on a
            model being restored; None for a stage that leaves the model as it is (never
            recorded in an artifact).
        saves: The artifact kind it writes (its sub-folder of a run folder), or None.
        quantizes: The model is quantized after it.
        after_quantized: Why it cannot follow a quantizing stage (None: it can).
        needs_quantized: Why it must follow a quantizing stage or start from a quantized
            folder (None: it need not).
        calibrates: ``calibrates(stage)``: it reads calibration or training rows (a user's one
            data source is then split in two; when no stage of a run does, every row is
            evaluated, see :class:`~slimformer.stages.context.RunData`).
        needs_data: False: it also runs on a model without any data (synthetic example inputs).
    """

    schema: type
    run: Callable[[Any, Any], Any]
    restore: Callable[[Any, dict, Any], None] | None = None
    saves: str | None = None
    quantizes: bool = False
    after_quantized: str | None = None
    needs_quantized: str | None = None
    calibrates: Callable[[Any], bool] = lambda stage: False
    needs_data: bool = True


def _always(stage) -> bool:
    return True


HANDLERS: dict[str, Handler] = {
    "evaluate": Handler(evaluate.EvaluateStage, evaluate.run),
    "quantize": Handler(quantize.QuantizeStage, quantize.run, quantize.restore, quantize.SAVES,
                        quantize.QUANTIZES, quantize.AFTER_QUANTIZED, calibrates=_always),
    "prune": Handler(prune.PruneStage, prune.run, prune.restore, prune.SAVES, prune.QUANTIZES,
                     prune.AFTER_QUANTIZED,
                     calibrates=lambda stage: stage.needs_training),  # upop, fine-tuning
    "qat": Handler(qat.QatStage, qat.run, qat.restore, qat.SAVES, qat.QUANTIZES,
                   qat.AFTER_QUANTIZED, calibrates=_always, needs_quantized=qat.NEEDS_QUANTIZED),
    "search": Handler(search.SearchStage, search.run, search.restore, search.SAVES,
                      search.QUANTIZES, search.AFTER_QUANTIZED, calibrates=_always),
    "hls": Handler(hls.HlsStage, hls.run, calibrates=_always),  # the fixed-point ranges
    "export": Handler(export.ExportStage, export.run, needs_data=False),
    "generate": Handler(generate.GenerateStage, generate.run, needs_data=False),
}
