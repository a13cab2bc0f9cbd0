"""The ONNX Runtime runner: CPU sessions, their outputs, predictions, timing, and what it fused.

``session(path)`` opens a model; :func:`run_all` returns every output by name, :func:`predict` the
argmax of the class scores over a data set, :func:`ort_latency` the median / p90 wall time of one
run (:func:`time_session` for an open session), :func:`fusion_counts` the integer and float
matmuls of ONNX Runtime's optimized graph. Parity with PyTorch is :mod:`slimformer.export.parity`.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from slimformer.errors import ExportError
from slimformer.models.evaluate import latency_stats

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


def ort_latency(path: str | Path, inputs: dict[str, torch.Tensor], repeats: int = 30,
                warmup: int = 5, threads: int = 2) -> dict[str, float]:
    """Median / p90 wall time (ms) of one ONNX Runtime run of the file ``path`` (:func:`time_session`)."""
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
    return latency_stats(times)


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
