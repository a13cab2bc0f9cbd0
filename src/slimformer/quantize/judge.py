"""The budget metrics on a fixed row set: float references once, then one forward per setting.

:meth:`Judge.measure` gives every metric of :class:`~slimformer.quantize.budget.Budget` for the
quantized model as its quantizers are set now.
"""

from __future__ import annotations

import math

import torch

from slimformer.errors import CalibrationError


class Judge:
    """Rows with their float references; :meth:`measure` gives every metric of the model now.

    Args:
        qmodel: The :class:`~slimformer.quantize.state.QuantizedModel`.
        rows: The rows (a data set of ``({name: tensor}, label)``).
        batch_size: Rows per forward.
        kinds: Metrics wanted (``db``, ``pt``, ``ppl``); only their references are kept.
    """

    def __init__(self, qmodel, rows, batch_size: int, kinds: set[str]):
        from slimformer.data.datasets import trim_padding

        self.qmodel, self.kinds, self.forwards = qmodel, set(kinds), 0
        self.batches = [trim_padding([rows[j] for j in range(i, min(len(rows), i + batch_size))])
                        for i in range(0, len(rows), batch_size)]
        self.rows = len(rows)
        self.ref = self._run("float")

    @torch.no_grad()
    def _run(self, mode: str) -> list[dict]:
        from slimformer.quantize.capture import real_positions
        from slimformer.quantize.check import float_leaves

        model = self._model(mode)
        found = []
        for i, (inp, labels) in enumerate(self.batches):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(i)
                out = model(**inp)
            got: dict = {}
            if "db" in self.kinds:
                got["leaves"] = [real_positions(t, inp) for t in float_leaves(out)]
            if "pt" in self.kinds:
                got["pred"], got["labels"] = _predictions(out, inp, labels)
            if "ppl" in self.kinds:
                got["nll"] = _nll(out, inp)
            found.append(got)
        return found

    def _model(self, mode: str):
        """The module run for ``mode``: ``float`` the reference, ``quant`` the model judged."""
        self.qmodel.quant.set_mode(mode)
        return self.qmodel

    def measure(self) -> dict[str, float]:
        """``{kind: value}`` of the model as its quantizers are set now (one forward per batch).

        ``db``: output SQNR; ``pt``: points lost (``labelled``: 1.0 when by accuracy);
        ``ppl``: perplexity increase in percent; ``agreement``: top-1 agreement with float.
        """
        self.forwards += 1
        res: dict[str, float] = {}
        got = self._run("quant")
        if "db" in self.kinds:
            sig = err = 0.0
            for r, g in zip(self.ref, got, strict=True):
                for a, b in zip(r["leaves"], g["leaves"], strict=True):
                    sig += float((a.double() ** 2).sum())
                    err += float(((b.double() - a.double()) ** 2).sum())
            res["db"] = math.inf if err == 0 else 10 * math.log10(sig / err) if sig else -math.inf
        if "pt" in self.kinds:
            ref_p = torch.cat([r["pred"] for r in self.ref])
            pred = torch.cat([g["pred"] for g in got])
            labels = torch.cat([r["labels"] for r in self.ref])
            res["agreement"] = float((pred == ref_p).double().mean())
            if labels is not None and len(labels) == len(pred) and bool((labels >= 0).all()):
                res["labelled"] = 1.0
                res["pt"] = 100 * float((ref_p == labels).double().mean() -
                                        (pred == labels).double().mean())
            else:
                res["labelled"] = 0.0
                res["pt"] = 100 * (1 - res["agreement"])
        if "ppl" in self.kinds:
            ref_nll = sum(r["nll"][0] for r in self.ref) / sum(r["nll"][1] for r in self.ref)
            nll = sum(g["nll"][0] for g in got) / sum(g["nll"][1] for g in got)
            res["ppl"] = 100 * (math.exp(nll - ref_nll) - 1)
        return res


def _predictions(out, inputs: dict, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 predictions of the class scores (real positions, flat) and the row labels."""
    from slimformer.models.outputs import class_scores
    from slimformer.quantize.capture import real_positions

    s = class_scores(out)
    if s is None or s.dim() < 2:
        raise CalibrationError("a points budget (e.g. 1pt) needs class scores (the output, its "
                               "'logits' or the first element of a returned tuple): this model "
                               "has none; use a dB budget (e.g. 30dB)")
    pred = real_positions(s, inputs).argmax(-1).reshape(-1)
    lab = labels.reshape(-1) if isinstance(labels, torch.Tensor) else torch.full_like(pred, -1)
    if s.dim() != 2 or len(lab) != len(pred):
        lab = torch.full_like(pred, -1)  # per-token scores: agreement with float
    return pred, lab


def _nll(out, inputs: dict) -> tuple[float, int]:
    """(summed next-token cross-entropy, tokens) of a causal LM's logits over ``input_ids``."""
    from slimformer.models.outputs import class_scores

    s, ids = class_scores(out), inputs.get("input_ids")
    if s is None or s.dim() != 3 or not isinstance(ids, torch.Tensor) or s.shape[:2] != ids.shape:
        raise CalibrationError("a perplexity budget (e.g. 3%ppl) needs a causal language model "
                               "(logits (B, T, vocab) over input_ids); use a points budget "
                               "(1pt) or a dB budget (30dB) for other models")
    logp = torch.log_softmax(s[:, :-1].double(), -1)  # (B, T-1, V)
    tgt = ids[:, 1:]
    nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    mask = inputs.get("attention_mask")
    keep = (mask[:, 1:] * mask[:, :-1]).bool() if isinstance(mask, torch.Tensor) else \
        torch.ones_like(tgt, dtype=torch.bool)
    return float(nll[keep].sum()), int(keep.sum())
