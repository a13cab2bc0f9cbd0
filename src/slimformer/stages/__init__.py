"""The stages of a run: one module per stage with its recipe schema and its handler.

Each module holds ``<Name>Stage`` (the recipe schema: the algorithm's config plus stage fields)
and ``run(ctx, stage) -> StageRecord``; :data:`HANDLERS` is the explicit table the pipeline (and
through it the CLI) dispatches on. Stages sit between the pipeline and the algorithm packages.
"""

from __future__ import annotations
