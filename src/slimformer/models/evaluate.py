"""Evaluation: task metric, prediction agreement, output fidelity, latency and size.

A model is judged by its class scores when the task has labels and the model has scores for them
(:mod:`slimformer.models.outputs`); otherwise by agreement, cosine and SQNR of all its outputs
against the float model (:func:`compare_to_reference`). :func:`evaluate` picks between the two.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import torch

from slimformer.errors import DataError
from slimformer.models import outputs as O


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
    """Predicted classes ``(N,)`` and labels ``(N,)`` over a loader of ``(inputs, labels)``.

    Raises:
        DataError: the model has no class scores for the labels (see :mod:`.outputs`).
    """
    model.eval()
    preds, labels = [], []
    for inputs, y in loader:
        preds.append(O.require_class_scores(run_batch(model, inputs), y).argmax(-1))
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
def compare_to_reference(model: torch.nn.Module, reference: torch.nn.Module, loader: Iterable,
                         progress: Callable[[int], None] | None = None) -> dict:
    """All outputs of ``model`` vs ``reference`` (the float model) over a loader.

    Args:
        model: the compressed model.
        reference: the float model it came from (same outputs, same shapes).
        loader: batches ``(inputs, labels)`` or ``inputs`` (labels unused).
        progress: called with the rows of each batch.

    Returns:
        ``{"outputs": {name: {cosine, sqnr_db, max_abs, argmax_agreement?}}, "cosine": min,
        "sqnr_db": min, "agreement": ...}`` (:meth:`.outputs.OutputStats.result`).
    """
    model.eval()
    reference.eval()
    stats = O.OutputStats()
    for batch in loader:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        stats.add(O.leaves(run_batch(reference, inputs)), O.leaves(run_batch(model, inputs)))
        if progress:
            progress(len(next(iter(inputs.values()))))
    res = stats.result()
    if not res["outputs"]:
        raise DataError("the evaluation data set is empty (or the model returns no tensors)")
    return res


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, reference: torch.nn.Module | None = None,
             progress: Callable[[int], None] | None = None) -> dict:
    """The task metric when the model has class scores for the labels, else output fidelity.

    With class scores: ``{"accuracy", "samples"}`` plus, given ``reference``,
    ``{"agreement"}`` (same predicted class) and ``"fidelity"`` (:func:`compare_to_reference`).
    Without them: ``{"fidelity": compare_to_reference(...), "samples"}``, which needs
    ``reference``.

    Raises:
        DataError: no class scores for the labels and no reference to compare with.
    """
    model.eval()
    first = next(iter(loader), None)
    if first is None:
        raise DataError("the evaluation data set is empty")
    inputs, labels = first
    if not O.fits_labels(O.class_scores(run_batch(model, inputs)), labels):
        if reference is None:
            O.require_class_scores(run_batch(model, inputs), labels)  # raises, naming outputs
        fid = compare_to_reference(model, reference, loader, progress)
        return {"fidelity": fid, "samples": sum(len(y) for _, y in loader)}
    preds, y = predict(model, loader, progress)
    res: dict = {"accuracy": float((preds == y).float().mean()), "samples": len(y)}
    if reference is not None:
        res["agreement"] = agreement(preds, predict(reference, loader)[0])
        res["fidelity"] = compare_to_reference(model, reference, loader)
    return res


@torch.no_grad()
def measure_latency(model: torch.nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 20,
                    warmup: int = 3, budget_s: float | None = None) -> dict[str, float]:
    """Median / p90 wall time in ms of ``model(**inputs)`` in PyTorch over ``repeats`` runs after warm-up.

    ``budget_s``: stop warming up and repeating once this many seconds are spent (at least one
    warm-up run and 3 timed runs); ``repeats`` in the result says how many ran.
    """
    model.eval()
    start = time.perf_counter()

    def spent() -> bool:
        return budget_s is not None and time.perf_counter() - start > budget_s

    for _ in range(warmup):
        run_batch(model, inputs)
        if spent():
            break
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_batch(model, inputs)
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 3 and spent():
            break
    return {**latency_stats(times), "threads": torch.get_num_threads()}


def latency_stats(times_ms: list[float]) -> dict[str, float]:
    """``median_ms``, ``p90_ms`` and ``repeats`` of a list of wall times in ms (any order)."""
    times = sorted(times_ms)
    return {"median_ms": statistics.median(times),
            "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))], "repeats": len(times)}


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
