"""Parity of a decoder graph with the PyTorch model it was exported from: outputs and tokens.

:func:`check_decoder`: every output of a prefill and a decode step in ONNX Runtime against
PyTorch (SQNR, max relative error, cosine).

``token_parity(model, OrtDecoder(path), prompt_ids, steps) -> TokenParity``. The PyTorch model
(float, or the weight-only quantized model whose codes the graph holds) decodes ``steps`` greedy
tokens after the prompt with its KV cache. The graph then runs the same sequence the way it
generates (a prefill of the prompt, then one-token decode steps on its own cache), fed the
PyTorch tokens (teacher forcing): at each step its argmax is compared with the PyTorch token.
``agreement`` is the share of steps where they are equal, so one near-tie does not count as every
later step; ``first_difference`` is where free-running greedy decoding of the graph would leave
the PyTorch tokens (None: the same ``steps`` tokens). ``min_margin`` is the smallest gap between
the PyTorch model's two largest logits over the steps where the two differ (a near-tie is small).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimformer.errors import ExportError


@dataclass(frozen=True)
class TokenParity:
    """Greedy tokens of a decoder graph against the PyTorch model's (see module doc)."""

    steps: int
    prompt_tokens: int
    agreement: float
    first_difference: int | None
    min_margin: float | None  # the PyTorch top-1 minus top-2 logit where they differ

    def as_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)

    def same(self) -> bool:
        """Every step's token equal."""
        return self.first_difference is None


@torch.no_grad()
def token_parity(model, decoder, prompt_ids: list[int], steps: int) -> TokenParity:
    """Teacher-forced greedy agreement of ``decoder`` (an OrtDecoder) with ``model``.

    Args:
        model: The PyTorch causal LM (float or quantized wrapper), in eval mode.
        decoder: Anything with ``empty(batch)`` and ``step(ids (B, T), past) -> (logits, past)``.
        prompt_ids: The prompt's token ids.
        steps: Greedy tokens compared (>= 1).
    """
    from slimformer.models.generate import cache_argument, generate_tokens
    from slimformer.quantize.state import QuantizedModel

    hf = model.model if isinstance(model, QuantizedModel) else model
    ref = generate_tokens(model, prompt_ids, steps, cache_arg=cache_argument(hf))
    seq = torch.tensor([prompt_ids + ref.new_ids[:-1]])  # (1, P + steps - 1)
    top2 = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, len(prompt_ids)
                                                                              - 1:].float()
    top2 = top2.topk(2, dim=-1).values  # (steps, 2): the reference's margins
    past, step_in, same = decoder.empty(1), np.asarray([prompt_ids], np.int64), []
    for tok in ref.new_ids:
        logits, past = decoder.step(step_in, past)
        same.append(int(np.argmax(logits[0, -1])) == tok)
        step_in = np.asarray([[tok]], np.int64)
    differ = [i for i, s in enumerate(same) if not s]
    margins = [float(top2[i, 0] - top2[i, 1]) for i in differ]
    return TokenParity(steps=len(same), prompt_tokens=len(prompt_ids),
                       agreement=sum(same) / len(same),
                       first_difference=differ[0] if differ else None,
                       min_margin=round(min(margins), 6) if margins else None)


def step_inputs(ids: torch.Tensor, past: list[torch.Tensor]) -> list[torch.Tensor]:
    """The graph inputs of one step: ``ids (B, T)`` new tokens after ``past`` (B, h, P, d)."""
    b, t = ids.shape
    p = past[0].shape[2]
    return [ids, torch.ones(b, p + t, dtype=torch.long),
            torch.arange(p, p + t).unsqueeze(0).expand(b, t).contiguous(), *past]


@torch.no_grad()
def check_decoder(path: Path, reference: nn.Module, layout,
                  config) -> dict[str, dict[str, dict[str, float]]]:
    """ONNX Runtime vs ``reference`` (a :class:`DecoderEntry`) on a prefill and a decode step.

    Returns:
        ``{"prefill"|"decode": {output: {"sqnr_db", "max_rel_error", "cosine"}}}``; the decode
        step feeds each side its own prefill's presents.
    """
    from slimformer.export.ortrun import session

    sess = session(path, config.threads)
    names = layout.input_names()
    ids = torch.randint(0, layout.vocab, (1, config.check_tokens),
                        generator=torch.Generator().manual_seed(1))
    ref_past = ort_past = layout.empty(1)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for step, new in (("prefill", ids), ("decode", ids[:, -1:])):
        ref = reference(*step_inputs(new, ref_past))
        got = sess.run(None, {n: t.numpy() for n, t in zip(names, step_inputs(new, ort_past),
                                                             strict=True)})
        out[step] = {n: compare(r, torch.from_numpy(g)) for n, r, g in
                     zip(layout.output_names(), ref, got, strict=True)}
        ref_past, ort_past = list(ref[1:]), [torch.from_numpy(g) for g in got[1:]]
    return out


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """SQNR (dB), max error relative to the reference's largest magnitude, cosine."""
    from slimformer.models.outputs import metrics

    if ref.shape != got.shape:
        raise ExportError(f"ONNX Runtime returned shape {list(got.shape)}, PyTorch "
                          f"{list(ref.shape)}")
    m = metrics(ref.float(), got.float())
    scale = float(ref.abs().max()) or 1.0
    return {"sqnr_db": round(m["sqnr_db"], 2), "cosine": m["cosine"],
            "max_rel_error": float((ref.float() - got.float()).abs().max()) / scale}
