"""Task metrics of Hugging Face models against their float model (see :mod:`.hf` for tasks).

- sentence encoders (``sentence-embedding``): embeddings are the last hidden state mean-pooled
  over the attention mask, L2-normalized; compared by cosine (mean and min over rows) and by
  nearest-neighbour agreement (the share of rows whose nearest other row, by the float model's
  embeddings, is also the nearest by the compressed model's); a logistic-regression probe fitted
  on the FLOAT model's embeddings of labelled training rows scores both models on test rows;
- vision backbones (``image-features``): features are the pooled output (else the first
  token), compared by cosine; k-NN accuracy with the float model's features of training images
  as the bank;
- causal LMs (``causal-lm``): perplexity over a token stream in sliding windows (each token
  scored once, with up to ``max_length - stride`` tokens of context before a window's first
  scored token) and next-token top-1 agreement with the float model on the same positions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from slimformer.errors import DataError
from slimformer.models import outputs as O
from slimformer.models.evaluate import run_batch


def _hidden(out) -> torch.Tensor:
    """The last hidden state ``(B, T, H)`` of a model output (named, else the first 3-D leaf)."""
    flat = O.leaves(out)
    if "last_hidden_state" in flat:
        return flat["last_hidden_state"]
    for v in flat.values():
        if v.is_floating_point() and v.dim() == 3:
            return v
    raise DataError(f"the model output ({O.describe(out)}) has no hidden states (B, T, H) to pool; "
                    "task sentence-embedding / image-features needs a base model")


def sentence_embedding(out, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Masked mean of the last hidden state, L2-normalized: ``(B, H)``."""
    h = _hidden(out).float()  # (B, T, H)
    m = torch.ones(h.shape[:2]) if attention_mask is None else attention_mask[:, :h.shape[1]]
    m = m.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def image_features(out) -> torch.Tensor:
    """The pooled output ``(B, H)`` when the model has one, else the first token's state."""
    flat = O.leaves(out)
    if "pooler_output" in flat and flat["pooler_output"].dim() == 2:
        return flat["pooler_output"].float()
    return _hidden(out)[:, 0].float()


def by_length(ds):
    """``ds`` with its rows in order of real length (``attention_mask`` sums, stable sort).

    A loader cuts each batch to its longest row (``data.datasets.trim_padding``); in this order a
    batch holds rows of similar length, so it carries little padding (vader-movie pads to 64
    tokens, 27 real on average: about half the cost of the row order). The metrics do not depend
    on the row order. A data set without a 2-D ``attention_mask`` (images) is returned as is.
    """
    mask = getattr(ds, "inputs", {}).get("attention_mask")
    if mask is None or mask.dim() != 2:
        return ds
    return ds.select(torch.argsort(mask.sum(1), stable=True))


@torch.no_grad()
def embed(model: torch.nn.Module, loader: Iterable, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``(N, H)`` (:func:`sentence_embedding` or :func:`image_features`) and labels."""
    model.eval()
    embs, labels = [], []
    for inputs, y in loader:
        out = run_batch(model, inputs)
        embs.append(sentence_embedding(out, inputs.get("attention_mask"))
                    if task == "sentence-embedding" else image_features(out))
        labels.append(y)
    if not embs:
        raise DataError("the evaluation data set is empty")
    return torch.cat(embs), torch.cat(labels)


def embedding_fidelity(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Cosine (mean, min over rows) and nearest-neighbour agreement of ``got`` vs ``ref`` (N, H)."""
    r = torch.nn.functional.normalize(ref.double(), dim=-1)
    g = torch.nn.functional.normalize(got.double(), dim=-1)
    cos = (r * g).sum(-1)  # (N,)
    res = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    if len(r) > 1:
        res["neighbour_agreement"] = float((_nearest(r) == _nearest(g)).double().mean())
    return res


def _nearest(e: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row by cosine ``(N,)`` (``e`` normalized)."""
    sim = e @ e.T
    sim.fill_diagonal_(-torch.inf)
    return sim.argmax(-1)


def probe_accuracy(train: torch.Tensor, train_y: torch.Tensor,
                   tests: dict[str, torch.Tensor], test_y: torch.Tensor,
                   seed: int = 0) -> dict[str, float]:
    """A logistic-regression probe fitted on ``train`` ``(N, H)``, scored on each of ``tests``.

    Returns:
        ``{name: accuracy}`` for each ``(M, H)`` array of ``tests``.
    """
    from sklearn.linear_model import LogisticRegression

    if len(torch.unique(train_y)) < 2:
        raise DataError("the probe needs training rows of at least two classes")
    clf = LogisticRegression(max_iter=1000, random_state=seed)
    clf.fit(train.double().numpy(), train_y.numpy())
    return {k: float((torch.from_numpy(clf.predict(v.double().numpy())) == test_y).double().mean())
            for k, v in tests.items()}


def knn_accuracy(bank: torch.Tensor, bank_y: torch.Tensor, query: torch.Tensor,
                 query_y: torch.Tensor, k: int = 5) -> float:
    """k-nearest-neighbour (cosine, majority vote, ties to the nearest) accuracy of ``query``."""
    b = torch.nn.functional.normalize(bank.double(), dim=-1)
    q = torch.nn.functional.normalize(query.double(), dim=-1)
    k = min(k, len(b))
    sims, idx = (q @ b.T).topk(k, dim=-1)  # (M, k)
    votes = torch.zeros(len(q), int(bank_y.max()) + 1, dtype=torch.float64)
    votes.scatter_add_(1, bank_y[idx], 1 + 1e-6 * sims)  # ties: the nearer neighbours win
    return float((votes.argmax(-1) == query_y).double().mean())


def token_stream(dataset, max_tokens: int | None = None) -> torch.Tensor:
    """The real tokens of a data set's rows, concatenated in row order: ``(T,)`` int64."""
    ids = dataset.inputs.get("input_ids")
    if ids is None:
        raise DataError(f"perplexity needs token rows (input_ids); the data has "
                        f"{', '.join(dataset.inputs)}")
    mask = dataset.inputs.get("attention_mask")
    parts = [row[m.bool()] if mask is not None else row for row, m in
             zip(ids, mask if mask is not None else ids, strict=True)]
    stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return stream[:max_tokens] if max_tokens else stream


@torch.no_grad()
def language_model_metrics(model: torch.nn.Module, stream: torch.Tensor, max_length: int,
                           stride: int | None = None,
                           reference: torch.Tensor | torch.nn.Module | None = None,
                           reference_cache: dict | None = None) -> dict:
    """Perplexity of ``model`` over ``stream`` in sliding windows, and top-1 agreement.

    Windows of ``max_length`` tokens start every ``stride`` tokens (default ``max_length // 2``);
    each window scores only the tokens the window before did not, so every token but the first
    is scored once, with the window's earlier tokens as context.

    Args:
        model: A causal LM whose output's class scores are next-token logits ``(1, L, V)``.
        stream: ``(T,)`` token ids, ``T >= 2``.
        max_length: Tokens per window (at most the model's positions).
        stride: Tokens between window starts, ``1 <= stride <= max_length - 1``.
        reference: The float model (also scored: ``reference_perplexity``, and the share of
            scored positions where both predict the same next token: ``top1_agreement``).
            ``reference is model`` (a float model vs itself) runs each window once.
        reference_cache: Kept between calls with the same ``reference`` and ``stream``: the
            reference's summed NLL and next-token predictions per window, so a later call runs
            only ``model``.

    Returns:
        ``{"perplexity", "nll", "tokens", "max_length", "stride"}`` plus the reference's values.
    """
    stride = stride or max(1, max_length // 2)
    if len(stream) < 2:
        raise DataError(f"perplexity needs at least 2 tokens, got {len(stream)}")
    if not 1 <= stride < max_length:
        raise DataError(f"stride must be in [1, {max_length - 1}] (max_length {max_length}), "
                        f"got {stride}")
    nll = ref_nll = 0.0
    agree = tokens = 0
    done = 1  # the first token has no context: never scored
    begin = 0
    while done < len(stream):
        end = min(begin + max_length, len(stream))
        window = stream[begin:end][None]  # (1, L)
        first = done - begin  # first scored position in the window
        logits = _logits(model, window)
        nll += _nll(logits, window, first)
        if reference is not None:
            key = (begin, end, first)
            if reference_cache is None or key not in reference_cache:
                r = logits if reference is model else _logits(reference, window)
                hit = (_nll(r, window, first), r[first - 1:-1].argmax(-1))
                if reference_cache is not None:
                    reference_cache[key] = hit
            else:
                hit = reference_cache[key]
            ref_nll += hit[0]
            agree += int((hit[1] == logits[first - 1:-1].argmax(-1)).sum())
        tokens += end - done
        done = end
        begin += stride
    import math

    res = {"perplexity": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens,
           "max_length": max_length, "stride": stride}
    if reference is not None:
        res |= {"reference_perplexity": math.exp(ref_nll / tokens), "top1_agreement": agree / tokens}
    return res


def _logits(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities ``(L, V)`` of one window ``(1, L)``."""
    scores = O.require_class_scores(run_batch(model, {"input_ids": window}))
    return torch.log_softmax(scores[0].double(), -1)


def _nll(logp: torch.Tensor, window: torch.Tensor, first: int) -> float:
    """Summed negative log-likelihood of tokens ``window[0, first:]`` given their prefixes."""
    target = window[0, first:]
    return -float(logp[first - 1:-1].gather(-1, target[:, None]).sum())
