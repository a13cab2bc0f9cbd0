"""The export stage's ``format: qonnx``: Brevitas's own QCDQ and QONNX files of a quantized model.

The quantized model (a ``quantize`` or ``qat`` result) is converted to Brevitas layers
(:func:`~slimformer.qat.convert.to_brevitas`, refused with :class:`UnsupportedModelError` naming
the sites it cannot convert) and written by Brevitas's exporters
(:func:`~slimformer.export.qonnx.export_brevitas`): ``export/model.qcdq.onnx`` (standard
Quantize/Clip/DequantizeLinear, checked in ONNX Runtime) and ``export/model.qonnx.onnx``
(QONNX ``Quant`` nodes, for FINN and the QONNX tools; run by qonnx's executor). Both must match
the Brevitas model in PyTorch quantizer by quantizer (:mod:`slimformer.export.siteparity`: driven
by the file's own codes, every site's inputs within float tolerance and every output to
``qonnx_min_sqnr_db``; end-to-end parity is reported). Our quantizers that are
not Brevitas's (attention q/k/v and probabilities, embedding tables, weights that are not
``nn.Linear``'s, RepQ's input affine) are written as the plain ops that compute them; the record
names them. With data, the QCDQ file's accuracy and agreement are measured in ONNX Runtime on the
evaluation rows, and it is timed at ``latency_batch_sizes``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from slimformer.errors import ExportError
from slimformer.report.model import StageRecord
from slimformer.stages.context import RunContext
from slimformer.stages.quality import runtime_metrics

FILES = {"qcdq": "model.qcdq.onnx", "qonnx": "model.qonnx.onnx"}


def qonnx_into(ctx: RunContext, stage, tmp: Path, rows: Callable[[int], dict]) -> StageRecord:
    """Write both files into ``tmp`` (the run's ``export/``); the stage record (module doc).

    ``rows(batch)``: that many evaluation rows ``{name: (batch, ...)}`` (synthetic without data).
    """
    from slimformer.export.ortrun import ort_latency, predict
    from slimformer.export.qonnx import export_brevitas
    from slimformer.qat.convert import to_brevitas
    from slimformer.quantize.state import QuantizedModel

    if not isinstance(ctx.model, QuantizedModel):
        raise ExportError("format qonnx writes a quantized model's Brevitas quantizers; this "
                          "model is float: quantize it first (a quantize or qat output is a "
                          "MODEL), or use format onnx")
    tick = ctx.progress or (lambda *a: None)
    tick("export: Brevitas QCDQ and QONNX files (checked)", 0, 1)
    run_time = [lq.name for lq in ctx.model.quant.linears.values()
                if lq.act.dynamic is not None and not lq.act.keep_float]
    if run_time:  # found on our quantizers, before the conversion copies the model
        raise ExportError(
            f"format qonnx: {len(run_time)} Linear input(s) are quantized on a range computed at "
            f"run time (act_dynamic; {', '.join(run_time[:3])}); Brevitas's QCDQ exporter writes "
            "those as DynamicQuantizeLinear (8-bit, one range per tensor) and its QONNX exporter "
            "not at all, so neither file would compute this model. Use format onnx (it writes "
            "the run-time grids), or quantize with act_dynamic: off for QONNX / FINN")
    split = [lq.name for lq in ctx.model.quant.linears.values()
             if lq.act.outliers is not None and not lq.act.keep_float]
    if split:
        raise ExportError(
            f"format qonnx: {len(split)} Linear input(s) keep outlier channels float "
            f"(outlier_channels; {', '.join(split[:3])}): a float product beside the quantized "
            "one, which QONNX / FINN do not compute. Use format onnx (it writes that product), "
            "or quantize with outlier_channels: 0 for QONNX")
    turned = [lq.name for lq in ctx.model.quant.linears.values() if lq.act.rot_signs is not None]
    if turned:
        raise ExportError(
            f"format qonnx: {len(turned)} Linear input(s) are rotated online before their grid "
            f"(rotate_inputs; {', '.join(turned[:3])}): float matmuls QONNX / FINN do not "
            "compute. Use format onnx (it writes the rotation), or quantize with "
            "rotate_inputs: off for QONNX")
    student = to_brevitas(ctx.model)
    plain = plain_parts(student)
    res = export_brevitas(student, tmp / FILES["qcdq"], tmp / FILES["qonnx"],
                          rows(stage.example_rows), stage.onnx_config(), stage.qonnx_min_sqnr_db,
                          plain, artifact=ctx.model)
    tick("export: Brevitas QCDQ and QONNX files (checked)", 1, 1)
    summary = res.summary() | {"qcdq_path": f"{tmp.name}/{FILES['qcdq']}",
                               "qonnx_path": f"{tmp.name}/{FILES['qonnx']}", "format": "qonnx"}
    rec = StageRecord(index=0, type=stage.type, config=stage.model_dump(mode="json"),
                      result=summary)
    rec.metrics = {"format": "qonnx", "opset": res.opset, "quantized": True,
                   "dynamic_axes": str(res.inputs), "file_bytes": res.sizes["qcdq"],
                   "qonnx_file_bytes": res.sizes["qonnx"], "export_seconds": round(res.seconds, 2),
                   "qonnx_quant_nodes": res.qonnx_nodes["quant_nodes"]}
    for file, shapes in res.parity.items():
        for label, p in shapes.items():
            rec.metrics |= {f"parity_{file}_{label}_sqnr_db": round(p["sqnr_db"], 2),
                            f"parity_{file}_{label}_within_1_step": p["within_1_step"]}
            if label in res.sites.get(file, {}):  # the verdict: driven by the file's codes
                s = res.sites[file][label]
                rec.metrics |= {
                    f"parity_{file}_{label}_driven_sqnr_db": round(s["driven"]["sqnr_db"], 2),
                    f"parity_{file}_{label}_site_tol_used": round(s["worst"][0]["tol_used"], 4)
                    if s["worst"] else 0.0}
    if res.vs_artifact:
        rec.metrics["qcdq_vs_artifact_sqnr_db"] = round(res.vs_artifact["sqnr_db"], 2)
    rec.notes += res.warnings
    if res.qonnx_nodes["layers_not_in_graph"]:
        rec.notes.append(f"{res.qonnx_nodes['layers_not_in_graph']} quantized layers are not in "
                         "the files: their outputs reach no model output")
    if plain:
        rec.notes.append("written as plain ONNX ops (the same values; not Quant / QuantizeLinear "
                         "nodes, so a QONNX tool sees float arithmetic there): "
                         + "; ".join(plain))
    qcdq = tmp / FILES["qcdq"]
    if stage.evaluate and ctx.eval_data is None:
        rec.notes.append("no data: the files were checked on synthetic example inputs; accuracy "
                         "and agreement were not measured (give data to measure them)")
    elif stage.evaluate:
        tick("export: evaluate the QCDQ file in ONNX Runtime", 0, 1)
        runtime_metrics(ctx, rec, predict(qcdq, ctx.eval_data, ctx.batch_size, stage.threads))
        tick("export: evaluate the QCDQ file in ONNX Runtime", 1, 1)
    for b in stage.latency_batch_sizes if res.inputs and _batch_free(res.inputs) else []:
        rec.latency[f"onnxruntime qcdq batch={b}"] = ort_latency(
            qcdq, rows(b), stage.latency_repeats, threads=stage.threads)
    rec.size = {"bytes": res.sizes["qcdq"]}
    return rec


def _batch_free(inputs: dict) -> bool:
    """Whether every input of the QCDQ file has a symbolic batch axis (else: not timed)."""
    return all(shape and isinstance(shape[0], str) for shape in inputs.values())


def plain_parts(student) -> list[str]:
    """What of ``student`` (a :func:`to_brevitas` result) is not a Brevitas quantizer, by site."""
    from slimformer.qat.layers import InputAffine

    q, out = student.quant, []
    for a in q.attention.values():
        probs = "" if a.probs_float else f", {a.probs.kind} probabilities"
        out.append(f"attention quantizers of {a.module} (q, k, v inputs{probs})")
    for e in q.embeddings.values():
        out.append(f"embedding table quantizer of {e.name}")
    for lq in q.linears.values():  # quantized weights that are not nn.Linear's (a patch conv)
        out.append(f"weight and input quantizers of {lq.name} (not an nn.Linear)")
    out += [f"RepQ input affine at {name}" for name, m in student.model.named_modules()
            if isinstance(m, InputAffine)]
    return out
