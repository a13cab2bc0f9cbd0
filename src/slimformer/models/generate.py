"""Text generation with a causal language model: prefill, then one-token decode steps.

:func:`generate_tokens` runs any module called like a Hugging Face causal LM (float, pruned or a
quantized wrapper): ``model(input_ids=(1, T), attention_mask=(1, T), past_key_values=...,
use_cache=...)`` returning ``logits (1, T, vocab)`` and, with the cache, ``past_key_values``.
With ``use_cache`` the prompt is run once (prefill) and every new token is one step on the KV
cache; without it every step reruns the whole sequence (the reference the cache must match).
Greedy takes the argmax; sampling draws from ``softmax(logits / temperature)`` with its own
seeded generator (the global RNG is untouched). Prefill and decode are timed apart.

Whether the module is a causal LM is checked from its outputs, not its name
(:func:`check_causal`): logits over a vocabulary, a KV cache, and no position's logits depending
on a later token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from slimformer.errors import UnsupportedModelError


@dataclass
class Generation:
    """The tokens a model generated after a prompt, and how fast.

    Attributes:
        prompt_ids: The prompt's token ids ``(T,)``.
        new_ids: The generated token ids, in order (the end-of-sequence token included).
        prefill_seconds: Time of the forward over the prompt (with the cache) or of the first
            step (without it).
        decode_seconds: Time of the remaining steps.
        stopped: ``eos`` (the end-of-sequence token came) or ``length`` (max_new_tokens).
    """

    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stopped: str = "length"

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second of the prefill."""
        return len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second after the first (each one decode step)."""
        steps = len(self.new_ids) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


def _logits(out, what: str) -> torch.Tensor:
    """The ``logits (B, T, V)`` of a forward's output, or an UnsupportedModelError."""
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise UnsupportedModelError(
            f"{what} is not a causal language model: its forward returns no logits of shape "
            "(batch, tokens, vocabulary); generate needs a Hugging Face *ForCausalLM / "
            "*LMHeadModel (load a folder with --task causal-lm)")
    return logits


def cache_argument(module) -> str:
    """The name under which ``module``'s forward takes the KV cache.

    ``cache`` in newer transformers (``past_key_values`` is deprecated there), else
    ``past_key_values``. ``module``: the Hugging Face model itself (not a wrapper).
    """
    import inspect

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _forward(model, ids: torch.Tensor, past, use_cache: bool, total: int, what: str,
             cache_arg: str = "past_key_values"):
    """One forward: ``ids (1, t)`` new tokens, ``total`` tokens so far (the mask's length)."""
    mask = torch.ones(1, total, dtype=torch.long)
    kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": use_cache}
    if past is not None:
        kwargs[cache_arg] = past
    try:
        out = model(**kwargs)
    except TypeError as exc:  # a forward without input_ids / use_cache / past_key_values
        raise UnsupportedModelError(f"{what} cannot be run as a causal language model "
                                    f"(input_ids, attention_mask, use_cache): {exc}") from None
    logits = _logits(out, what)
    cache = getattr(out, "cache", None)
    if cache is None and cache_arg == "past_key_values":  # newer outputs warn on this name
        cache = getattr(out, "past_key_values", None)
    if use_cache and cache is None:
        raise UnsupportedModelError(f"{what} returns no key/value cache (past_key_values): it is "
                                    "not a causal language model (an encoder?)")
    return logits, cache


@torch.no_grad()
def check_causal(model, prompt_ids: list[int], what: str = "the model",
                 cache_arg: str = "past_key_values") -> None:
    """Refuse a model whose logits at a position depend on a later token (not causal).

    Runs the prompt with one token appended and without it; the logits of the prompt's
    positions must agree (to 1e-3 of their scale).

    Raises:
        UnsupportedModelError: No logits, no cache, or a later token changes earlier logits.
    """
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    short, _ = _forward(model, ids, None, True, ids.shape[1], what, cache_arg)
    longer = torch.cat([ids, ids[:, :1]], dim=1)
    full, _ = _forward(model, longer, None, False, longer.shape[1], what, cache_arg)
    diff = float((full[:, : ids.shape[1]] - short).abs().max())
    scale = float(short.abs().max()) or 1.0
    if diff > 1e-3 * scale:
        raise UnsupportedModelError(
            f"{what} is not a causal language model: appending a token changed the logits of "
            f"earlier positions (by {diff:.3g}, logits up to {scale:.3g}); generate needs a "
            "decoder whose positions see only earlier tokens")


@torch.no_grad()
def generate_tokens(model, prompt_ids: list[int], max_new_tokens: int, *, greedy: bool = True,
                    temperature: float = 1.0, seed: int = 0, use_cache: bool = True,
                    eos_token_id: int | list[int] | None = None,
                    what: str = "the model", cache_arg: str = "past_key_values") -> Generation:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` (see module doc).

    Args:
        model: A causal LM module (float, pruned or quantized wrapper), in eval mode.
        prompt_ids: The prompt's token ids (at least one).
        max_new_tokens: How many tokens at most (stops early at ``eos_token_id``).
        greedy: Argmax; else sample with ``temperature`` from a generator seeded by ``seed``.
        temperature: Divides the logits before sampling (> 0).
        seed: Seed of the sampling generator.
        use_cache: Decode one token per step on the KV cache (else rerun the whole sequence).
        eos_token_id: Token id(s) that end the sequence.
        what: How errors name the model.
        cache_arg: The forward's name of the cache argument (:func:`cache_argument`).

    Returns:
        The :class:`Generation`.
    """
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long)  # (1, T)
    result = Generation(list(prompt_ids))
    past, step_in = None, ids
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        logits, past = _forward(model, step_in, past if use_cache else None, use_cache,
                                ids.shape[1], what, cache_arg)
        last = logits[0, -1].float()  # (V,)
        if greedy:
            tok = int(last.argmax())
        else:
            probs = torch.softmax(last / temperature, dim=-1)
            tok = int(torch.multinomial(probs, 1, generator=gen))
        now = time.perf_counter()
        if i == 0:
            result.prefill_seconds, t0 = now - t0, now
        result.new_ids.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
        if tok in eos:
            result.stopped = "eos"
            break
        step_in = ids[:, -1:] if use_cache else ids
    result.decode_seconds = time.perf_counter() - t0 if len(result.new_ids) > 1 else 0.0
    return result
