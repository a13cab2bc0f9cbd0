"""OpenVINO as a runtime and export target (the optional ``openvino`` package).

``export_openvino(model, "model.xml", inputs) -> OpenVinoResult`` writes the model's ONNX file in
the ``openvino`` form (:mod:`slimformer.export.targets`: a symmetric model's int8 Q/DQ, which
OpenVINO's CPU plugin runs in int8) into a temporary folder beside the IR (kept only where
``onnx_path`` asks: never over a user's ``model.onnx``), converts it with
``openvino.convert_model`` and writes the IR (``.xml`` + ``.bin``, weights kept in f32: no fp16
compression of the Q/DQ scales) with ``openvino.save_model``, then checks every output of the IR,
run by OpenVINO in f32, against PyTorch at the traced shape and a second one (the figures of
:func:`slimformer.export.parity.compare_all`). OpenVINO also reads the ONNX file directly;
:func:`ov_latency` times either. The target, ISA and form are recorded in the IR's ``rt_info``
(``slimformer/<key>``) as in the ONNX file's metadata.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slimformer.errors import ExportError
from slimformer.export import ovgraph

PRECISIONS = ("f32", "bf16")


def openvino_available() -> bool:
    """Whether ``import openvino`` works here."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _ov():
    try:
        import openvino as ov
    except ImportError as exc:
        raise ExportError("OpenVINO is not installed: pip install 'slimformer[openvino]' (or "
                          "scripts/install.sh)") from exc
    return ov


@dataclass
class OpenVinoResult:
    """A written OpenVINO IR, the ONNX file it came from, and its parity with PyTorch."""

    path: Path  # the .xml (its .bin beside it)
    onnx: object  # onnx.OnnxResult of the ONNX file beside it
    parity: dict[str, dict] = field(default_factory=dict)  # per checked shape, OpenVINO f32
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    version: str = ""

    def summary(self) -> dict:
        """JSON-ready summary for reports."""
        return {"path": str(self.path), "openvino": self.version, "parity": self.parity,
                "warnings": self.warnings, "seconds": round(self.seconds, 2),
                "onnx": self.onnx.summary()}


def compile_model(model, precision: str = "f32", threads: int = 2, extra: dict | None = None):
    """An OpenVINO CPU compiled model of a file (IR ``.xml`` or ``.onnx``) or ``ov.Model``.

    ``precision``: ``f32`` (exact float: the parity checks use it) or ``bf16`` (where the CPU has
    it; int8 parts stay int8 in both); ``threads``: ``INFERENCE_NUM_THREADS``; ``extra``: more
    CPU plugin properties.
    """
    ov = _ov()
    if precision not in PRECISIONS:
        raise ExportError(f"OpenVINO precision {precision!r}: choose one of {PRECISIONS}")
    core = ov.Core()
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise ExportError("this CPU has no bf16 arithmetic (no avx512_bf16 / amx_bf16): use f32")
    cfg = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision,
           "PERFORMANCE_HINT": "LATENCY", **(extra or {})}
    name = model
    try:
        if isinstance(model, str | Path):  # MatMulNBits zero points kept u4 (exact)
            model = core.read_model(str(model))
            ovgraph.compact_zero_points(model)
        return core.compile_model(model, "CPU", cfg)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError and its own types
        raise ExportError(f"OpenVINO cannot compile {name}: {str(exc).splitlines()[0][:300]}") \
            from exc


def _feeds(compiled, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    names = {n for i in compiled.inputs for n in i.get_names()}
    return {k: v.detach().cpu().numpy() for k, v in inputs.items() if k in names}


def run_all(compiled, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every output of ``compiled`` on ``inputs``, ``{name: array}`` in the model's order."""
    res = compiled(_feeds(compiled, inputs))
    return {o.get_any_name(): np.asarray(res[o]) for o in compiled.outputs}


def ov_latency(model, inputs: dict[str, torch.Tensor], repeats: int = 30, warmup: int = 5,
               threads: int = 2, precision: str = "f32") -> dict[str, float]:
    """Median / p90 wall time (ms) of one OpenVINO CPU inference (see :func:`compile_model`)."""
    return {**time_compiled(compile_model(model, precision, threads), inputs, repeats, warmup),
            "threads": threads, "precision": precision}


def time_compiled(compiled, inputs: dict[str, torch.Tensor], repeats: int = 30,
                  warmup: int = 5) -> dict[str, float]:
    """Median / p90 wall time (ms) of ``repeats`` inferences of a compiled OpenVINO model."""
    from slimformer.models.evaluate import latency_stats

    req = compiled.create_infer_request()
    f = _feeds(compiled, inputs)
    for _ in range(warmup):
        req.infer(f)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        req.infer(f)
        times.append((time.perf_counter() - t0) * 1e3)
    return latency_stats(times)


def ov_predict(model, dataset, batch_size: int = 256, threads: int = 2,
               precision: str = "f32") -> torch.Tensor:
    """Argmax predictions of the class-score output on every row of ``dataset`` (OpenVINO)."""
    from slimformer.data.datasets import make_loader
    from slimformer.models.outputs import scores_name

    compiled = compile_model(model, precision, threads)
    names = [o.get_any_name() for o in compiled.outputs]
    name = scores_name(names)
    if name is None:
        raise ExportError(f"the model has no class-score output (outputs: {names})")
    preds = []
    for inputs, _ in make_loader(dataset, batch_size):
        preds.append(torch.from_numpy(run_all(compiled, inputs)[name]).argmax(-1))
    if not preds:
        raise ExportError("the evaluation data set is empty")
    return torch.cat(preds)


def export_openvino(model, path: str | Path, inputs: dict[str, torch.Tensor], config=None,
                    onnx_path: str | Path | None = None) -> OpenVinoResult:
    """Write ``model`` as an OpenVINO IR at ``path`` (``.xml``) and check it through OpenVINO.

    Args:
        model: a float module or a quantized model.
        path: the ``.xml`` file (``.bin`` is written beside it).
        inputs: ``{name: (B, ...)}`` example inputs.
        config: :class:`~slimformer.export.config.OnnxConfig`; its target must be ``openvino``
            or ``auto`` (taken as ``openvino``).
        onnx_path: Where to keep the ONNX file the IR is converted from; None: a temporary
            file, removed (``result.onnx.path`` is then None).

    Raises:
        ExportError: bad path or target, OpenVINO missing, or a float IR whose outputs differ
            from PyTorch's (cosine below ``config.parity_min_cosine``).
    """
    from slimformer.export.config import OnnxConfig
    from slimformer.export.onnx import export_onnx
    from slimformer.export.parity import compare_all, other_shape, reference_outputs
    from slimformer.quantize.state import QuantizedModel

    ov = _ov()
    t0 = time.perf_counter()
    config = config or OnnxConfig(target="openvino")
    if config.target == "auto":
        config = config.model_copy(update={"target": "openvino"})
    if config.target != "openvino":
        raise ExportError(f"export_openvino writes the 'openvino' form; config.target is "
                          f"{config.target!r}: use target 'openvino' (or 'auto')")
    path = Path(path)
    if path.suffix != ".xml":
        raise ExportError(f"{path}: the OpenVINO IR file must end in .xml (.bin goes beside it)")
    bin_path = path.with_suffix(".bin")
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as d:
        onnx_res = export_onnx(model, Path(onnx_path or Path(d) / "model.onnx"), inputs, config)
        ov_model = ov.convert_model(str(onnx_res.path))
        ovgraph.compact_zero_points(ov_model)  # weight-only files: u4 zero points (exact)
        for k, v in onnx_res.form.items():
            ov_model.set_rt_info(str(v), ["slimformer", k])
        ov.save_model(ov_model, str(Path(d) / "model.xml"), compress_to_fp16=False)
        del ov_model
        (Path(d) / "model.bin").replace(bin_path)
        (Path(d) / "model.xml").replace(path)
    if onnx_path is None:
        onnx_res.path = None  # removed with the temporary folder
    res = OpenVinoResult(path=path, onnx=onnx_res, warnings=list(onnx_res.warnings),
                         version=ov.__version__)
    if config.check:
        reference = model
        if isinstance(model, QuantizedModel) and not model.inference:
            from slimformer.quantize.inference import to_inference

            reference = to_inference(model)
        compiled = compile_model(path, "f32", config.threads)
        shapes = {"traced": inputs}
        if onnx_res.dynamic_axes:
            shapes["other"] = other_shape(inputs, onnx_res.dynamic_axes)
        for label, inp in shapes.items():
            p = compare_all(reference_outputs(reference, inp), run_all(compiled, inp))
            p["shape"] = {k: list(v.shape) for k, v in inp.items()}
            res.parity[label] = p
        bad = [k for k, p in res.parity.items()
               if not onnx_res.quantized and p["cosine"] < config.parity_min_cosine]
        if bad:
            for f in (path, bin_path):
                f.unlink(missing_ok=True)
            raise ExportError(f"OpenVINO (f32) differs from PyTorch at the {bad[0]} shape: "
                              f"cosine {res.parity[bad[0]]['cosine']:.6f} < "
                              f"{config.parity_min_cosine}")
    res.seconds = time.perf_counter() - t0
    return res


class OvDecoder:
    """A decoder graph (:mod:`slimformer.export.decoder`, ONNX) compiled by OpenVINO's CPU plugin.

    The same ``empty`` / ``step`` as :class:`~slimformer.export.ortgen.OrtDecoder`, so
    :func:`~slimformer.export.ortgen.generate_onnx` and ``time_decoders`` run it. OpenVINO reads
    the ONNX file itself, ``com.microsoft::MatMulNBits`` included (our int4/int8 codes stay
    compressed weights); ``precision`` ``f32`` computes as ONNX Runtime does, ``bf16`` is faster
    where the CPU has it.

    ``stateful`` (default): each ``past_key_values.{i}`` input and its ``present.{i}`` output
    become a state variable kept inside the infer request
    (:func:`~slimformer.export.ovgraph.make_stateful`), so a decode step no longer copies the
    whole cache in and out; in OpenVINO's form of the graph (``DecoderConfig.for_openvino()``)
    the plugin then runs each layer's attention as one kernel that appends to the cache in
    place. A stateful IR (:func:`write_decoder_ir`) is read as written. The cache is the
    request's: ``empty()`` starts a sequence and ``step``
    continues only the request's own last step (the "past" it returns is a zero-width marker of
    the cached length); at ``f32`` the cache is held in f32 (the plugin's default would store it
    as u8), at ``bf16`` as the plugin chooses. MatMulNBits zero points are kept u4
    (:func:`~slimformer.export.ovgraph.compact_zero_points`).

    Raises:
        ExportError: OpenVINO is missing, or cannot read or compile the file (the message names
            the graph's ops outside the standard ONNX domain, which its ONNX frontend may lack).
    """

    def __init__(self, path: str | Path, threads: int = 2, precision: str = "f32",
                 stateful: bool = True):
        model = _read_decoder(path)
        form = _decoder_form(model, path, stateful)
        self.past_names, self.kv_heads, self.head_dim, self.reorder = form
        self.stateful, self.length = stateful, None
        extra = {"KV_CACHE_PRECISION": "f32"} if stateful and precision == "f32" else {}
        self.compiled = compile_model(model, precision, threads, extra)
        self.request = self.compiled.create_infer_request()

    def empty(self, batch: int = 1) -> list[np.ndarray]:
        """Empty past tensors ``(batch, kv_heads, 0, head_dim)`` (stateful: a new sequence)."""
        if self.stateful:  # each variable's initial value is the empty cache of the step's batch
            self.request.reset_state()
            self.length = 0
            return [np.zeros((batch, self.kv_heads, 0, 0), np.float32)]
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
                for _ in self.past_names]

    def step(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list]:
        """``(logits (B, T, V), presents)`` for new tokens ``ids (B, T)`` after ``past``."""
        from slimformer.export.ortgen import step_feeds, token_feeds

        if not self.stateful:
            self.request.infer(step_feeds(ids, past, self.past_names))
            outs = [self.request.get_output_tensor(i).data.copy()
                    for i in range(len(self.compiled.outputs))]
            return outs[0], outs[1:]
        b, t = ids.shape
        p = past[0].shape[2]
        if p != self.length:
            raise ExportError(f"a stateful OpenVINO decoder continues its own last step only "
                              f"(cache of {self.length} positions, asked to continue from {p}): "
                              "call empty() to start a sequence, or use stateful=False")
        feeds = token_feeds(ids, p)
        if self.reorder:
            feeds[ovgraph.BEAM_IDX] = np.arange(b, dtype=np.int32)
        self.request.infer(feeds)
        self.length = p + t
        logits = self.request.get_output_tensor(0).data.copy()
        return logits, [np.zeros((b, self.kv_heads, p + t, 0), np.float32)]


def _read_decoder(path):
    """``openvino.Model`` of a decoder file (ONNX or IR); ExportError naming what it cannot read."""
    ov = _ov()
    try:
        return ov.Core().read_model(str(path))
    except Exception as exc:  # noqa: BLE001 - OpenVINO's frontends raise many types
        custom = _custom_ops(path) if Path(path).suffix == ".onnx" else ""
        hint = ("; GroupQueryAttention is ONNX Runtime's form of the decoder graph: export "
                "it with DecoderConfig.for_openvino() for OpenVINO"
                if "GroupQueryAttention" in custom else "")
        raise ExportError(f"OpenVINO {ov.__version__} cannot read {path}: "
                          f"{str(exc).splitlines()[0][:300]} (ops outside the standard "
                          f"domain in the file: {custom or 'none'}){hint}") from exc


def _decoder_form(model, path, stateful: bool) -> tuple[list[str], int, int, bool]:
    """``(past names, kv_heads, head_dim, reorder)``; ``model`` made stateful in place.

    A decoder graph with past inputs gets u4 zero points and, with ``stateful``, its cache
    variables (:mod:`slimformer.export.ovgraph`; reordered, with additive masks, unless its file
    records the ``fold`` form). An IR written stateful (:func:`write_decoder_ir`) is taken as is.
    """
    names = [i.get_any_name() for i in model.inputs]
    past = [i for i in model.inputs if ovgraph.PAST.fullmatch(i.get_any_name())]
    if not {"input_ids", "attention_mask", "position_ids"} <= set(names):
        past = []
    reads = [op for op in model.get_ordered_ops() if op.get_type_name() == "ReadValue"
             and ovgraph.PAST.fullmatch(op.get_variable_id())]
    if not past and reads and not stateful:
        raise ExportError(f"{path} keeps its cache inside (a stateful IR): stateful=False needs "
                          "the ONNX decoder graph")
    if not past and reads and "input_ids" in names:
        shape = reads[0].get_output_partial_shape(0)
        return ([r.get_variable_id() for r in reads], shape[1].get_length(),
                shape[3].get_length(), ovgraph.BEAM_IDX in names)
    if not past:
        raise ExportError(f"{path} is not a decoder graph with a key/value cache: inputs "
                          f"{names} (export it with export_decoder)")
    shape = past[0].get_partial_shape()
    ovgraph.compact_zero_points(model)
    # the plugin fuses ScaledDotProductAttention ops only (opset 23's Attention as read), and
    # not the fold form's (its query rows are not the cache's rows)
    reorder = stateful and _kv_form(model) != "fold" and any(
        op.get_type_name() == "ScaledDotProductAttention" for op in model.get_ordered_ops())
    if reorder:
        ovgraph.float_masks(model)
    if stateful:
        ovgraph.make_stateful(model, reorder=reorder)
    return ([i.get_any_name() for i in past], shape[1].get_length(), shape[3].get_length(),
            reorder)


def write_decoder_ir(onnx_path: str | Path, path: str | Path) -> Path:
    """Write a decoder graph (ONNX) as a stateful OpenVINO IR at ``path`` (``.xml``).

    ``onnx_path``: :func:`~slimformer.export.decoder.export_decoder`'s file; the ``.bin`` goes
    beside ``path``. The IR is in the form :class:`OvDecoder` runs (cache variables, fused
    attention, u4 zero points; weights as in the file: our int4/int8 codes stay compressed).
    Inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``beam_idx``; output
    ``logits``; ``reset_state()`` starts a sequence. :class:`OvDecoder` reads it back.

    Raises:
        ExportError: bad path, OpenVINO missing, or not a decoder graph.
    """
    ov = _ov()
    path = Path(path)
    if path.suffix != ".xml":
        raise ExportError(f"{path}: the OpenVINO IR file must end in .xml (.bin goes beside it)")
    model = _read_decoder(onnx_path)
    _decoder_form(model, onnx_path, stateful=True)
    model.set_rt_info("stateful", ["slimformer", "decoder"])
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as d:
        ov.save_model(model, str(Path(d) / "model.xml"), compress_to_fp16=False)
        (Path(d) / "model.bin").replace(path.with_suffix(".bin"))
        (Path(d) / "model.xml").replace(path)
    return path


def _kv_form(model) -> str | None:
    """The decoder graph's form as its file records it (``slimformer.kv_form``), or None."""
    from slimformer.export.decoder import KV_FORM_KEY

    key = ["framework", KV_FORM_KEY]
    return model.get_rt_info(key).astype(str) if model.has_rt_info(key) else None


def _custom_ops(path) -> str:
    """``domain::op`` of the file's nodes outside the standard ONNX domain, comma-separated."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return ", ".join(sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node
                             if n.domain not in ("", "ai.onnx")}))
