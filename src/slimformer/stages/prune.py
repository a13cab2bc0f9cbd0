"""The ``prune`` stage: structured pruning; later stages see the smaller model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from slimformer.errors import ModelLoadError
from slimformer.prune.config import PruneConfig
from slimformer.report.model import StageRecord
from slimformer.stages.context import RunContext
from slimformer.store.manifest import stage_entry

if TYPE_CHECKING:
    from slimformer.stages.artifact import Artifact, Restored

# order rules (see slimformer.stages.HANDLERS)
SAVES = "pruned"  # the artifact it writes: <output>/pruned/
QUANTIZES = False
AFTER_QUANTIZED = ("prune must come before quantize/search: a quantized model cannot be pruned "
                   "(put the prune stage first)")


class PruneStage(PruneConfig):
    """Structured pruning (see :class:`~slimformer.prune.config.PruneConfig`).

    Searches and fine-tunes on the data set's train split; later stages see the smaller model
    (its structure rediscovered). With ``save`` it is written to ``<output>/pruned/``. Must come
    before quantization.
    """

    type: Literal["prune"] = "prune"
    save: bool = True
    checkpoint: str | None = None  # folder for resumable search / fine-tuning checkpoints

    def prune_config(self) -> PruneConfig:
        """The plain config, without the stage fields."""
        return PruneConfig(**self.model_dump(exclude={"type", "save", "checkpoint"}))


def run(ctx: RunContext, stage: PruneStage) -> StageRecord:
    """Prune on the train split; later stages get the smaller model and its new structure."""
    from slimformer.models.structure import discover
    from slimformer.prune.api import prune
    from slimformer.prune.serialize import save_pruned

    cfg = stage.prune_config()
    train = ctx.data.get("train") if cfg.needs_training else None
    x = ctx.loaded.example_inputs(2)
    res = prune(ctx.model, cfg, train, None, ctx.structure, ctx.progress, inputs=x,
                checkpoint=stage.checkpoint or ctx.state_dir("prune", cfg))
    ctx.model = res.model
    ctx.slice_spec = res.spec
    ctx.structure = discover(res.model, x, require_attention=False)
    rec = StageRecord(index=0, type=stage.type, config=stage.model_dump(mode="json"))
    heads = [(k, n) for k, n in res.kept["heads"].values()]
    mlp = [(k, n) for k, n in res.kept["mlp"].values()]
    rec.metrics = {"method": cfg.method, "params_before": res.params_before,
                   "params_after": res.params_after, "macs_before": res.macs_before,
                   "macs_after": res.macs_after,
                   f"prunable_{cfg.target}_reduction": round(res.reduction, 3),
                   "heads_kept": f"{sum(k for k, _ in heads)}/{sum(n for _, n in heads)}",
                   "mlp_units_kept": f"{sum(k for k, _ in mlp)}/{sum(n for _, n in mlp)}",
                   "search_seconds": round(res.search_seconds, 2),
                   "finetune_seconds": round(res.finetune_seconds, 2)}
    rec.notes = [res.headline, f"heads kept per attention site: {dict(res.kept['heads'])}",
                 f"MLP units kept per site: {dict(res.kept['mlp'])}", *res.notes]
    if res.kept["dims"]:
        rec.metrics["head_dims_kept"] = " ".join(f"{qk}/{d}" if qk == v else f"{qk},{v}/{d}"
                                                 for qk, v, d in res.kept["dims"].values())
        rec.notes.insert(2, "head dims kept per attention site (q/k, v, of head_dim): "
                         f"{dict(res.kept['dims'])}")
    rec.notes += [f"not sliceable ({kind} site {i}): {why}"
                  for kind, d in res.skipped.items() for i, why in d.items()]
    rec.size["macs_per_sample"] = int(res.macs_after)
    history = list(ctx.history)
    entry = stage_entry("prune", cfg, {**rec.metrics, "size": rec.size})
    ctx.history.append(entry)
    if stage.save:  # the entry's result as it stands when written (with any loss warning)
        spec, model, sspec, result = ctx.model_spec, res.model, res.spec, entry["result"]
        ctx.artifacts[SAVES] = lambda d: save_pruned(model, d, spec, sspec, history, cfg, result)
    return rec


def restore(r: Restored, entry: dict, art: Artifact) -> None:
    """Replay a recorded prune: slice the base model as recorded; a pruned folder's weights load.

    The sliced base is also the float reference of what follows (a quantized folder's).

    Raises:
        ModelLoadError: Two prune stages recorded (one slice spec cannot replay both).
    """
    from slimformer.prune.serialize import load_weights, replay_slices

    if r.slice_spec is not None:
        raise ModelLoadError(f"{art.manifest} records two prune stages but one slice spec: "
                             "prune the float model once, in one prune stage")
    r.slice_spec = replay_slices(r.loaded, art.meta, art.manifest)
    if art.kind == SAVES:
        load_weights(r.loaded.module, art.folder, art.meta)
    r.module = r.loaded.module
