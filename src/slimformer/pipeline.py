"""Run the stages of a recipe in order and record what each did.

Data flows one way: load -> discover structure -> stages -> model files -> report. Each stage
type has one handler in the explicit table :data:`slimformer.stages.HANDLERS`; its ``run`` takes
the run context and its stage config and returns a
:class:`~slimformer.report.model.StageRecord`. The pipeline keeps the order, the timing, the
output folder, writes the stages' model files and then the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from slimformer import __version__
from slimformer.data.datasets import latency_inputs  # noqa: F401 - re-exported for the CLI
from slimformer.data.rng import keeps_rng
from slimformer.recipe import Recipe
from slimformer.report.model import Report, environment
from slimformer.stages import HANDLERS, quality
from slimformer.stages.context import (  # noqa: F401 - re-exported: the CLI and tests use them
    Progress,
    RunContext,
    RunData,
    check_fit,
    evaluate_model,
)


@dataclass(frozen=True)
class RunResult:
    """A finished run: its report and the folder it was written to."""

    report: Report
    out_dir: Path


def _structure_summary(smap) -> dict:
    return {
        "norms_feeding_linears": len(smap.norms),
        "norm_linear_pairs": smap.norm_linear_pairs,
        "foldable_norms": sum(n.foldable for n in smap.norms),
        "attention_sites": len(smap.attention),
        "attention_kinds": ", ".join(sorted({a.kind for a in smap.attention})) or
        "none found (no softmax of scores, scaled_dot_product_attention or nn.MultiheadAttention)",
        "heads": ", ".join(str(h) for h in sorted({a.heads for a in smap.attention})),
        "mlps": len(smap.mlps),
        "linears": len(smap.linears),
        "convs": len(smap.convs),
        "params": smap.params,
        "macs_per_sample": smap.macs,
    }


@keeps_rng
def run(recipe: Recipe, progress: Progress | None = None,
        out_dir: str | Path | None = None, overwrite: bool | None = None) -> RunResult:
    """Run ``recipe`` and write its report; returns the report and the output folder.

    The output folder is checked and locked before any work (see
    :mod:`slimformer.store.outdir`): it must be new, empty, or an earlier slimformer output
    with ``overwrite`` (default: the recipe's ``output.overwrite``). It is built beside the old
    one and swapped in only when every stage and the report are complete.

    Raises:
        OutputError: The output path is refused or another run is writing it.
    """
    from slimformer.store.outdir import staged_dir

    out = Path(out_dir) if out_dir is not None else recipe.output_dir()
    overwrite = recipe.output.overwrite if overwrite is None else overwrite
    with staged_dir(out, overwrite) as staging:
        return _run_in(recipe, progress, out, staging)


def _load(recipe: Recipe):
    """``(loaded, model, base spec, slice spec, applied stage entries)`` of the recipe's model.

    A saved slimformer folder (``source: artifact``) is restored by replaying its stages; a
    stage that cannot follow them (prune or quantize after quantize, qat on a float model) is
    refused here.
    """
    from slimformer.errors import StageError
    from slimformer.stages.artifact import load

    r = load(recipe.model)
    quantized = r.quantized
    for i, st in enumerate(recipe.stages):
        rules = HANDLERS[st.type]
        if r.quantized and rules.after_quantized:
            raise StageError(f"stages[{i}]: {recipe.model.path} holds a quantized model "
                             f"(stages applied: {', '.join(r.applied)}); a {st.type} stage must "
                             "come before quantization: start from its float input instead")
        if rules.needs_quantized and not quantized:
            raise StageError(f"stages[{i}]: the model is not quantized (stages applied: "
                             f"{', '.join(r.applied) or 'none'}); {rules.needs_quantized}")
        quantized |= rules.quantizes
    return r.loaded, r.module, r.loaded.spec if r.folder else recipe.model, r.slice_spec, \
        r.history


def _run_in(recipe: Recipe, progress: Progress | None, out: Path, staging: Path) -> RunResult:
    from slimformer.models.structure import discover
    from slimformer.store.outdir import scratch_in

    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    if progress:
        progress("load model", 0, 1)
    loaded, model, base_spec, slice_spec, history = _load(recipe)
    # a model without attention (MLP-only, Fourier mixing) runs too: the stages that need
    # attention (a softmax quantizer asked for, pruning heads) refuse with their own reason
    smap = discover(loaded.module, loaded.example_inputs(2), require_attention=False)
    rules = [(HANDLERS[s.type], s) for s in recipe.stages]
    data = RunData(loaded, recipe.data, recipe.seed, any(h.calibrates(s) for h, s in rules),
                   any(h.needs_data for h, _ in rules))
    dataset_name, eval_data = data.label, data.eval_rows()
    ctx = RunContext(recipe.name, base_spec, recipe.data.batch_size, model, loaded,
                     smap, eval_data, progress=progress, staging=staging, data=data,
                     slice_spec=slice_spec, out=out, history=list(history))
    with scratch_in(staging / ".scratch"):  # temporary files of the stages, removed after
        for i, stage in enumerate(recipe.stages):
            if progress:
                progress(f"stage {i + 1}/{len(recipe.stages)}: {stage.type}", i,
                         len(recipe.stages))
            s0 = time.perf_counter()
            rec = quality.run(ctx, i, stage, HANDLERS[stage.type].run, recipe.max_loss)
            rec.index, rec.seconds = i, time.perf_counter() - s0
            ctx.records.append(rec)
    from slimformer.models.evaluate import model_size
    from slimformer.report.render import write_report_files
    from slimformer.report.summary import headline

    report = Report(
        slimformer_version=__version__, name=recipe.name,
        recipe=recipe.model_dump(mode="json"),
        model={"spec": recipe.model.model_dump(mode="json"), "class": type(loaded.module).__name__,
               "task": getattr(loaded, "task", None),
               **model_size(loaded.module), "macs_per_sample": smap.macs,
               "applied_stages": [h["stage"] for h in history]},
        structure=_structure_summary(smap),
        data={"dataset": dataset_name, "eval_split": recipe.data.eval_split,
              "eval_samples": len(eval_data) if eval_data is not None else 0,
              **({"labels": data.notes} if data.notes else {})},
        stages=ctx.records,
        metrics=dict(ctx.records[-1].metrics) if ctx.records else {},
        environment=environment(),
        seeds={"recipe": recipe.seed},
    )
    report.headline = headline(report)
    report.total_seconds = time.perf_counter() - t0
    for name, writer in ctx.artifacts.items():  # the model files first: the HTML embeds their images
        writer(staging / name)
    write_report_files(report, staging)
    return RunResult(report, out)


