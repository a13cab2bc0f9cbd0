"""Run the stages of a recipe in order and record what each did.

Data flows one way: load -> discover structure -> stages (evaluate now; prune, search, quantize,
export and hls as their issues land) -> report. Each stage type has one handler in the explicit
table :data:`STAGE_HANDLERS`; a handler takes the run context and its stage config and returns a
:class:`~slimformer.report.model.StageRecord`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimformer import __version__
from slimformer.errors import DataError
from slimformer.recipe import (
    EvaluateStage,
    ExportStage,
    HlsStage,
    PruneStage,
    QuantizeStage,
    Recipe,
    SearchStage,
)
from slimformer.report.model import Report, StageRecord, environment

# progress(description, completed, total): called by long steps; None = silent.
Progress = Callable[[str, int, int], None]


@dataclass
class RunContext:
    """What stages share: the current model, its structure, the data and reference predictions."""

    recipe: Recipe
    model: torch.nn.Module
    loaded: object
    structure: object
    eval_data: object
    reference_preds: torch.Tensor | None = None
    progress: Progress | None = None
    records: list[StageRecord] = field(default_factory=list)
    artifacts: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # dir -> writer
    slice_spec: object = None  # set by a prune stage: how the base model was sliced
    data: RunData | None = None
    staging: Path | None = None  # the output folder being built (swapped in when complete)

    def artifact_dir(self, name: str) -> Path:
        """A sub-folder ``name`` of the output being built, for a stage to write into."""
        if self.staging is None:  # pragma: no cover - run() always sets it
            raise RuntimeError("no output folder is being written")
        folder = self.staging / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder


class RunData:
    """The rows a run uses, by role: ``eval``, ``calib`` and ``train``, checked against the model.

    Built-in data set: its eval / calib / train splits. The user's own ``source``: one seeded
    split into ``calib_rows`` calibration rows and the rest for evaluation (never overlapping);
    training stages use the calibration rows. ``calib`` / ``eval`` sources replace either role.
    """

    def __init__(self, loaded, cfg, seed: int = 0):
        self.loaded, self.cfg, self.seed = loaded, cfg, seed
        self.builtin = cfg.dataset or loaded.dataset
        self._cache: dict[str, object] = {}
        if not cfg.own and self.builtin is None:
            raise DataError("no data: this model has no built-in data set; give your own "
                            "(recipe data.source, CLI --data PATH: a CSV/TSV/JSONL/text file, an "
                            "image folder, a datasets folder or parquet file, .safetensors/.npz) "
                            "or a built-in one")

    @property
    def label(self) -> str:
        """What the report calls the data."""
        c = self.cfg
        own = [f"{role} {getattr(getattr(c, role), 'path', None) or getattr(c, role).name}"
               for role in ("source", "calib", "eval") if getattr(c, role) is not None]
        return ", ".join(own) if own else str(self.builtin)

    def _load(self, source):
        from slimformer.data.sources import load_source

        m = self.loaded
        model_dir = getattr(m.spec, "path", None)
        import inspect

        accepts = list(inspect.signature(m.module.forward).parameters)
        return load_source(source, m.input_specs, model_dir, accepts=accepts)

    def _split(self):
        from slimformer.data.sources import split_source

        if "split" not in self._cache:
            full = self._load(self.cfg.source)
            rows = min(self.cfg.calib_rows, max(1, len(full) // 2))
            self._cache["split"] = split_source(full, rows, self.seed)
        return self._cache["split"]

    def get(self, role: str):
        """The data set for ``role`` (``eval``, ``calib`` or ``train``), loaded once, checked."""
        if role in self._cache:
            return self._cache[role]
        from slimformer.data.datasets import get_dataset

        c = self.cfg
        given = c.eval if role == "eval" else c.calib
        if given is not None:
            ds = self._load(given)
        elif c.source is not None:
            ds = self._split()[1 if role == "eval" else 0]
        elif self.builtin is None:
            raise DataError(f"no {role} data: give data.{'eval' if role == 'eval' else 'calib'}")
        elif role == "eval":
            ds = get_dataset(self.builtin, c.eval_split)
        else:
            ds = get_dataset(self.builtin, c.calib_split if role == "calib" else "train")
        if role == "eval" and c.eval_limit is not None and c.eval_limit < len(ds):
            ds = ds.select(torch.arange(c.eval_limit))
        check_fit(self.loaded, ds)
        self._cache[role] = ds
        return ds


@dataclass(frozen=True)
class RunResult:
    """A finished run: its report and the folder it was written to."""

    report: Report
    out_dir: Path


def evaluate_model(model: torch.nn.Module, dataset, batch_size: int = 256,
                   progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and labels of ``model`` on ``dataset`` (a progress bar via ``progress``)."""
    from slimformer.data.datasets import make_loader
    from slimformer.models.evaluate import predict

    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress("evaluate", done[0], len(dataset))

    return predict(model, make_loader(dataset, batch_size), tick)


def latency_inputs(dataset, batch: int) -> dict[str, torch.Tensor]:
    """A batch of ``batch`` real rows (repeated if the data set is smaller)."""
    idx = torch.arange(batch) % len(dataset)
    return {k: v[idx] for k, v in dataset.inputs.items()}


def run_evaluate(ctx: RunContext, stage: EvaluateStage) -> StageRecord:
    """Metric, agreement with the input model, latency per batch size, size."""
    from slimformer.models.evaluate import agreement, measure_latency, model_size

    rec = StageRecord(index=0, type=stage.type, config=stage.model_dump())
    if _has_class_scores(ctx.model, ctx.eval_data):
        preds, labels = evaluate_model(ctx.model, ctx.eval_data, ctx.recipe.data.batch_size,
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
                               make_loader(ctx.eval_data, ctx.recipe.data.batch_size))
    out = {"output_cosine_min": round(res["cosine"], 6),
           "output_sqnr_db_min": round(res["sqnr_db"], 2), "samples": len(ctx.eval_data),
           "outputs": len(res["outputs"])}
    if res.get("agreement") is not None:
        out["agreement_with_float"] = res["agreement"]
    return out


def run_quantize(ctx: RunContext, stage: QuantizeStage) -> StageRecord:
    """Calibrate on the recipe's calibration split, switch the run to the inference form."""
    from slimformer.quantize.api import quantize
    from slimformer.quantize.inference import to_inference
    from slimformer.quantize.serialize import save_quantized

    calib = ctx.data.get("calib")
    cfg = stage.quant_config()
    res = quantize(ctx.model, cfg, calib, ctx.structure,
                   progress=ctx.progress)
    ctx.model = to_inference(res.model)
    rec = StageRecord(index=0, type=stage.type, config=stage.model_dump(mode="json"))
    rec.metrics = {"calib_samples": res.calib_samples, "calib_seconds": round(res.seconds, 2),
                   "method": cfg.method, "bits": f"W{cfg.weight_bits}A{cfg.act_bits}"}
    rec.notes = res.notes
    if stage.save:
        spec, model, sspec = ctx.recipe.model, ctx.model, ctx.slice_spec
        ctx.artifacts["quantized"] = lambda d: save_quantized(model, d, spec, sspec)
    return rec


def run_prune(ctx: RunContext, stage: PruneStage) -> StageRecord:
    """Prune on the train split; later stages get the smaller model and its new structure."""
    from slimformer.models.structure import discover
    from slimformer.prune.api import prune
    from slimformer.prune.serialize import save_pruned

    cfg = stage.prune_config()
    train = ctx.data.get("train") if cfg.needs_training else None
    x = ctx.loaded.example_inputs(2)
    res = prune(ctx.model, cfg, train, None, ctx.structure, ctx.progress, inputs=x)
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
    if stage.save:
        spec, model, sspec = ctx.recipe.model, res.model, res.spec
        ctx.artifacts["pruned"] = lambda d: save_pruned(model, sspec, d, spec, cfg)
    return rec


def run_search(ctx: RunContext, stage: SearchStage) -> StageRecord:
    """Search sub-networks and bit-widths; later stages get the chosen one (inference form)."""
    from slimformer.nas.api import search, split_holdout
    from slimformer.nas.output import predictor_lines, write_search
    from slimformer.quantize.inference import to_inference

    train, val = split_holdout(ctx.data.get("train"), stage.val_rows)
    calib = ctx.data.get("calib")
    cfg = stage.search_config()
    if "study" not in stage.model_fields_set:
        cfg = cfg.model_copy(update={"study": ctx.recipe.name})
    res = search(ctx.model, cfg, train, val, ctx.structure, ctx.progress, calib_data=calib)
    ctx.model = to_inference(res.model)
    ctx.structure = res.structure
    rec = StageRecord(index=0, type=stage.type, config=stage.model_dump(mode="json"))
    chosen = res.chosen or {}
    rec.metrics = {"measured": len(res.measured), "front": len(res.front),
                   "hypervolume": round(res.hypervolume, 4), "chosen": chosen.get("sub", ""),
                   "val_accuracy": chosen.get("accuracy"),
                   "val_accuracy_int8_full": res.reference.get("accuracy")}
    rec.metrics |= {f"{o}_vs_int8_full": round(chosen[o] / res.reference[o], 3)
                    for o in res.objectives if o != "accuracy" and res.reference.get(o)}
    rec.notes = ["measured Pareto front (validation rows):", *res.table(),
                 *predictor_lines(res), *res.notes]
    if stage.save:
        ctx.artifacts["search"] = lambda d: write_search(res, d)
    return rec


def run_hls(ctx: RunContext, stage: HlsStage) -> StageRecord:
    """Build, compile and C-simulate an hls4ml project of the current model; ``hls/`` artifact."""
    from slimformer.hardware.api import build_hls, summary

    calib = ctx.data.get("calib")
    res = build_hls(ctx.model, stage.hls_config(), ctx.artifact_dir("hls"), calib,
                    ctx.eval_data if stage.csim else None, compile=stage.csim)
    rec = StageRecord(index=0, type=stage.type, config=stage.model_dump(mode="json"))
    where = str(res.project_dir)  # the staging folder: name it as the run folder's hls/
    rec.metrics = {k: v.replace(where, "hls") if isinstance(v, str) else v
                   for k, v in summary(res).items()}
    rec.notes = [n.replace(where, "hls") for n in res.notes]
    return rec


def run_export(ctx: RunContext, stage: ExportStage) -> StageRecord:
    """Export the current model to ONNX (and TensorRT); ``export/`` artifact (see ExportStage)."""
    return _export_into(ctx, stage, ctx.artifact_dir("export"))


def _export_into(ctx: RunContext, stage: ExportStage, tmp: Path) -> StageRecord:
    from slimformer.export.onnx import export_onnx
    from slimformer.export.parity import latency, predict
    from slimformer.export.tensorrt import build_engine, tensorrt_available, trtexec_command
    from slimformer.models.evaluate import agreement

    onnx_path = tmp / "model.onnx"
    res = export_onnx(ctx.model, onnx_path, latency_inputs(ctx.eval_data, stage.example_rows),
                      stage.onnx_config())
    rec = StageRecord(index=0, type=stage.type, config=stage.model_dump(mode="json"))
    rec.metrics = {"opset": res.opset, "quantized": res.quantized,
                   "dynamic_axes": str(res.inputs), "file_bytes": res.size_bytes,
                   "export_seconds": round(res.seconds, 2),
                   **{f"parity_{k}_cosine": v["cosine"] for k, v in res.parity.items()},
                   **{f"parity_{k}_within_1_step": v["within_1_step"] for k, v in
                      res.parity.items()},
                   **{f"ort_{k}": v for k, v in res.fusion.items()},
                   "lint_errors": sum(f.severity == "error" for f in res.lint),
                   "lint_warnings": sum(f.severity == "warning" for f in res.lint)}
    if stage.evaluate:
        preds = predict(onnx_path, ctx.eval_data, ctx.recipe.data.batch_size, stage.threads)
        torch_preds, labels = evaluate_model(ctx.model, ctx.eval_data, ctx.recipe.data.batch_size)
        if getattr(ctx.eval_data, "has_labels", True):
            rec.metrics["accuracy"] = float((preds == labels).float().mean())
        rec.metrics["agreement_with_pytorch"] = agreement(preds, torch_preds)
        if ctx.reference_preds is not None:
            rec.metrics["agreement"] = agreement(preds, ctx.reference_preds)
    for b in stage.latency_batch_sizes:
        rec.latency[f"onnxruntime batch={b}"] = latency(
            onnx_path, latency_inputs(ctx.eval_data, b), stage.latency_repeats,
            threads=stage.threads)
    rec.size = {"bytes": res.size_bytes}
    rec.notes = list(res.warnings) + [f"{f.rule} {f.severity} at {f.node}: {f.message}"
                                      for f in _first_per_rule(res.lint)]
    if stage.tensorrt is not None:
        engine = tmp / "model.plan"
        if tensorrt_available():
            eng = build_engine(onnx_path, engine, stage.tensorrt)
            rec.metrics["tensorrt_engine_bytes"] = eng.size_bytes
        else:
            from slimformer.export.tensorrt import profile_shapes

            cmd = trtexec_command("model.onnx", "model.plan", stage.tensorrt,
                                  profile_shapes(onnx_path, stage.tensorrt))
            (tmp / "model.plan.trtexec.sh").write_text(f"#!/usr/bin/env bash\n{cmd}\n")
            rec.notes.append("TensorRT is not installed here (import tensorrt failed): no engine "
                             f"built; run export/model.plan.trtexec.sh on a GPU machine: {cmd}")
    return rec


def _first_per_rule(findings: list) -> list:
    """One finding per (rule, severity), with how many more there are."""
    seen, out = {}, []
    for f in findings:
        key = (f.rule, f.severity)
        if key not in seen:
            seen[key] = f
            out.append(f)
    return out


STAGE_HANDLERS: dict[type, Callable[[RunContext, object], StageRecord]] = {
    EvaluateStage: run_evaluate,
    QuantizeStage: run_quantize,
    PruneStage: run_prune,
    SearchStage: run_search,
    HlsStage: run_hls,
    ExportStage: run_export,
}


def _structure_summary(smap) -> dict:
    return {
        "norms_feeding_linears": len(smap.norms),
        "norm_linear_pairs": smap.norm_linear_pairs,
        "foldable_norms": sum(n.foldable for n in smap.norms),
        "attention_sites": len(smap.attention),
        "attention_kinds": ", ".join(sorted({a.kind for a in smap.attention})),
        "heads": ", ".join(str(h) for h in sorted({a.heads for a in smap.attention})),
        "mlps": len(smap.mlps),
        "linears": len(smap.linears),
        "convs": len(smap.convs),
        "params": smap.params,
        "macs_per_sample": smap.macs,
    }


def run(recipe: Recipe, progress: Progress | None = None,
        out_dir: str | Path | None = None, overwrite: bool | None = None) -> RunResult:
    """Run ``recipe`` and write its report; returns the report and the output folder.

    The output folder is checked and locked before any work (see
    :mod:`slimformer.report.outdir`): it must be new, empty, or an earlier slimformer output
    with ``overwrite`` (default: the recipe's ``output.overwrite``). It is built beside the old
    one and swapped in only when every stage and the report are complete.

    Raises:
        OutputError: The output path is refused or another run is writing it.
    """
    from slimformer.report.outdir import staged_dir

    out = Path(out_dir) if out_dir is not None else recipe.output_dir()
    overwrite = recipe.output.overwrite if overwrite is None else overwrite
    with staged_dir(out, overwrite) as staging:
        return _run_in(recipe, progress, out, staging)


def _run_in(recipe: Recipe, progress: Progress | None, out: Path, staging: Path) -> RunResult:
    from slimformer.models.loading import load_model
    from slimformer.models.structure import discover
    from slimformer.report.outdir import scratch_in

    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    if progress:
        progress("load model", 0, 1)
    loaded = load_model(recipe.model)
    smap = discover(loaded.module, loaded.example_inputs(2), require_attention=True)
    data = RunData(loaded, recipe.data, recipe.seed)
    dataset_name, eval_data = data.label, data.get("eval")
    ctx = RunContext(recipe, loaded.module, loaded, smap, eval_data, progress=progress,
                     staging=staging, data=data)
    with scratch_in(staging / ".scratch"):  # temporary files of the stages, removed after
        for i, stage in enumerate(recipe.stages):
            s0 = time.perf_counter()
            rec = STAGE_HANDLERS[type(stage)](ctx, stage)
            rec.index, rec.seconds = i, time.perf_counter() - s0
            ctx.records.append(rec)
    from slimformer.models.evaluate import model_size
    from slimformer.report.render import write_report_files

    report = Report(
        slimformer_version=__version__, name=recipe.name,
        recipe=recipe.model_dump(mode="json"),
        model={"spec": recipe.model.model_dump(mode="json"), "class": type(loaded.module).__name__,
               **model_size(loaded.module), "macs_per_sample": smap.macs},
        structure=_structure_summary(smap),
        data={"dataset": dataset_name, "eval_split": recipe.data.eval_split,
              "eval_samples": len(eval_data)},
        stages=ctx.records,
        metrics=dict(ctx.records[-1].metrics) if ctx.records else {},
        environment=environment(),
        seeds={"recipe": recipe.seed},
    )
    report.total_seconds = time.perf_counter() - t0
    write_report_files(report, staging, artifacts=ctx.artifacts)
    return RunResult(report, out)


def check_fit(loaded, dataset) -> None:
    """Fail early, with shapes, when the data's inputs do not match the model's.

    A data set with one input feeds a model with one input whatever their names (the data set's
    key is renamed in place); otherwise the names must match.
    """
    import inspect

    expected, have = list(loaded.input_specs), list(dataset.inputs)
    accepts = set(expected) | set(inspect.signature(loaded.module.forward).parameters)
    if len(expected) == 1 and len(have) == 1 and expected != have:
        dataset.inputs = {expected[0]: dataset.inputs[have[0]]}
    elif not set(have) <= accepts:
        raise DataError(f"data provides inputs {sorted(have)} but the model takes "
                        f"{sorted(expected)}")
    from slimformer.models.evaluate import run_batch

    with torch.no_grad():
        run_batch(loaded.module, {k: v[:2] for k, v in dataset.inputs.items()})
