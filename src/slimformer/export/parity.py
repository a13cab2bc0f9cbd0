"""Parity of an ONNX file run by ONNX Runtime (:mod:`slimformer.export.ortrun`) with PyTorch.

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

import tempfile
from pathlib import Path

import numpy as np
import torch

from slimformer.errors import ExportError
from slimformer.export.ortrun import fusion_counts, run_all, session
from slimformer.store.outdir import scratch_root


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
    the parity runs use the unfused graph (see :func:`~slimformer.export.ortrun.session`).
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
