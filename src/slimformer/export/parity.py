"""ONNX Runtime sessions, parity with PyTorch, and what ONNX Runtime fused.

Parity compares every output (:mod:`slimformer.models.outputs`; the ONNX outputs carry their
names), per checked shape and per output: cosine similarity of the flattened tensors, SQNR (dB),
max absolute error, argmax agreement over the last axis (floating outputs of 2+ axes), and errors
in *output steps*: the step of an 8-bit grid over the reference output's range,
``(max - min) / 255``. The figures of a shape are the worst over its outputs (lowest cosine, SQNR,
agreement and share within one step; largest errors), with each output under ``"outputs"``.
PyTorch's reference runs on a forked RNG seeded the same at every shape
(:func:`~slimformer.models.outputs.seeded_forward`).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from slimformer.errors import ExportError
from slimformer.report.outdir import scratch_root

INTEGER_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "QLinearConv",
               "ConvInteger", "DynamicQuantizeMatMul", "QAttention", "MatMulNBits")
FLOAT_MATMULS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm", "Conv", "FusedConv")


def session(path: str | Path, threads: int = 2, optimized_to: str | Path | None = None,
            qdq_fusion: bool = True):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads.

    ``qdq_fusion=False`` keeps Q/DQ nodes as they are (``session.disable_quant_qdq``): the graph's
    exact semantics, without ONNX Runtime's integer kernels.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not qdq_fusion:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if optimized_to is not None:
        so.optimized_model_filepath = str(optimized_to)
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise ExportError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0][:300]}") \
            from exc


def feeds(sess, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The session's inputs from ``inputs`` (inputs the graph dropped as unused are skipped)."""
    names = {i.name for i in sess.get_inputs()}
    return {k: v.detach().cpu().numpy() for k, v in inputs.items() if k in names}


def run(sess, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """The first output of ``sess`` on ``inputs``."""
    return sess.run(None, feeds(sess, inputs))[0]


def run_all(sess, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every output of ``sess`` on ``inputs``, ``{name: array}`` in the graph's order."""
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds(sess, inputs)), strict=True))


def scores_output(sess) -> str:
    """The name of the class-score output of a session (:func:`.outputs.scores_name`)."""
    from slimformer.models.outputs import scores_name

    names = [o.name for o in sess.get_outputs()]
    name = scores_name(names)
    if name is None:
        raise ExportError(f"the ONNX model has no class-score output (outputs: {names}); "
                          "class scores are an output named 'logits', 'output' (the only one) or "
                          "'0' (the first of a tuple)")
    return name


def latency(path: str | Path, inputs: dict[str, torch.Tensor], repeats: int = 30, warmup: int = 5,
            threads: int = 2) -> dict[str, float]:
    """Median / p90 wall time (ms) of one ONNX Runtime run over ``repeats`` after ``warmup``."""
    return {**time_session(session(path, threads), inputs, repeats, warmup), "threads": threads}


def time_session(sess, inputs: dict[str, torch.Tensor], repeats: int = 30,
                 warmup: int = 5) -> dict[str, float]:
    """Median / p90 wall time (ms) of ``sess.run`` on ``inputs`` over ``repeats`` after warm-up."""
    f = feeds(sess, inputs)
    for _ in range(warmup):
        sess.run(None, f)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, f)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times),
            "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))], "repeats": repeats}


def compare(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Metrics of one output (see module doc)."""
    from slimformer.models.outputs import metrics

    if ref.shape != out.shape:
        raise ExportError(f"ONNX output shape {out.shape} != PyTorch output shape {ref.shape}")
    res = metrics(ref, out)
    a, b = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    step = max(float(a.max() - a.min()) / 255.0, 1e-12) if a.size else 1e-12
    err = np.abs(a - b)
    res |= {"output_step": step, "max_steps": float(err.max() / step) if a.size else 0.0,
            "within_1_step": float((err <= step).mean()) if a.size else 1.0}
    return res


_WORST_LOW = ("cosine", "sqnr_db", "argmax_agreement", "within_1_step")
_WORST_HIGH = ("max_abs", "max_steps")


def compare_all(ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict:
    """Every output compared (:func:`compare`); the worst of each figure at the top level."""
    if list(ref) != list(out):
        raise ExportError(f"the ONNX outputs {list(out)} are not PyTorch's {list(ref)}")
    per = {k: compare(r, out[k]) for k, r in ref.items()}
    res: dict = {}
    for key in (*_WORST_LOW, *_WORST_HIGH):
        vals = [m[key] for m in per.values() if key in m]
        if vals:
            res[key] = min(vals) if key in _WORST_LOW else max(vals)
    res["outputs"] = per
    return res


def other_shape(inputs: dict[str, torch.Tensor], dyn: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Inputs at a second shape: one more row on symbolic batch axes, one token fewer on sequence."""
    out = {}
    for k, v in inputs.items():
        axes = dyn.get(k, [])
        if 0 in axes:
            v = torch.cat([v, v[:1]])
        if 1 in axes and v.shape[1] > 2:
            v = v[:, :-1]
        out[k] = v
    return out


@torch.no_grad()
def reference_outputs(model, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """PyTorch's outputs for ``inputs``, ``{name: array}`` (on a seeded, forked RNG)."""
    from slimformer.models.outputs import leaves, seeded_forward

    return {k: v.detach().float().cpu().numpy() if v.is_floating_point() else
            v.detach().cpu().numpy() for k, v in leaves(seeded_forward(model, inputs)).items()}


def check_parity(reference, path: Path, inputs: dict[str, torch.Tensor], dyn: dict[str, list[int]],
                 quantized: bool, config, qdq_fusion: bool = True) -> tuple[dict, dict]:
    """Compare ONNX Runtime with ``reference`` at the traced shape and (dynamic) a second one.

    Returns ``(parity per shape, op counts of ONNX Runtime's optimized graph)``; a shape's parity
    is :func:`compare_all` of every output plus the input ``shape``; with ``qdq_fusion=False``
    the parity runs use the unfused graph (see :func:`session`).
    """
    with tempfile.TemporaryDirectory(dir=scratch_root()) as d:
        opt = Path(d) / "optimized.onnx"
        sess = session(path, config.threads, optimized_to=opt)
        fusion = fusion_counts(opt)
    if not qdq_fusion:
        sess = session(path, config.threads, qdq_fusion=False)
    shapes = {"traced": inputs}
    if dyn:
        shapes["other"] = other_shape(inputs, dyn)
    parity = {}
    for label, inp in shapes.items():
        res = compare_all(reference_outputs(reference, inp), run_all(sess, inp))
        res["shape"] = {k: list(v.shape) for k, v in inp.items()}
        parity[label] = res
    return parity, fusion


def fusion_counts(optimized: Path) -> dict[str, int]:
    """Integer and float matmul-like ops (and leftover Q/DQ) in ONNX Runtime's optimized graph."""
    import onnx

    ops = Counter(n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node)
    return {"integer_matmuls": sum(ops[o] for o in INTEGER_OPS),
            "float_matmuls": sum(ops[o] for o in FLOAT_MATMULS),
            "quantize_linear": ops["QuantizeLinear"] + ops["DynamicQuantizeLinear"],
            "dequantize_linear": ops["DequantizeLinear"]}


def predict(path: str | Path, dataset, batch_size: int = 256, threads: int = 2) -> torch.Tensor:
    """Argmax predictions of the ONNX model's class scores on every row of ``dataset``."""
    from slimformer.data.datasets import make_loader

    sess = session(path, threads)
    name = scores_output(sess)
    preds = []
    for inputs, _ in make_loader(dataset, batch_size):
        preds.append(torch.from_numpy(sess.run([name], feeds(sess, inputs))[0]).argmax(-1))
    if not preds:
        raise ExportError("the evaluation data set is empty")
    return torch.cat(preds)
