"""Evaluation: task metric, prediction agreement, latency (median of repeats) and size."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import torch

from slimformer.errors import DataError


def _logits(output) -> torch.Tensor:
    """The class scores of a model output: a tensor, ``.logits``, or the first tuple element."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DataError(f"cannot find class scores in a model output of type {type(output).__name__}")


def run_batch(model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
    """Call ``model(**inputs)``; a shape/dtype mismatch becomes a :class:`DataError`."""
    try:
        return model(**inputs)
    except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as exc:
        shapes = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in
                  inputs.items()}
        expected = getattr(model, "input_shape", None)
        hint = f"; the model expects one sample of shape {expected}" if expected else ""
        raise DataError(f"data does not fit the model: inputs {shapes}{hint}; the model raised "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Iterable,
            progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes ``(N,)`` and labels ``(N,)`` over a loader of ``(inputs, labels)``."""
    model.eval()
    preds, labels = [], []
    for inputs, y in loader:
        preds.append(_logits(run_batch(model, inputs)).argmax(-1))
        labels.append(y)
        if progress:
            progress(len(y))
    if not preds:
        raise DataError("the evaluation data set is empty")
    return torch.cat(preds), torch.cat(labels)


def evaluate_accuracy(model: torch.nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy of ``model`` on ``loader`` in [0, 1]."""
    p, y = predict(model, loader)
    return float((p == y).float().mean())


def agreement(pred_a: torch.Tensor, pred_b: torch.Tensor) -> float:
    """Fraction of samples on which two models predict the same class."""
    return float((pred_a == pred_b).float().mean())


@torch.no_grad()
def measure_latency(model: torch.nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 20,
                    warmup: int = 3) -> dict[str, float]:
    """Median / p90 wall time in ms of ``model(**inputs)`` over ``repeats`` runs after warm-up."""
    model.eval()
    for _ in range(warmup):
        run_batch(model, inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_batch(model, inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def model_size(model: torch.nn.Module) -> dict[str, int]:
    """Parameter count and bytes as deployed.

    Float models: parameters + buffers as stored. Quantized models (with a ``quant`` state):
    each quantized weight at its bit-width plus its per-channel scale and zero point (fp32 each),
    everything else (norms, biases, embeddings, quantizer scales) at its stored size.
    """
    inner = getattr(model, "model", model)
    quant = getattr(model, "quant", None)
    params = sum(p.numel() for p in inner.parameters())
    if quant is None or not hasattr(quant, "linears"):
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        nbytes += sum(b.numel() * b.element_size() for b in model.buffers())
        return {"params": params, "bytes": nbytes}
    embs = list(getattr(quant, "embeddings", {}).values())
    qids = {id(lq.param[0]) for lq in [*quant.linears.values(), *embs]}
    nbytes = sum(p.numel() * p.element_size() for p in inner.parameters() if id(p) not in qids)
    nbytes += sum(b.numel() * b.element_size() for b in inner.buffers())
    for lq in quant.linears.values():
        w = lq.param[0]
        nbytes += (w.numel() * lq.wq.bits + 7) // 8 + 8 * lq.matrix().shape[0]
    for eq in embs:  # per-row codes + scale and zero point
        w = eq.param[0]
        nbytes += (w.numel() * eq.wq.bits + 7) // 8 + 8 * w.shape[0]
    for m in quant.modules():  # activation / probability quantizer parameters
        if not hasattr(m, "linears") and not hasattr(m, "wq"):
            nbytes += sum(t.numel() * 4 for t in m.parameters(recurse=False))
    return {"params": params, "bytes": int(nbytes)}
