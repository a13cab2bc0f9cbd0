"""The ``export`` stage: ONNX (QDQ when quantized), OpenVINO IR, parity, latency, TensorRT."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from slimformer.export.config import OnnxConfig, TensorRTConfig
from slimformer.report.model import StageRecord
from slimformer.stages.context import RunContext
from slimformer.stages.quality import runtime_metrics


class ExportStage(OnnxConfig):
    """Export the current model (float or quantized) to ONNX, optionally a TensorRT engine.

    Writes ``<output>/export/model.onnx`` (QDQ when quantized); records ONNX Runtime parity,
    accuracy and agreement on the evaluation data, latency per batch size, file size, which
    matmuls ONNX Runtime runs in integer kernels, and the TensorRT QDQ lint; the same in OpenVINO
    for the ``openvino`` target (or with ``openvino: true``). ``openvino_ir``: also writes the
    OpenVINO IR ``export/model.{xml,bin}`` converted from that file (target ``openvino``),
    checked in OpenVINO (f32) against PyTorch. With
    ``tensorrt``, also builds ``model.plan`` where ``import tensorrt`` works, and always writes the
    equivalent ``trtexec`` command to ``export/model.plan.trtexec.sh``. The record's ``result``
    is the export's whole summary (parity per shape, ONNX Runtime kernels, every lint finding).
    A run without data exports from synthetic example inputs (the model's input specs) and
    times them; accuracy and agreement are then not measured (a note says so).

    ``graph``: ``auto`` writes a causal LM (float or weight-only) as the KV-cache decoder graph
    (:mod:`slimformer.stages.exportdecoder`: greedy-token parity over ``decode_tokens`` steps,
    ``min_token_agreement`` for a quantized model, prefill of ``prompt_tokens`` and decode
    tokens/s at batch 1 beside the float model's graph with ``tokens_per_s``; for target
    ``openvino`` OpenVINO's form of it and, with ``openvino_ir``, a stateful IR), anything else
    as the full-sequence graph; ``decoder`` / ``full`` force one.

    ``format``: ``onnx`` (the above) or ``qonnx``: a quantized model's Brevitas export
    (:mod:`slimformer.stages.exportqonnx`): ``export/model.qcdq.onnx`` (Quantize/Clip/
    DequantizeLinear) and ``export/model.qonnx.onnx`` (QONNX ``Quant`` nodes), both checked
    against the model to ``qonnx_min_sqnr_db`` on every output; ``opset``, ``dynamic``,
    ``threads``, ``example_rows``, ``evaluate`` and ``latency_batch_sizes`` apply to it, the
    ONNX-form fields (target, OpenVINO, TensorRT, decoder graph) do not.
    """

    type: Literal["export"] = "export"
    example_rows: Annotated[int, Field(ge=1, le=256)] = 2
    evaluate: bool = True
    latency_batch_sizes: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        default_factory=lambda: [1, 32])
    latency_repeats: Annotated[int, Field(ge=1, le=1000)] = 20
    tensorrt: TensorRTConfig | None = None
    compare_float: bool = True  # also time the run's float model, exported the same way
    # run the file in OpenVINO too (accuracy, agreement, latency beside its float model): None =
    # for target openvino only; true = whenever OpenVINO is installed (a note where it is not)
    openvino: bool | None = None
    openvino_ir: bool = False
    graph: Literal["auto", "decoder", "full"] = "auto"
    prompt_tokens: Annotated[int, Field(ge=1, le=32768)] = 512
    decode_tokens: Annotated[int, Field(ge=1, le=4096)] = 32
    min_token_agreement: Annotated[float, Field(ge=0.0, le=1.0)] = 0.95
    tokens_per_s: bool = True
    timing_rounds: Annotated[int, Field(ge=1, le=100)] = 3
    format: Literal["onnx", "qonnx"] = "onnx"
    qonnx_min_sqnr_db: Annotated[float, Field(ge=0.0, le=400.0)] = 45.0

    @model_validator(mode="after")
    def _qonnx_fields(self):
        if self.format != "qonnx":
            return self
        bad = [f"{k}={v!r}" for k, v, default in (
            ("target", self.target, "auto"), ("isa", self.isa, "auto"),
            ("graph", self.graph, "auto"), ("openvino", self.openvino, None),
            ("openvino_ir", self.openvino_ir, False), ("tensorrt", self.tensorrt, None))
            if v != default]
        if bad:
            raise ValueError(f"format qonnx is Brevitas's own QCDQ / QONNX export: {', '.join(bad)} "
                             "apply to format onnx only; leave them out")
        return self

    @model_validator(mode="after")
    def _ir_form(self):
        if self.openvino_ir and self.target not in ("openvino", "auto"):
            raise ValueError(f"openvino_ir: the IR is converted from the openvino form, not "
                             f"{self.target!r}: give target openvino (or auto)")
        return self

    def onnx_config(self) -> OnnxConfig:
        """The plain ONNX config, without the stage fields."""
        return OnnxConfig(**self.model_dump(include=set(OnnxConfig.model_fields)))


def run(ctx: RunContext, stage: ExportStage) -> StageRecord:
    """Export the current model to ONNX (and TensorRT); ``export/`` artifact (see ExportStage)."""
    from slimformer.stages.exportdecoder import decoder_into, wants_decoder

    if stage.format == "qonnx":
        from slimformer.stages.exportqonnx import qonnx_into

        return qonnx_into(ctx, stage, ctx.artifact_dir("export"), lambda b: _rows(ctx, b))
    decoder, why_not = wants_decoder(ctx, stage)
    if decoder:
        return decoder_into(ctx, stage, ctx.artifact_dir("export"))
    rec = _export_into(ctx, stage, ctx.artifact_dir("export"))
    rec.notes += [why_not] if why_not else []
    return rec


def _rows(ctx: RunContext, batch: int) -> dict:
    """``batch`` evaluation rows ``{name: (batch, ...)}``; synthetic ones in a run without data."""
    from slimformer.data.datasets import latency_inputs

    if ctx.eval_data is None:
        return ctx.loaded.example_inputs(batch)
    return latency_inputs(ctx.eval_data, batch)


def _write(ctx: RunContext, stage: ExportStage, tmp: Path, tick):
    """``(OnnxResult, its summary)``: ``model.onnx``, and the IR beside it with ``openvino_ir``.

    The summary names the files relative to the output folder.
    """
    from slimformer.export.onnx import export_onnx
    from slimformer.export.openvino import export_openvino

    onnx_path, rows = tmp / "model.onnx", _rows(ctx, stage.example_rows)
    if not stage.openvino_ir:
        tick("export: ONNX file (checked in ONNX Runtime)", 0, 1)
        res = export_onnx(ctx.model, onnx_path, rows, stage.onnx_config())
        tick("export: ONNX file (checked in ONNX Runtime)", 1, 1)
        return res, res.summary() | {"path": f"{tmp.name}/{onnx_path.name}"}
    tick("export: ONNX, OpenVINO IR, checked in OpenVINO", 0, 1)
    ov = export_openvino(ctx.model, tmp / "model.xml", rows, stage.onnx_config(), onnx_path)
    tick("export: ONNX, OpenVINO IR, checked in OpenVINO", 1, 1)
    summary = ov.summary()
    summary["path"], summary["onnx"]["path"] = f"{tmp.name}/model.xml", f"{tmp.name}/model.onnx"
    return ov.onnx, summary


def _export_into(ctx: RunContext, stage: ExportStage, tmp: Path) -> StageRecord:
    from slimformer.export.lint import lint_summary
    from slimformer.export.onnx import export_onnx
    from slimformer.export.ortrun import ort_latency, predict
    from slimformer.export.tensorrt import build_engine, tensorrt_available, trtexec_command

    tick = ctx.progress or (lambda *a: None)
    onnx_path = tmp / "model.onnx"
    res, summary = _write(ctx, stage, tmp, tick)
    rec = StageRecord(index=0, type=stage.type, config=stage.model_dump(mode="json"),
                      result=summary)
    rec.metrics = {"opset": res.opset, "quantized": res.quantized,
                   "dynamic_axes": str(res.inputs), "file_bytes": res.size_bytes,
                   "export_seconds": round(res.seconds, 2),
                   **{f"parity_{k}_cosine": v["cosine"] for k, v in res.parity.items()},
                   **{f"parity_{k}_within_1_step": v["within_1_step"] for k, v in
                      res.parity.items()},
                   **{f"ort_{k}": v for k, v in res.fusion.items()},
                   "lint_errors": sum(f.severity == "error" for f in res.lint),
                   "lint_warnings": sum(f.severity == "warning" for f in res.lint)}
    labels = None
    if stage.evaluate and ctx.eval_data is None:
        rec.notes.append("no data: the file was checked and timed on synthetic example inputs; "
                         "accuracy and agreement were not measured (give data to measure them)")
    elif stage.evaluate:
        tick("export: evaluate in ONNX Runtime", 0, 1)
        preds = predict(onnx_path, ctx.eval_data, ctx.batch_size, stage.threads)
        labels = runtime_metrics(ctx, rec, preds)
        tick("export: evaluate in ONNX Runtime", 1, 1)
    float_path = None
    if stage.compare_float and res.quantized and stage.latency_batch_sizes:
        import tempfile

        from slimformer.store.outdir import scratch_root

        tick("export: float ONNX file (the baseline)", 0, 1)
        float_path = Path(tempfile.mkdtemp(prefix="float-", dir=scratch_root())) / "float.onnx"
        export_onnx(ctx.loaded.module, float_path, _rows(ctx, stage.example_rows),
                    stage.onnx_config().model_copy(update={"check": False, "lint": False}))
        tick("export: float ONNX file (the baseline)", 1, 1)
    n = len(stage.latency_batch_sizes)
    for i, b in enumerate(stage.latency_batch_sizes):
        tick("export: latency in ONNX Runtime", i, n)
        x = _rows(ctx, b)
        files = {f"onnxruntime batch={b}": onnx_path, f"onnxruntime float batch={b}": float_path}
        rec.latency |= _interleaved(
            {k: p for k, p in files.items() if p is not None},
            lambda path, x=x: ort_latency(path, x, stage.latency_repeats, threads=stage.threads))
    if n:
        tick("export: latency in ONNX Runtime", n, n)
    if stage.openvino or (stage.openvino is None and res.form.get("target") == "openvino"):
        ov_file = tmp / "model.xml" if stage.openvino_ir else onnx_path  # the IR when written
        _openvino(ctx, stage, rec, ov_file, float_path, labels, tick)
    rec.metrics |= {f"form_{k}": str(v) for k, v in res.form.items()}
    rec.size = {"bytes": res.size_bytes}
    brief = None if stage.tensorrt is not None else lint_summary(res.lint,
                                                                  res.form.get("target"))
    rec.notes += list(res.warnings) + ([brief] if brief and res.lint else [
        f"{f.rule} {f.severity} at {f.node}: {f.message}" for f in _first_per_rule(res.lint)])
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


def _openvino(ctx: RunContext, stage: ExportStage, rec: StageRecord, onnx_path: Path,
              float_path: Path | None, labels, tick) -> None:
    """OpenVINO, the target's runtime: accuracy, agreement and latency (float beside it).

    ``onnx_path``: the file OpenVINO reads (the ONNX file, or the IR's ``.xml``).
    """
    from slimformer.export.openvino import openvino_available, ov_latency, ov_predict
    from slimformer.models.evaluate import agreement

    if not openvino_available():
        rec.notes.append("OpenVINO is not installed here (pip install openvino): the file was "
                         "written for it but not run in it")
        return
    steps = 1 + len(stage.latency_batch_sizes)  # evaluation, then each batch timed
    tick("export: OpenVINO", 0, steps)
    if stage.evaluate and ctx.eval_data is not None:  # ``labels``: from ONNX Runtime's above
        preds = ov_predict(onnx_path, ctx.eval_data, ctx.batch_size, stage.threads)
        if getattr(ctx.eval_data, "has_labels", True):
            rec.metrics["openvino_accuracy"] = float((preds == labels).float().mean())
        if ctx.reference_preds is not None:
            rec.metrics["openvino_agreement"] = agreement(preds, ctx.reference_preds)
    for i, b in enumerate(stage.latency_batch_sizes):
        tick("export: OpenVINO", 1 + i, steps)
        x = _rows(ctx, b)
        files = {f"openvino batch={b}": onnx_path, f"openvino float batch={b}": float_path}
        timed = _interleaved({k: p for k, p in files.items() if p is not None},
                             lambda path, x=x: ov_latency(path, x, stage.latency_repeats,
                                                          threads=stage.threads))
        for key, stats in timed.items():  # numbers only (the precision, f32, is the default)
            rec.latency[key] = {k: v for k, v in stats.items() if isinstance(v, int | float)}
    tick("export: OpenVINO", steps, steps)


ROUNDS = 2  # timing rounds: the files alternate, each keeps its best round


def _interleaved(files: dict[str, Path], time_one) -> dict[str, dict]:
    """``{key: stats}`` of ``time_one(path)`` for each file, timed in alternating rounds.

    Machine load shifts over seconds; alternating the files and keeping each one's round of the
    lowest median makes the quantized / float ratio of a stage a side-by-side measurement.
    """
    best: dict[str, dict] = {}
    for _ in range(ROUNDS if len(files) > 1 else 1):
        for key, path in files.items():
            stats = time_one(path)
            if key not in best or stats["median_ms"] < best[key]["median_ms"]:
                best[key] = stats
    return best


def _first_per_rule(findings: list) -> list:
    """One finding per (rule, severity), with how many more there are."""
    seen, out = {}, []
    for f in findings:
        key = (f.rule, f.severity)
        if key not in seen:
            seen[key] = f
            out.append(f)
    return out
