"""One definition of a model's outputs, used by every stage.

The *outputs* of a model are the tensor leaves of what its ``forward`` returns, in a stable order,
each named by its path (:func:`leaves`):

- a tensor is one output named ``output``;
- a mapping, a ``transformers`` ``ModelOutput`` (fields that are ``None`` are absent) or a
  dataclass: its keys, e.g. ``logits``, ``last_hidden_state``,
  ``vision_model_output.pooler_output``;
- a tuple or list: the positions, ``0``, ``1.x`` (a named tuple: its field names);
- anything else (``None``, numbers, a key/value cache *object*) is not an output: a cache is
  decoding state, not a result. A cache given as nested tuples is a tuple like any other.

*Class scores* (:func:`class_scores`) follow one rule on those names, whatever the model family:
the output itself when ``forward`` returns a tensor, else the top-level output named ``logits``,
else the first element of a returned tuple/list when that is a tensor; always floating point.
Whether they are scores *for a task's labels* is a shape question (:func:`fits_labels`).

Comparisons of all outputs with a float reference (:func:`metrics`, :class:`OutputStats`):
cosine of the flattened tensors, SQNR in dB (``10 log10(sum ref^2 / sum (out - ref)^2)``), max
absolute error and, for floating outputs of 2 or more axes with a last axis over 1, argmax
agreement over the last axis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from slimformer.errors import DataError

TENSOR_NAME = "output"  # the name of a model output that is a bare tensor


def leaves(out) -> dict[str, torch.Tensor]:
    """Every tensor leaf of a model output, ``{path: tensor}`` in the order ``forward`` made them."""
    found: dict[str, torch.Tensor] = {}
    _walk(out, "", found)
    return found


def _walk(x, path: str, found: dict[str, torch.Tensor]) -> None:
    if isinstance(x, torch.Tensor):
        found[path or TENSOR_NAME] = x
        return
    if isinstance(x, Mapping):  # ModelOutput is an OrderedDict without its None fields
        items = [(str(k), v) for k, v in x.items()]
    elif isinstance(x, tuple) and hasattr(x, "_fields"):  # named tuple
        items = list(zip(x._fields, x, strict=True))
    elif isinstance(x, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(x)]
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        items = [(f.name, getattr(x, f.name)) for f in dataclasses.fields(x)]
    else:
        return
    for k, v in items:
        _walk(v, f"{path}.{k}" if path else k, found)


def scores_name(names: list[str]) -> str | None:
    """Which of the output names (as :func:`leaves` gives them) holds the class scores, if any."""
    if names == [TENSOR_NAME]:
        return TENSOR_NAME
    if "logits" in names:
        return "logits"
    if names and names[0] == "0":  # a returned tuple/list whose first element is a tensor
        return "0"
    return None


def class_scores(out) -> torch.Tensor | None:
    """The class scores of a model output by the module's rule, or ``None`` when it has none."""
    flat = leaves(out)
    name = scores_name(list(flat))
    if name is None or not flat[name].is_floating_point():
        return None
    return flat[name]


def fits_labels(scores: torch.Tensor | None, labels: torch.Tensor) -> bool:
    """Whether ``scores`` ``(*labels.shape, C)`` are class scores for integer ``labels``."""
    return (scores is not None and not labels.is_floating_point() and scores.dim() >= 2
            and tuple(scores.shape[:-1]) == tuple(labels.shape))


def describe(out) -> str:
    """``name (shape), ...`` of the outputs, for error messages."""
    flat = leaves(out)
    if not flat:
        return f"no tensors (a {type(out).__name__})"
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in flat.items())


def require_class_scores(out, labels: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`class_scores`, fitting ``labels`` when given; :class:`DataError` otherwise."""
    s = class_scores(out)
    if s is not None and (labels is None or fits_labels(s, labels)):
        return s
    what = (f"no class scores for labels of shape {tuple(labels.shape)}" if labels is not None
            else "no class scores")
    raise DataError(f"the model output ({type(out).__name__}: {describe(out)}) has {what}: class "
                    "scores are the output itself when forward returns a tensor, its 'logits', "
                    "or the first element of a returned tuple. A model without them (a base "
                    "encoder, a two-tower model) is judged against its float model on all its "
                    "outputs instead (slimformer.models.evaluate.compare_to_reference)")


def matching(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """:class:`DataError` unless two output dicts have the same names and shapes."""
    if list(ref) != list(got):
        raise DataError(f"the outputs differ: {list(got)} vs the reference's {list(ref)}")
    for k, r in ref.items():
        if tuple(r.shape) != tuple(got[k].shape):
            raise DataError(f"output {k} has shape {tuple(got[k].shape)}, the reference's "
                            f"{tuple(r.shape)}")


def normalized_mse(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the floating outputs of ``||got - ref||^2 / ||ref||^2`` (differentiable).

    Every output counts equally whatever its scale or size, so a small output (a pooled vector)
    weighs as much as a large one (all hidden states). Outputs must match (:func:`matching`).
    """
    matching(ref, got)
    terms = [((got[k].float() - r.float()) ** 2).sum() / (r.float() ** 2).sum().clamp_min(1e-30)
             for k, r in ref.items() if r.is_floating_point()]
    if not terms:
        raise DataError("the model has no floating-point outputs to compare")
    return torch.stack(terms).mean()


def metrics(ref, got) -> dict[str, float]:
    """Cosine, SQNR (dB), max abs error and (where meaningful) argmax agreement of one output.

    ``ref`` and ``got`` are tensors or numpy arrays of the same shape.
    """
    stats = OutputStats()
    stats.add({"x": torch.as_tensor(ref)}, {"x": torch.as_tensor(got)})
    return stats.result()["outputs"]["x"]


class OutputStats:
    """Running comparison of all outputs with a reference over batches (see module doc)."""

    def __init__(self):
        self._acc: dict[str, dict[str, float]] = {}

    def add(self, ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
        """Add one batch: ``{name: tensor}`` of the reference and of the compared model."""
        matching(ref, got)
        for k, r in ref.items():
            a = r.detach().double().reshape(-1)
            b = got[k].detach().double().reshape(-1)
            acc = self._acc.setdefault(k, dict.fromkeys(
                ("ref2", "got2", "dot", "err2", "max_abs", "agree", "rows"), 0.0))
            acc["ref2"] += float(a @ a)
            acc["got2"] += float(b @ b)
            acc["dot"] += float(a @ b)
            acc["err2"] += float((a - b) @ (a - b))
            if a.numel():
                acc["max_abs"] = max(acc["max_abs"], float((a - b).abs().max()))
            if r.is_floating_point() and r.dim() >= 2 and r.shape[-1] > 1:
                acc["agree"] += float((r.argmax(-1) == got[k].argmax(-1)).sum())
                acc["rows"] += r[..., 0].numel()

    def result(self) -> dict:
        """``{"outputs": {name: metrics}, "cosine": min, "sqnr_db": min, "agreement": ...}``.

        ``agreement`` is the argmax agreement of the class scores when the outputs have them,
        else the lowest over the outputs that have one (absent when none has).
        """
        per = {}
        for k, acc in self._acc.items():
            norm = math.sqrt(acc["ref2"] * acc["got2"])
            cos = acc["dot"] / norm if norm > 0 else float(acc["err2"] == 0)
            if acc["err2"] == 0:
                sqnr = math.inf
            else:
                sqnr = 10 * math.log10(max(acc["ref2"], 1e-300) / acc["err2"])
            m = {"cosine": cos, "sqnr_db": sqnr, "max_abs": acc["max_abs"]}
            if acc["rows"]:
                m["argmax_agreement"] = acc["agree"] / acc["rows"]
            per[k] = m
        res: dict = {"outputs": per}
        if per:
            res["cosine"] = min(m["cosine"] for m in per.values())
            res["sqnr_db"] = min(m["sqnr_db"] for m in per.values())
            scores = scores_name(list(per))
            if scores is not None and "argmax_agreement" in per[scores]:
                res["agreement"] = per[scores]["argmax_agreement"]
            elif any("argmax_agreement" in m for m in per.values()):
                res["agreement"] = min(m["argmax_agreement"] for m in per.values()
                                       if "argmax_agreement" in m)
        return res


def seeded_forward(model: torch.nn.Module, inputs: dict, seed: int = 0):
    """``model(**inputs)`` on a forked RNG seeded with ``seed`` (the caller's RNG is untouched).

    Two models run this way draw the same random numbers, so a forward that samples (random
    patch dropout, ``torch.randperm``) compares like with like.
    """
    p = next(iter(model.parameters()), None)
    if p is None or p.device.type == "cpu":
        fork = torch.random.fork_rng(devices=[])  # the CPU generator only
    else:
        fork = torch.random.fork_rng(devices=[p.device.index or 0], device_type=p.device.type)
    with fork:
        torch.manual_seed(seed)
        return model(**inputs)
