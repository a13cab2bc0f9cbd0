"""Task metrics of a model vs its float model on held-out rows (sentence encoders, LMs, vision).

The model's task (:mod:`slimformer.models.hf`) picks them: ``sentence-embedding`` and
``image-features`` are judged by their embeddings (cosine, nearest-neighbour agreement, a probe or
k-NN accuracy where labels exist), ``causal-lm`` by perplexity and next-token agreement
(:mod:`slimformer.models.taskeval`). Always on the run's evaluation rows (a built-in set's test
split, or the rows of the user's data kept apart from calibration); the probe and the k-NN bank
use the FLOAT model's embeddings of up to :data:`TRAIN_ROWS` training rows (seeded sample).

Row counts bound the time: a vision backbone sees the built-in Fashion-MNIST through its own
image processor (e.g. DINOv2-small: 3x224x224, about 0.1-0.2 s an image on 2 CPU cores), so
``image-features`` evaluates the first :data:`EVAL_ROWS` test rows (unless ``--limit`` /
``data.eval_limit`` says otherwise) with a k-NN bank of :data:`TRAIN_ROWS` training rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TASKS = ("sentence-embedding", "image-features", "causal-lm")
DEFAULT_DATA = {"sentence-embedding": "vader-movie", "causal-lm": "nyt-editorials",
                "image-features": "fashion-mnist"}
TRAIN_ROWS = {"sentence-embedding": 2000, "image-features": 500}  # probe / k-NN bank rows
EVAL_ROWS = {"image-features": 250}  # default evaluation rows (else all of the split)
MAX_TOKENS = 8192  # tokens of the evaluation rows scored for perplexity
MAX_WINDOW = 1024  # longest perplexity window (less when the model has fewer positions)


def task_metrics(model: torch.nn.Module, reference: torch.nn.Module, task: str, data,
                 batch_size: int = 64, cache: dict | None = None) -> dict:
    """The metrics of ``task`` for ``model`` vs ``reference`` (the float model).

    Args:
        model: The model judged.
        reference: The float (input) model.
        task: One of :data:`TASKS`.
        data: The run's rows (``stages.context.RunData``): ``eval`` rows, ``train`` rows for a
            probe / k-NN bank.
        batch_size: Rows per forward pass.
        cache: Kept between calls of one run: the reference's results are computed once.

    Returns:
        Flat ``{name: number}``: ``sentence-embedding``: ``embedding_cosine_mean``,
        ``embedding_cosine_min``, ``neighbour_agreement`` and, with labels, ``probe_accuracy``
        and ``probe_accuracy_float``; ``image-features``: ``feature_cosine_mean``,
        ``feature_cosine_min``, ``neighbour_agreement``, ``knn_accuracy`` and
        ``knn_accuracy_float``; ``causal-lm``: ``perplexity``, ``perplexity_float``,
        ``top1_agreement``, ``tokens``, ``window``, ``stride``. Plus ``samples``.
    """
    cache = {} if cache is None else cache
    if task == "causal-lm":
        return _lm(model, reference, data, cache)
    from slimformer.data.datasets import make_loader
    from slimformer.models import taskeval as T

    ds = T.by_length(data.get("eval"))
    key = (id(reference), "eval")
    if key not in cache:
        cache[key] = T.embed(reference, make_loader(ds, batch_size), task)
    ref, y = cache[key]
    got = ref if model is reference else T.embed(model, make_loader(ds, batch_size), task)[0]
    fid = T.embedding_fidelity(ref, got)
    word = "embedding" if task == "sentence-embedding" else "feature"
    res = {f"{word}_cosine_mean": fid["cosine_mean"], f"{word}_cosine_min": fid["cosine_min"],
           "samples": len(ds)}
    if "neighbour_agreement" in fid:
        res["neighbour_agreement"] = fid["neighbour_agreement"]
    if getattr(ds, "has_labels", False):
        res |= _labelled(ref, got, y, task, reference, data, batch_size, cache)
    return res


def _labelled(ref, got, y, task, reference, data, batch_size, cache) -> dict:
    """Probe (sentence embeddings) or k-NN (image features) accuracy on the float train rows."""
    from slimformer.data.datasets import make_loader
    from slimformer.models import taskeval as T

    key = (id(reference), "train")
    if key not in cache:  # a seeded sample (seed 0): only these rows are prepared
        bank = T.by_length(data.sample("train", TRAIN_ROWS[task]))
        cache[key] = T.embed(reference, make_loader(bank, batch_size), task)
    bank, bank_y = cache[key]
    if task == "sentence-embedding":
        acc = T.probe_accuracy(bank, bank_y, {"m": got, "f": ref}, y)
        return {"probe_accuracy": acc["m"], "probe_accuracy_float": acc["f"],
                "probe_train_rows": len(bank)}
    return {"knn_accuracy": T.knn_accuracy(bank, bank_y, got, y),
            "knn_accuracy_float": T.knn_accuracy(bank, bank_y, ref, y), "knn_bank_rows": len(bank)}


def _lm(model, reference, data, cache) -> dict:
    from slimformer.models import taskeval as T
    from slimformer.models.loading import max_positions

    ds = data.get("eval")
    stream = T.token_stream(ds, MAX_TOKENS)
    window = min(MAX_WINDOW, max_positions(reference) or MAX_WINDOW, len(stream))
    refs = cache.setdefault((id(reference), "lm", len(stream), window), {})
    res = T.language_model_metrics(model, stream, window, max(1, window // 2),
                                   reference=reference, reference_cache=refs)
    return {"perplexity": res["perplexity"], "perplexity_float": res["reference_perplexity"],
            "top1_agreement": res["top1_agreement"], "tokens": res["tokens"],
            "window": res["max_length"], "stride": res["stride"], "samples": len(ds)}
