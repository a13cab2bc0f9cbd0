"""Build one configuration's deployable artifact for benchmarks/real.py (ours and the peers).

- ``float``: our ONNX export (opset default, and 20 for OpenVINO) plus the float references;
- ``ours-wXaY-{default,repq,minmax,token,rot,rottoken}[-unchecked]``: ``slimformer.quantize`` then
  ``export onnx`` (QDQ): the product's defaults, method repq, the plain min/max baseline, the
  defaults with the online input rotation (``rotate_inputs: on``) (:func:`ours_config`);
  ``-unchecked`` turns off the output-SQNR refusal (``min_output_sqnr_db=None``) to measure it;
- ``ours-wX[gG]-{rtn,gptq}[-awq]``: weight-only ``quantize`` (round to nearest or GPTQ, groups of
  G input columns, AWQ scales) then ``export onnx``: the float graph with ONNX Runtime
  ``MatMulNBits`` holding our codes (``accuracy_level`` 0). Where the export refuses, the row is
  judged in PyTorch (simulated) and saved with ``save_quantized`` for its size, and its status
  says why (``EXPORT_REFUSED``);
- ``ort-dynamic`` / ``ort-static``: ONNX Runtime's quantizers on our float export;
- ``nncf-*``: NNCF ``quantize`` / ``compress_weights`` on the float export read by OpenVINO;
- ``brevitas-*``: Brevitas's post-training flow (:mod:`real_brevitas`).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import real_eval as E

CALIB: dict[str, float] = {}  # seconds of the quantizer call alone (a build also exports)
NOTES: dict[str, dict] = {}  # ours: output SQNR vs float (calibration rows), activations kept float
SAVED: dict[str, Path] = {}  # ours weight-only judged in PyTorch: the save_quantized folder
EXPORT_REFUSED: dict[str, str] = {}  # ours weight-only: why our ONNX export refused it


def export(model, path: Path, example, **kw) -> Path:
    from slimformer.export.config import OnnxConfig
    from slimformer.export.onnx import export_onnx

    export_onnx(model, path, example, OnnxConfig(lint=False, **kw))
    return path


def float_onnx(work: Path) -> Path:
    p = work / "float.onnx"
    if not p.exists():
        raise FileNotFoundError(f"{p} (the float configuration did not finish)")
    return p


def size(path: Path) -> int:
    """Bytes of an artifact and its side files (external data, OpenVINO .bin)."""
    stem = path.name.split(".")[0]
    return sum(p.stat().st_size for p in path.parent.iterdir()
               if p.name.split(".")[0] == stem and p.is_file()
               and p.suffix in (".onnx", ".data", ".xml", ".bin", ".pt"))


def make_artifact(config: str, lm, data: dict, work: Path, args):
    """Build ``config`` under ``work``: the artifact's path (or a torch model: Brevitas fallback)."""
    ex = {k: v[:2] for k, v in data["calib"].inputs.items() if k in lm.input_specs}
    n = args.lm_calib if lm.task == "causal-lm" else args.calib
    if config == "float":
        export(lm.module, work / "float.onnx", ex)
        if lm.task != "causal-lm":
            export(lm.module, work / "float-o20.onnx", ex, opset=20)
            E.reference(lm, data, work)
        return work / "float.onnx"
    if config.startswith("ours-"):
        return _ours(config, lm, data, work, ex, n)
    if config.startswith("ort-"):
        return _ort(config, data, work)
    if config.startswith("brevitas-"):
        import real_brevitas

        t0 = time.perf_counter()
        model = real_brevitas.quantize(lm.module, data["calib"], n, gptq=config.endswith("gptq"))
        CALIB[config] = time.perf_counter() - t0
        return real_brevitas.deploy(model, ex, work / f"{config}.onnx")
    return _nncf(config, data, work)


def ours_config(config: str, n: int):
    """The QuantConfig of ``ours-w{W}a{A}-{default,repq,minmax,token,rot,rottoken}[-unchecked]`` or,
    weight-only,
    ``ours-w{W}[g{G}]-{rtn,gptq}[-awq]`` (``rtn``: method minmax, round to nearest).

    ``default``: the product's defaults at those bits (nothing pinned but the rows); ``repq``:
    method repq, its other defaults; ``token``: the defaults with per-token run-time activation
    ranges (``act_dynamic: token``); ``minmax``: the plain baseline (min/max, attention
    quantized, no SmoothQuant migration, no outlier channels); ``rot`` / ``rottoken``: the
    defaults (per token) with the online input rotation (``rotate_inputs: on``, min/max);
    ``-unchecked``: the output-SQNR floor off (measured even below it).
    """
    from slimformer.quantize.config import QuantConfig

    m = re.fullmatch(r"ours-w(\d)a(\d)-(default|repq|minmax|token|rot|rottoken)(-unchecked)?",
                     config)
    if m:
        rot = {"method": "minmax", "rotate_inputs": "on"}
        kw = {"default": {}, "repq": {"method": "repq"}, "token": {"act_dynamic": "token"},
              "rot": rot, "rottoken": rot | {"act_dynamic": "token"},
              "minmax": {"method": "minmax", "attention": "quantized", "smooth": "off",
                         "outlier_channels": 0}}[m[3]]
        if m[4]:
            kw["min_output_sqnr_db"] = None
        return QuantConfig(weight_bits=int(m[1]), act_bits=int(m[2]), calib_samples=n, **kw)
    m = re.fullmatch(r"ours-w(\d)(?:g(\d+))?-(rtn|gptq)(-awq)?", config)
    if not m:
        raise ValueError(f"unknown configuration {config!r}")
    return QuantConfig(weight_only=True, weight_bits=int(m[1]), calib_samples=n,
                       group_size=int(m[2]) if m[2] else None,
                       method="minmax" if m[3] == "rtn" else "gptq", awq=bool(m[4]))


def _ours(config: str, lm, data: dict, work: Path, ex: dict, n: int):
    """``quantize`` then ``export onnx`` (QDQ, or MatMulNBits when weight-only); a weight-only
    model our export refuses: the PyTorch model, saved with ``save_quantized`` for its size
    (``SAVED``; the refusal in ``EXPORT_REFUSED``)."""
    from slimformer.errors import ExportError
    from slimformer.quantize.api import quantize
    from slimformer.quantize.inference import to_inference
    from slimformer.quantize.serialize import save_quantized

    cfg = ours_config(config, n)
    flat = _two_d_linears(lm.module, ex) if cfg.weight_only else []
    if flat:  # export/nbits rewrites MatMul only: a Linear on (B, K) rows is an ONNX Gemm
        cfg = cfg.model_copy(update={"keep_float": [*cfg.keep_float, *flat]})
    t0 = time.perf_counter()
    res = quantize(lm.module, cfg, data["calib"])
    CALIB[config] = time.perf_counter() - t0
    NOTES[config] = {"output_sqnr_db": res.output_sqnr_db,
                     "float_activations": len(res.float_activations), "gemm_float": flat}
    if cfg.weight_only:
        try:
            return export(res.model, work / f"{config}.onnx", ex)
        except ExportError as exc:
            EXPORT_REFUSED[config] = str(exc).splitlines()[0][:160]
            SAVED[config] = save_quantized(res.model, work / config, lm.spec)
            return res.model
    return export(to_inference(res.model), work / f"{config}.onnx", ex)


def _two_d_linears(module, ex: dict) -> list[str]:
    """Weight names of the Linears that see 2-D ``(B, K)`` inputs on ``ex`` (a pooler, a head on the
    pooled row): torch.onnx writes them as ``Gemm``, which our MatMulNBits rewrite does not read,
    so a weight-only row keeps them float to be exported (the row's status counts them)."""
    import torch

    seen, hooks = [], []
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_pre_hook(
                lambda _m, a, name=name: seen.append(f"{name}.weight") if a[0].dim() == 2 else None))
    try:
        with torch.no_grad():
            module(**ex)
    finally:
        for h in hooks:
            h.remove()
    return sorted(set(seen))


def _ort(config: str, data: dict, work: Path) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from slimformer.export.ortrun import session

    out = work / f"{config}.onnx"
    src = float_onnx(work)
    if config == "ort-dynamic":
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=True)
        return out
    feeds = E.calib_feeds(data["calib"], {i.name for i in session(src).get_inputs()},
                          len(data["calib"]), 8)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    t0 = time.perf_counter()
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
    CALIB[config] = time.perf_counter() - t0
    return out


def _nncf(config: str, data: dict, work: Path) -> Path:
    import nncf
    import openvino as ov

    src = work / "float-o20.onnx"
    m = ov.Core().read_model(str(src if src.exists() else float_onnx(work)))
    out = work / f"{config}.xml"
    t0 = time.perf_counter()
    if config == "nncf-quantize":
        names = {n for i in m.inputs for n in i.get_names()}
        feeds = E.calib_feeds(data["calib"], names, len(data["calib"]), 1)
        q = nncf.quantize(m, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=len(feeds))  # SmoothQuant is part of the TRANSFORMER preset
    elif config == "nncf-w8":
        q = nncf.compress_weights(m, mode=nncf.CompressWeightsMode.INT8_ASYM)
    else:  # nncf-w4gN: INT4 asymmetric, groups of N along the input channels, every layer
        q = nncf.compress_weights(m, mode=nncf.CompressWeightsMode.INT4_ASYM,
                                  group_size=int(config.split("g")[-1]), ratio=1.0)
    CALIB[config] = time.perf_counter() - t0
    ov.save_model(q, str(out), compress_to_fp16=False)
    return out
