"""The ``search`` stage: sub-networks and bit-widths; later stages see the chosen one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from slimformer.errors import ModelLoadError
from slimformer.nas.config import SearchConfig
from slimformer.report.model import StageRecord
from slimformer.stages.context import RunContext
from slimformer.store.manifest import stage_entry

if TYPE_CHECKING:
    from slimformer.stages.artifact import Artifact, Restored

# order rules (see slimformer.stages.HANDLERS)
SAVES = "search"  # the artifact it writes: <output>/search/
QUANTIZES = True  # the chosen sub-network is quantized
AFTER_QUANTIZED = "the model is quantized already (one quantize stage per recipe)"


class SearchStage(SearchConfig):
    """Multi-objective search over sub-networks and bit-widths (see ``SearchConfig``).

    Sub-networks are measured on ``val_rows`` rows the model was never trained on
    (``RunData.validation``: ``data.val``, else test rows the evaluation does not use; the
    report says which); the train split fine-tunes the super-network. Later stages see the
    chosen sub-network, quantized, in inference form. The default study name is the recipe's;
    the journal and the super-network default to ``<output>/state/search/``.

    With ``worker`` the stage only measures sub-networks into another search's study (its
    ``storage`` and ``supernet_path``, which that search's report names) and leaves the model
    as it was: more processes or machines share the measuring.
    """

    type: Literal["search"] = "search"
    val_rows: Annotated[int, Field(ge=10)] = 1000
    save: bool = True
    worker: bool = False

    @model_validator(mode="after")
    def _worker_has_a_study(self):
        missing = [k for k in ("storage", "supernet_path") if k not in self.model_fields_set]
        if self.worker and missing:
            raise ValueError(f"a worker measures into the study of a search that ran already: "
                             f"set {' and '.join(missing)} to that search's (its report and "
                             "output name them; on the CLI --storage and --supernet)")
        return self

    def search_config(self) -> SearchConfig:
        """The plain config, without the stage fields."""
        return SearchConfig(**self.model_dump(exclude={"type", "val_rows", "save", "worker"}))


def run(ctx: RunContext, stage: SearchStage) -> StageRecord:
    """Search sub-networks and bit-widths; later stages get the chosen one (inference form)."""
    from slimformer.nas.api import search
    from slimformer.nas.output import predictor_lines, save_search
    from slimformer.nas.study import redact
    from slimformer.quantize.inference import to_inference

    train = ctx.data.get("train")  # fine-tunes the super-network
    val, val_note = ctx.data.validation(stage.val_rows, ctx.data.seed)  # never trained on
    calib = ctx.data.get("calib")
    cfg = stage.search_config()
    if "study" not in stage.model_fields_set:
        cfg = cfg.model_copy(update={"study": ctx.name})
    defaults = {key: name for key, name in (("storage", "{study}.journal"),
                                            ("supernet_path", "{study}.supernet.pt"))
                if key not in stage.model_fields_set}
    if defaults:  # journal and super-network live under the output
        # keyed by what a measured trial means: a rerun with a larger budget extends the study
        state = ctx.state_dir("search", cfg.fingerprint(cfg.study))
        cfg = cfg.model_copy(update={k: str(state / name) for k, name in defaults.items()})
    res = search(ctx.model, cfg, train, val, ctx.structure, ctx.progress, calib_data=calib,
                 worker=stage.worker)
    rec = StageRecord(index=0, type=stage.type, config=stage.model_dump(mode="json"))
    if stage.worker:  # measured into the shared study; the model is left as it was
        rec.metrics = {"worker": True, "measured": len(res.measured),
                       "validation_rows": val_note}
        rec.notes = [f"worker: study {cfg.study!r} in {redact(cfg.storage_url())} holds "
                     f"{len(res.measured)} measured sub-networks", *res.notes]
        return rec
    ctx.model = to_inference(res.model)
    ctx.structure = res.structure
    chosen = res.chosen or {}
    rec.metrics = {"measured": len(res.measured), "front": len(res.front),
                   "hypervolume": round(res.hypervolume, 4), "chosen": chosen.get("sub", ""),
                   "val_accuracy": chosen.get("accuracy"),
                   "val_accuracy_int8_full": res.reference.get("accuracy")}
    rec.metrics |= {f"{o}_vs_int8_full": round(chosen[o] / res.reference[o], 3)
                    for o in res.objectives if o != "accuracy" and res.reference.get(o)}
    rec.metrics["validation_rows"] = val_note
    where = (f"study {cfg.study!r} in {redact(cfg.storage_url())}; super-network "
             f"{cfg.supernet_file()}")
    rec.notes = [f"validation rows: {val_note}", "measured Pareto front (validation rows):",
                 *res.table(),
                 *predictor_lines(res), *res.notes,
                 f"{where} (workers: --storage and --supernet, or a search stage with worker: "
                 "true, storage and supernet_path)"]
    public = cfg.model_copy(update={"storage": redact(cfg.storage)})  # no password in files
    history = list(ctx.history)
    ctx.history.append(stage_entry("search", public, {"chosen": rec.metrics["chosen"]}))
    if stage.save:
        spec, sspec = ctx.model_spec, ctx.slice_spec
        ctx.artifacts[SAVES] = lambda d: save_search(res, d, spec, sspec, history, public)
        rec.images["measured Pareto front"] = "search/front.png"  # embedded by the HTML report
    return rec


def restore(r: Restored, entry: dict, art: Artifact) -> None:
    """Replay a recorded search: the chosen float sub-network cut from the (sliced) base model.

    Its ``chosen.json`` and weights are those of the search folder itself; the sub-network is
    also the float reference of what follows.

    Raises:
        ModelLoadError: The search is recorded in another stage's folder (its chosen
            sub-network is not there).
    """
    import dataclasses

    from slimformer.models.structure import discover
    from slimformer.nas.output import load_chosen

    if art.kind != SAVES:
        raise ModelLoadError(f"{art.manifest}: a search stage recorded in a {art.kind} folder "
                             "cannot be replayed (its chosen sub-network lives in the search "
                             "folder); restore the search folder itself")
    lm = r.loaded
    structure = discover(lm.module, lm.example_inputs(2), require_attention=False)
    sub = load_chosen(lm.module, structure, art.folder, art.meta)
    r.loaded, r.module = dataclasses.replace(lm, module=sub), sub
