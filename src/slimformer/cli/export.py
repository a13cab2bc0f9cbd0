"""``export hls | onnx | openvino | lint | tensorrt``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slimformer.cli.common import _bounded, _console, _errors, _int_option, _ints, _progress, _table
from slimformer.cli.options import (
    DATA_HELP,
    OVERWRITE_HELP,
    SET_HELP,
    FailOnLoss,
    MaxLoss,
    TaskOpt,
    _data_config,
    _load_any,
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
               overwrite: Annotated[bool, typer.Option(help=OVERWRITE_HELP)] = False,
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


def _example_rows(lm, rows: int) -> dict:
    """``rows`` real rows of the model's own data set, or synthetic inputs without one."""
    from slimformer.data.datasets import get_dataset
    from slimformer.pipeline import check_fit, latency_inputs

    if lm.dataset is None:
        return lm.example_inputs(rows)
    ds = get_dataset(lm.dataset, "calib")
    check_fit(lm, ds)
    return latency_inputs(ds, rows)


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
        config: Annotated[str | None, typer.Option(help="JSON config (as for inspect).")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing file at --out.")]
        = False,
        trust_code: Annotated[bool, typer.Option("--trust-code", help="Allow a saved folder "
                                                 "that names a package.module:factory to run "
                                                 "it.")] = False,
        task: TaskOpt = None):
    """Write ONNX (QDQ for quantized models), check it with onnx.checker and ONNX Runtime."""
    from pydantic import ValidationError

    from slimformer.errors import ConfigError
    from slimformer.export.config import OnnxConfig
    from slimformer.export.onnx import export_onnx
    from slimformer.store.outdir import reserve
    from slimformer.validation import format_errors

    con, _ = _console()
    with _errors(), reserve(out, overwrite, kind="file"):
        _bounded(rows=(rows, 1, 4096))
        try:
            tgt, _, isa = target.partition(":")
            cfg = OnnxConfig(opset=opset, dynamic=not static, target=tgt, isa=isa or "auto")
        except ValidationError as exc:
            raise ConfigError(format_errors(exc, OnnxConfig), "options") from None
        with _progress() as prog:
            prog("load model", 0, 1)
            lm, net = _load_any(model, config, trust_code, task)
            prog("load model", 1, 1)
            prog("export: ONNX file (checked in ONNX Runtime)", 0, 1)
            res = export_onnx(net, out, _example_rows(lm, rows), cfg)
            prog("export: ONNX file (checked in ONNX Runtime)", 1, 1)
    if as_json:
        print(json.dumps(res.summary(), indent=2))
        return
    con.print(f"wrote {res.path} ({res.size_bytes:,} bytes, opset {res.opset}, "
              f"{'QDQ' if res.quantized else 'float'}); inputs {res.inputs}")
    con.print(f"target {res.form['target']}" + (f" (isa {res.form['isa']}, "
              f"{res.form['isa_source']})" if res.form["isa"] else "") +
              f"; weights {res.form['weights']}, activations {res.form['activations']}"
              + (f"; ops {res.ops}" if res.ops else ""), markup=False, highlight=False)
    _print_parity(con, res.parity, "ONNX Runtime vs PyTorch")
    con.print(f"ONNX Runtime kernels: {res.fusion}")
    from slimformer.export.lint import lint_summary

    brief = lint_summary(res.lint, res.form.get("target"))
    if brief and res.lint:
        con.print(brief, markup=False, highlight=False)
    else:
        _print_lint(con, res.lint)
    for w in res.warnings:
        con.print(f"  warning: {w}", markup=False, highlight=False)


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
        config: Annotated[str | None, typer.Option(help="JSON config (as for inspect).")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing file at --out.")]
        = False,
        trust_code: Annotated[bool, typer.Option("--trust-code", help="Allow a saved folder "
                                                 "that names a package.module:factory to run "
                                                 "it.")] = False,
        task: TaskOpt = None):
    """Write an OpenVINO IR (from the openvino-form ONNX), check every output through OpenVINO."""
    from slimformer.export.config import OnnxConfig
    from slimformer.export.openvino import export_openvino, ov_latency
    from slimformer.store.outdir import reserve

    con, _ = _console()
    with _errors(), reserve(out, overwrite, kind="file"), \
            reserve(out.with_suffix(".bin"), overwrite, kind="file"):
        _bounded(rows=(rows, 1, 4096), latency_batch=(latency_batch, 1, 1024))
        with _progress() as prog:
            prog("load model", 0, 1)
            lm, net = _load_any(model, config, trust_code, task)
            prog("load model", 1, 1)
            prog("export: ONNX, OpenVINO IR, checked in OpenVINO", 0, 1)
            res = export_openvino(net, out, _example_rows(lm, rows),
                                  OnnxConfig(target="openvino", dynamic=not static))
            prog("export: ONNX, OpenVINO IR, checked in OpenVINO", 1, 1)
            lat = None
            if latency_batch:
                prog(f"latency in OpenVINO, batch {latency_batch}", 0, 1)
                lat = ov_latency(out, _example_rows(lm, latency_batch), threads=2)
                prog(f"latency in OpenVINO, batch {latency_batch}", 1, 1)
    if as_json:
        print(json.dumps(res.summary() | ({"latency": lat} if lat else {}), indent=2))
        return
    con.print(f"wrote {res.path} and {res.path.with_suffix('.bin')} (OpenVINO {res.version}, "
              f"{'QDQ' if res.onnx.quantized else 'float'}, opset {res.onnx.opset})")
    _print_parity(con, res.parity, "OpenVINO (f32) vs PyTorch")
    if lat:
        con.print(f"OpenVINO latency batch {latency_batch}: {lat['median_ms']:.2f} ms median "
                  f"(2 threads)")
    for w in res.warnings:
        con.print(f"  warning: {w}", markup=False, highlight=False)


def export_lint(onnx_file: Annotated[Path, typer.Argument(help="An ONNX file.")],
                as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
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
        overwrite: Annotated[bool, typer.Option(help="Replace an existing file at --out.")]
        = False):
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
