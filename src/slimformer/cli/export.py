"""``export hls | onnx | openvino | qonnx | lint | tensorrt``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slimformer.cli.common import _bounded, _console, _errors, _int_option, _ints, _table
from slimformer.cli.options import (
    DATA_HELP,
    SET_HELP,
    ConfigOpt,
    FailOnLoss,
    JsonOpt,
    MaxLoss,
    OverwriteFileOpt,
    OverwriteOpt,
    TaskOpt,
    TrustCodeOpt,
    _data_config,
    _run_one,
    _sets,
    _stage,
)


def export_hls(model: Annotated[str, typer.Argument(help="Model (as for inspect).")],
               out: Annotated[Path, typer.Option(help="Folder of the hls4ml project.")],
               backend: Annotated[str, typer.Option(help="Vivado | Vitis")] = "Vitis",
               part: Annotated[str, typer.Option(help="FPGA part.")] = "xcvu13p-flga2577-2-e",
               clock_ns: Annotated[float, typer.Option(help="Clock period in ns.")] = 5.0,
               reuse_factor: Annotated[str, typer.Option(
                   help="Global reuse factor, or auto: the smallest power of two whose estimate "
                   "fits the part.")] = "auto",
               strategy: Annotated[str, typer.Option(help="Latency | Resource")] = "Latency",
               weight_bits: Annotated[int, typer.Option(help="Weight bits (2..8).")] = 8,
               act_bits: Annotated[int, typer.Option(help="Activation bits (2..8).")] = 8,
               method: Annotated[str, typer.Option(help="minmax | percentile")] = "minmax",
               float_model: Annotated[bool, typer.Option("--float", help="Skip quantization: "
                                                         "types from ranges only.")] = False,
               gelu: Annotated[str, typer.Option(help="refuse | sigmoid (explicit substitution "
                                                 "x * sigmoid(1.702 x)).")] = "refuse",
               csim: Annotated[bool, typer.Option(help="Compile and C-simulate on the test "
                                                  "set.")] = True,
               config: Annotated[str | None, typer.Option(help="JSON config (as for "
                                                          "inspect).")] = None,
               data: Annotated[str | None, typer.Option(help=DATA_HELP)] = None,
               overwrite: OverwriteOpt = False,
               max_loss: MaxLoss = None, fail_on_loss: FailOnLoss = False,
               set_: Annotated[list[str] | None, typer.Option(
                   "--set", help=SET_HELP + " Keys quantize.KEY go to the quantize stage.")]
               = None, task: TaskOpt = None):
    """Quantize (power-of-two scales) and build an hls4ml project; C-simulate and estimate it.

    Runs the one-stage recipe [quantize ->] hls through the pipeline: --out gets the report,
    the project in hls/ and the quantized model it was built from in quantized/. A MODEL that
    is quantized already (a quantize output) or --float skips the quantize stage.
    """
    from slimformer.stages.artifact import find
    from slimformer.stages.hls import HlsStage
    from slimformer.stages.quantize import QuantizeStage

    con, _ = _console()
    with _errors():
        rf = reuse_factor if reuse_factor == "auto" else _int_option(reuse_factor, "reuse-factor")
        stages = [_stage(HlsStage, set_, None, ("quantize",), backend=backend, part=part,
                         clock_period_ns=clock_ns, reuse_factor=rf, strategy=strategy,
                         gelu=gelu, csim=csim)]
        saved = find(model)
        quantized = saved is not None and saved[0] == "quantized"
        if quantized:
            con.print("the saved model is quantized already: its quantizers give the types "
                      "(exact when it was quantized with power-of-two scales)", markup=False)
        elif not float_model:
            stages.insert(0, _stage(QuantizeStage, set_, "quantize", method=method,
                                    weight_bits=weight_bits, act_bits=act_bits, softmax="none",
                                    power_of_two_scales=True))
        if len(stages) == 1 and _sets(set_, "quantize"):
            from slimformer.errors import ConfigError

            raise ConfigError(["--set quantize.*: nothing is quantized here (the model is "
                               "quantized already, or --float); drop those --set items"],
                              "options")
        result = _run_one(con, "hls", model, config, stages, out, overwrite, _data_config(data),
                          max_loss, fail_on_loss, task)
    rec = result.report.stages[-1]
    project = out / "hls"

    def here(v):  # the record names the project relative to the output folder
        return str(project) if v == "hls" else str(v).replace("cd hls ", f"cd {project} ")

    table = _table("metric", "value", title=f"hls4ml project {project}")
    for k, v in rec.metrics.items():
        table.add_row(k, here(v))
    con.print(table)
    for note in rec.notes:
        con.print(f"  - {here(note)}", markup=False, highlight=False)


def _export(err, model: str, config: str | None, stage, out: Path, files: dict[str, str],
            trust_code: bool, task: str | None, rows: int):
    """Run the one-stage recipe export; move its ``files`` (run-folder path -> ``out`` suffix).

    The run's folder is temporary, beside ``out`` (the files move in by a rename, the IR's
    ``.bin`` before its ``.xml``); the caller holds ``out``'s reservation. Only the first
    ``rows`` evaluation rows are prepared (the example rows; synthetic without data). Returns
    the stage record, its ``result`` naming the files where they now are.
    """
    import tempfile

    data_cfg = _data_config(None, limit=rows)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        run = Path(tmp) / "run"
        rec = _run_one(err, "export", model, config, [stage], run, False, data_cfg, task=task,
                       trust_code=trust_code).report.stages[0]
        for src, suffix in files.items():
            (run / src).replace(out.with_suffix(suffix))
    return rec


def export_onnx_cmd(
        model: Annotated[str, typer.Argument(help="Model (as for inspect), or a folder written by "
                                             "`slimformer quantize` (exported as QDQ).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="The .onnx file to write.")],
        opset: Annotated[int | None, typer.Option(help="ONNX opset (17..23); default: the "
                                                  "target's.")] = None,
        target: Annotated[str, typer.Option(help="Deployment target deciding the QDQ form: auto "
                                            "(= ort-cpu), ort-cpu, ort-cpu:ISA (amx, vnni, "
                                            "avx2, other; default: this CPU's), openvino, "
                                            "tensorrt, portable.")] = "auto",
        static: Annotated[bool, typer.Option("--static", help="Fixed shapes (no symbolic batch/"
                                             "sequence axes).")] = False,
        rows: Annotated[int, typer.Option(help="Example rows traced and checked.")] = 2,
        graph: Annotated[str, typer.Option(help="auto (a causal LM, float or weight-only: the "
                                           "KV-cache decoder graph; else the full-sequence "
                                           "graph) | decoder | full.")] = "auto",
        accuracy_level: Annotated[int | None, typer.Option(
            help="Weight-only models: MatMulNBits' activation precision, 0 or 1 (float32, as "
                 "PyTorch) or 4 (int8, faster); default: 4 for a causal LM's decoder graph "
                 "(0 when it misses the greedy-token bar), 0 for the full-sequence graph.")] = None,
        tokens_per_s: Annotated[bool, typer.Option("--tokens-per-s", help="Decoder graph: also "
                                                   "time prefill and decode tokens/s at batch "
                                                   "1 beside the float model's graph.")] = False,
        config: ConfigOpt = None,
        as_json: JsonOpt = False,
        overwrite: OverwriteFileOpt = False,
        trust_code: TrustCodeOpt = False,
        task: TaskOpt = None):
    """Write ONNX (QDQ for quantized models), check it with onnx.checker and ONNX Runtime.

    Runs the one-stage recipe export (no evaluation, no timing) through the pipeline; its
    example rows are the model's own evaluation rows, or synthetic inputs without a data set.
    A causal LM (float or weight-only) is written as one decoder graph for prefill and decode
    (key/value cache in and out, MatMulNBits with its codes when quantized), its greedy tokens
    checked against the PyTorch model's.
    """
    from slimformer.export.lint import Finding, lint_summary
    from slimformer.stages.export import ExportStage
    from slimformer.store.outdir import reserve

    con, err = _console()
    with _errors(), reserve(out, overwrite, kind="file"):
        _bounded(rows=(rows, 1, 4096))
        tgt, _, isa = target.partition(":")
        stage = _stage(ExportStage, None, opset=opset, dynamic=not static, target=tgt,
                       isa=isa or "auto", example_rows=rows, evaluate=False,
                       latency_batch_sizes=[], compare_float=tokens_per_s, openvino=False,
                       graph=graph, accuracy_level=accuracy_level, tokens_per_s=tokens_per_s)
        rec = _export(err, model, config, stage, out, {"export/model.onnx": out.suffix},
                      trust_code, task, max(rows, 64))
    res = rec.result | {"path": str(out)}
    if res.get("graph") == "decoder":
        _print_decoder(con, res, rec, as_json)
        return
    if as_json:
        print(json.dumps(res, indent=2))
        return
    form = res["form"]
    con.print(f"wrote {out} ({res['size_bytes']:,} bytes, opset {res['opset']}, "
              f"{'QDQ' if res['quantized'] else 'float'}); inputs {res['inputs']}")
    con.print(f"target {form['target']}" + (f" (isa {form['isa']}, "
              f"{form['isa_source']})" if form["isa"] else "") +
              f"; weights {form['weights']}, activations {form['activations']}"
              + (f"; ops {res['ops']}" if res["ops"] else ""), markup=False, highlight=False)
    _print_parity(con, res["parity"], "ONNX Runtime vs PyTorch")
    con.print(f"ONNX Runtime kernels: {res['fusion']}")
    lint = [Finding(**f) for f in res["lint"]]
    brief = lint_summary(lint, form.get("target"))
    if brief and lint:
        con.print(brief, markup=False, highlight=False)
    else:
        _print_lint(con, lint)
    for w in res["warnings"]:
        con.print(f"  warning: {w}", markup=False, highlight=False)


def _print_decoder(con, res: dict, rec, as_json: bool) -> None:
    """The decoder graph: file, cache layout, per-step parity, greedy tokens, tokens/s."""
    speed = {k: v for k, v in rec.metrics.items() if "tokens_per_s" in k or "speedup" in k
             or k in ("float_file_bytes", "openvino_token_agreement", "openvino_ir_bytes")}
    if as_json:
        print(json.dumps(res | {"speed": speed, "notes": rec.notes}, indent=2))
        return
    lay = res["layout"]
    con.print(f"wrote {res['path']} ({res['size_bytes']:,} bytes, opset {res['opset']}, "
              f"{'weight-only MatMulNBits' if res['quantized'] else 'float'}): decoder graph, "
              f"{lay['layers']} layers of key/value cache ({lay['kv_heads']} kv heads x "
              f"{lay['head_dim']})", markup=False, highlight=False)
    t = _table("step", "output", "SQNR dB", "max rel error", title="ONNX Runtime vs PyTorch")
    for step, outs in res["parity"].items():
        name, m = min(outs.items(), key=lambda kv: kv[1]["sqnr_db"])
        t.add_row(step, f"{name} (worst of {len(outs)})", f"{m['sqnr_db']:.1f}",
                  f"{m['max_rel_error']:.3g}")
    con.print(t)
    if res["tokens"]:
        tk = res["tokens"]
        con.print(f"greedy tokens vs PyTorch: {tk['agreement']:.1%} of {tk['steps']} steps "
                  f"after a {tk['prompt_tokens']}-token prompt (first difference: "
                  f"{tk['first_difference']})", markup=False, highlight=False)
    if speed:
        con.print("tokens/s at batch 1: " + ", ".join(f"{k} {v:g}" for k, v in speed.items()),
                  markup=False, highlight=False)
    for w in rec.notes:
        con.print(f"  note: {w}", markup=False, highlight=False)


def _print_parity(con, parity: dict, title: str) -> None:
    """One row per checked shape: cosine, max abs error, within one output step, agreement."""
    t = _table("shape", "cosine", "max abs", "within 1 output step", "argmax agreement",
               title=title)
    for label, p in parity.items():
        t.add_row(f"{label} {p['shape']}", f"{p['cosine']:.7f}", f"{p['max_abs']:.3g}",
                  f"{p['within_1_step']:.4f}", f"{p.get('argmax_agreement', float('nan')):.4f}")
    con.print(t)


def _print_lint(con, findings) -> None:
    from collections import Counter

    if not findings:
        con.print("TensorRT QDQ lint: no findings")
        return
    counts = Counter((f.rule, f.severity) for f in findings)
    t = _table("rule", "severity", "count", "first node", "message", title="TensorRT QDQ lint")
    shown = set()
    for f in findings:
        if (f.rule, f.severity) not in shown:
            shown.add((f.rule, f.severity))
            t.add_row(f.rule, f.severity, str(counts[(f.rule, f.severity)]), f.node, f.message)
    con.print(t)


def export_openvino_cmd(
        model: Annotated[str, typer.Argument(help="Model (as for inspect), or a folder written by "
                                             "`slimformer quantize` (exported as QDQ).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="The IR .xml to write (its .bin "
                                          "beside it).")],
        static: Annotated[bool, typer.Option("--static", help="Fixed shapes (no symbolic batch/"
                                             "sequence axes).")] = False,
        rows: Annotated[int, typer.Option(help="Example rows traced and checked.")] = 2,
        latency_batch: Annotated[int | None, typer.Option(help="Also time OpenVINO at this batch "
                                                          "size (example rows).")] = None,
        config: ConfigOpt = None,
        as_json: JsonOpt = False,
        overwrite: OverwriteFileOpt = False,
        trust_code: TrustCodeOpt = False,
        task: TaskOpt = None):
    """Write an OpenVINO IR (from the openvino-form ONNX), check every output through OpenVINO.

    Runs the one-stage recipe export (target openvino, openvino_ir) through the pipeline; with
    --latency-batch the stage also times the file at that batch size. A causal LM (float or
    weight-only) is written as a stateful decoder IR (the cache kept inside, our int4/int8 codes
    kept), its greedy tokens checked in ONNX Runtime and OpenVINO against the PyTorch model.
    """
    from slimformer.errors import ExportError
    from slimformer.stages.export import ExportStage
    from slimformer.store.outdir import reserve

    con, err = _console()
    with _errors(), reserve(out, overwrite, kind="file"), \
            reserve(out.with_suffix(".bin"), overwrite, kind="file"):
        _bounded(rows=(rows, 1, 4096), latency_batch=(latency_batch, 1, 1024))
        if out.suffix != ".xml":
            raise ExportError(f"{out}: the OpenVINO IR file must end in .xml (.bin goes beside "
                              "it)")
        stage = _stage(ExportStage, None, target="openvino", openvino_ir=True,
                       dynamic=not static, example_rows=rows, evaluate=False,
                       latency_batch_sizes=[latency_batch] if latency_batch else [],
                       latency_repeats=30, compare_float=False)
        rec = _export(err, model, config, stage, out,
                      {"export/model.bin": ".bin", "export/model.xml": ".xml"}, trust_code, task,
                      max(rows, latency_batch or 0))
    res = rec.result
    if res.get("graph") == "decoder":  # a causal LM: the stateful decoder IR
        _print_decoder(con, res | {"path": str(out)}, rec, as_json)
        return
    res["path"], res["onnx"]["path"] = str(out), None  # the ONNX file went with the run folder
    lat = rec.latency.get(f"openvino batch={latency_batch}")
    if as_json:
        print(json.dumps(res | ({"latency": lat} if lat else {}), indent=2))
        return
    con.print(f"wrote {out} and {out.with_suffix('.bin')} (OpenVINO {res['openvino']}, "
              f"{'QDQ' if res['onnx']['quantized'] else 'float'}, opset {res['onnx']['opset']})")
    _print_parity(con, res["parity"], "OpenVINO (f32) vs PyTorch")
    if lat:
        con.print(f"OpenVINO latency batch {latency_batch}: {lat['median_ms']:.2f} ms median "
                  f"({lat['threads']:g} threads)")
    for w in res["warnings"]:
        con.print(f"  warning: {w}", markup=False, highlight=False)


def export_qonnx_cmd(
        model: Annotated[str, typer.Argument(help="A quantized model: a folder written by "
                                             "`slimformer quantize` or `slimformer qat`.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="The QONNX .onnx file to write; "
                                          "the QCDQ file goes beside it as <name>.qcdq.onnx.")],
        opset: Annotated[int, typer.Option(help="ONNX opset (17..20).")] = 17,
        static: Annotated[bool, typer.Option("--static", help="Fixed shapes in the QCDQ file too "
                                             "(the QONNX file always has them).")] = False,
        rows: Annotated[int, typer.Option(help="Example rows traced and checked.")] = 8,
        min_sqnr_db: Annotated[float, typer.Option(help="Least SQNR (dB) of every output of "
                                                   "both files vs the model in PyTorch.")] = 45.0,
        config: ConfigOpt = None,
        as_json: JsonOpt = False,
        overwrite: OverwriteFileOpt = False,
        trust_code: TrustCodeOpt = False,
        task: TaskOpt = None):
    """Write Brevitas's QONNX and QCDQ ONNX files of a quantized model, each run and checked.

    The model's quantized Linears become Brevitas layers (their scales, zero points and
    bit-widths) and Brevitas's exporters write them: QONNX Quant nodes (FINN and the QONNX tools;
    run by qonnx's executor) and standard Quantize/Clip/DequantizeLinear (run in ONNX Runtime).
    Our other quantizers (attention, embeddings, RepQ's input affine) are written as the plain
    ops that compute them, named in the output. Runs the one-stage recipe export (format qonnx,
    no evaluation, no timing) through the pipeline.
    """
    from slimformer.errors import ExportError
    from slimformer.stages.export import ExportStage
    from slimformer.store.outdir import reserve

    con, err = _console()
    qcdq = out.with_suffix(".qcdq.onnx")
    with _errors(), reserve(out, overwrite, kind="file"), reserve(qcdq, overwrite, kind="file"):
        _bounded(rows=(rows, 1, 4096), opset=(opset, 17, 20))
        if out.suffix != ".onnx":
            raise ExportError(f"{out}: the QONNX file must end in .onnx")
        stage = _stage(ExportStage, None, format="qonnx", opset=opset, dynamic=not static,
                       example_rows=rows, evaluate=False, latency_batch_sizes=[],
                       compare_float=False, qonnx_min_sqnr_db=min_sqnr_db)
        rec = _export(err, model, config, stage, out, {"export/model.qonnx.onnx": ".onnx",
                                                       "export/model.qcdq.onnx": ".qcdq.onnx"},
                      trust_code, task, rows)
    res = rec.result | {"qonnx_path": str(out), "qcdq_path": str(qcdq)}
    if as_json:
        print(json.dumps(res | {"notes": rec.notes}, indent=2))
        return
    nodes = res["qonnx_nodes"]
    con.print(f"wrote {out} (QONNX, {res['sizes']['qonnx']:,} bytes, {nodes['quant_nodes']} Quant "
              f"nodes: weight bits {nodes['weight_bits']}, input bits {nodes['input_bits']}) and "
              f"{qcdq} (QCDQ, {res['sizes']['qcdq']:,} bytes, opset {res['opset']}; ops "
              f"{res['qcdq_ops']}); inputs {res['inputs']}", markup=False, highlight=False)
    t = _table("file", "shape", "SQNR dB", "within 1 output step", "argmax agreement",
               "driven SQNR dB", "worst site (x tolerance)",
               title="vs the Brevitas model in PyTorch (QCDQ: ONNX Runtime; QONNX: qonnx executor)"
               "; judged driven by the file's own codes")
    for file, shapes in res["parity"].items():
        for label, p in shapes.items():
            s = res["site_parity"].get(file, {}).get(label)
            t.add_row(file, f"{label} {p['shape']}", f"{p['sqnr_db']:.1f}",
                      f"{p['within_1_step']:.4f}", f"{p.get('argmax_agreement', float('nan')):.4f}",
                      f"{s['driven']['sqnr_db']:.1f}" if s else "-",
                      f"{s['worst'][0]['tol_used']:.3f}" if s and s["worst"] else "-")
    con.print(t)
    if res["vs_artifact"]:
        con.print(f"QCDQ in ONNX Runtime vs the quantized model as saved: "
                  f"{res['vs_artifact']['sqnr_db']:.1f} dB", markup=False, highlight=False)
    for note in rec.notes:
        con.print(f"  note: {note}", markup=False, highlight=False)


def export_lint(onnx_file: Annotated[Path, typer.Argument(help="An ONNX file.")],
                as_json: JsonOpt = False,
                fail_on: Annotated[str, typer.Option(
                    help="Exit 1 when a finding of this severity or worse is found: error | "
                    "warning | never.")] = "error"):
    """Check an ONNX file against TensorRT's rules for explicit (Q/DQ) quantization."""
    from slimformer.errors import ConfigError, ExportError
    from slimformer.export.lint import lint_qdq

    levels = {"error": ("error",), "warning": ("error", "warning"), "never": ()}
    con, _ = _console()
    with _errors():
        if fail_on not in levels:
            raise ConfigError([f"--fail-on: must be one of {', '.join(levels)}, got "
                               f"{fail_on!r}"], "options")
        if not onnx_file.is_file():
            raise ExportError(f"{onnx_file} does not exist")
        findings = lint_qdq(onnx_file)
    if as_json:
        print(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        _print_lint(con, findings)
    bad = sum(f.severity in levels[fail_on] for f in findings)
    if bad:
        if not as_json:
            con.print(f"{bad} finding(s) of severity {' or '.join(levels[fail_on])}: exit 1 "
                      "(--fail-on never to only report)", markup=False)
        raise typer.Exit(1)


def export_tensorrt(
        onnx_file: Annotated[Path, typer.Argument(help="ONNX file (QDQ for INT8).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Engine file to write.")],
        fp16: Annotated[bool, typer.Option(help="Allow FP16 kernels.")] = True,
        int8: Annotated[bool, typer.Option(help="Allow INT8 kernels.")] = True,
        batch: Annotated[str, typer.Option(help="min,opt,max batch.")] = "1,8,32",
        sequence: Annotated[str, typer.Option(help="min,opt,max sequence length.")] = "8,64,128",
        timing_cache: Annotated[Path | None, typer.Option(help="Timing cache file.")] = None,
        workspace_mib: Annotated[int, typer.Option(help="Workspace MiB.")] = 2048,
        overwrite: OverwriteFileOpt = False):
    """Build a TensorRT engine with the tensorrt Python API (writes the trtexec equivalent)."""
    from pydantic import ValidationError

    from slimformer.errors import ConfigError
    from slimformer.export.config import TensorRTConfig
    from slimformer.export.lint import lint_qdq
    from slimformer.export.tensorrt import build_engine
    from slimformer.store.outdir import reserve
    from slimformer.validation import format_errors

    con, _ = _console()
    with _errors(), reserve(out, overwrite, kind="file"):
        try:
            cfg = TensorRTConfig(fp16=fp16, int8=int8, batch=tuple(_ints(batch, "batch")),
                                 sequence=tuple(_ints(sequence, "sequence")),
                                 timing_cache=str(timing_cache) if timing_cache else None,
                                 workspace_mib=workspace_mib)
        except ValidationError as exc:
            raise ConfigError(format_errors(exc, TensorRTConfig), "options") from None
        if onnx_file.is_file():
            _print_lint(con, lint_qdq(onnx_file))
        res = build_engine(onnx_file, out, cfg)
    con.print(f"wrote {res.engine} ({res.size_bytes:,} bytes, TensorRT {res.tensorrt_version})")
    con.print(f"trtexec equivalent: {res.trtexec}", markup=False, highlight=False)
