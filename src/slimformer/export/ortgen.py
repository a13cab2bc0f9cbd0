"""Text generation through ONNX Runtime on a decoder graph (:mod:`slimformer.export.decoder`).

``OrtDecoder(path)`` opens the graph in an :func:`~slimformer.export.ortrun.session` and reads
its cache layout from the graph's past inputs; :func:`generate_onnx` runs the prefill (the prompt
with an empty past) and one-token decode steps, feeding each step's presents back as the next
past, greedy or sampled as :func:`slimformer.models.generate.generate_tokens` (same seeded
sampling), prefill and decode timed apart.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch

from slimformer.errors import ExportError
from slimformer.models.generate import Generation

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")


class OrtDecoder:
    """An ONNX Runtime session of a decoder graph and its cache layout.

    A graph whose attention is ``GroupQueryAttention`` with the cache in place (the model
    metadata :data:`~slimformer.export.ortgqa.META_KEY`, :mod:`slimformer.export.ortgqa`) runs
    with each layer's past and present bound to one buffer ``(B, kv_heads, capacity,
    head_dim)``: a step writes its new keys / values there instead of copying the cache. The
    buffers start at ``capacity`` positions (or what the first step needs) and double when a
    step would pass them. Its ``past`` is then a marker ``(B, kv_heads, cached, 0)``: the
    decoder continues its own last step only. ``in_place=False`` feeds plain tensors.
    """

    def __init__(self, path: str | Path, threads: int = 2, in_place: bool = True,
                 capacity: int = 256):
        from slimformer.export.ortgqa import IN_PLACE, META_KEY
        from slimformer.export.ortrun import session

        self.sess = session(path, threads)
        self.inputs = [i.name for i in self.sess.get_inputs()]
        past = [i for i in self.sess.get_inputs() if _PAST.fullmatch(i.name)]
        want = {"input_ids", "attention_mask", "position_ids"}
        if not past or not want <= set(self.inputs):
            raise ExportError(f"{path} is not a decoder graph with a key/value cache: inputs "
                              f"{self.inputs}; expected input_ids, attention_mask, position_ids "
                              "and past_key_values.{i}.key/value (export it with export_decoder)")
        self.past_names = [i.name for i in past]
        self.kv_heads, self.head_dim = past[0].shape[1], past[0].shape[3]
        self.dtype = np.float16 if "float16" in past[0].type else np.float32
        meta = self.sess.get_modelmeta().custom_metadata_map
        self.in_place = in_place and meta.get(META_KEY) == IN_PLACE
        self.capacity, self._bufs, self._length = capacity, [], 0

    def empty(self, batch: int = 1) -> list[np.ndarray]:
        """Empty past tensors ``(batch, kv_heads, 0, head_dim)`` (in place: a new sequence)."""
        if self.in_place:
            self._bufs, self._length = [], 0
            return [np.zeros((batch, self.kv_heads, 0, 0), self.dtype)]
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.dtype)
                for _ in self.past_names]

    def step(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list]:
        """``(logits (B, T, V), presents)`` for new tokens ``ids (B, T)`` after ``past``."""
        if not self.in_place:
            logits, *presents = self.sess.run(None, step_feeds(ids, past, self.past_names))
            return logits, presents
        return self._step_in_place(ids, past)

    def _step_in_place(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list]:
        import onnxruntime as ort

        b, t = ids.shape
        p = past[0].shape[2]
        if p != self._length or (p and self._bufs[0].shape[0] != b):
            raise ExportError(f"this decoder keeps its cache in place and continues its own "
                              f"last step only (cache of {self._length} positions, asked to "
                              f"continue from {p}): call empty() to start a sequence, or open "
                              "it with in_place=False")
        if not self._bufs or p + t > self._bufs[0].shape[2]:
            size = max(self.capacity, 2 * (self._bufs[0].shape[2] if self._bufs else 0))
            while size < p + t:
                size *= 2
            grown = [np.zeros((b, self.kv_heads, size, self.head_dim), self.dtype)
                     for _ in self.past_names]
            for new, old in zip(grown, self._bufs, strict=False):
                new[:, :, :p] = old[:, :, :p]
            self._bufs = grown
            self._binding = self.sess.io_binding()
            self._binding.bind_output("logits")  # first: get_outputs()[0] (rebinding keeps it)
            for name, buf in zip(self.past_names, self._bufs, strict=True):
                value = ort.OrtValue.ortvalue_from_numpy(buf)  # shares buf's memory
                self._binding.bind_ortvalue_input(name, value)
                self._binding.bind_ortvalue_output(name.replace("past_key_values.", "present.",
                                                                1), value)
        for name, value in token_feeds(ids, p).items():
            self._binding.bind_cpu_input(name, value)
        self._binding.bind_output("logits")
        self.sess.run_with_iobinding(self._binding)
        self._length = p + t
        logits = self._binding.get_outputs()[0].numpy()
        return logits, [np.zeros((b, self.kv_heads, p + t, 0), self.dtype)]

    def cache(self) -> list[np.ndarray]:
        """In place: the cached ``(B, kv_heads, cached, head_dim)`` keys / values per input."""
        return [buf[:, :, :self._length] for buf in self._bufs]


def step_feeds(ids: np.ndarray, past: list[np.ndarray], past_names: list[str]) -> dict:
    """A decoder graph's inputs for new tokens ``ids (B, T)`` after ``past``.

    ``past``: each ``(B, kv_heads, P, head_dim)``; the feeds add an all-ones mask ``(B, P + T)``
    and positions ``P .. P+T-1``.
    """
    return {**token_feeds(ids, past[0].shape[2]), **dict(zip(past_names, past, strict=True))}


def token_feeds(ids: np.ndarray, p: int) -> dict:
    """The inputs of new tokens ``ids (B, T)`` after ``p`` cached ones.

    ``input_ids``, an all-ones ``attention_mask (B, p + T)`` and positions ``p .. p+T-1``.
    """
    b, t = ids.shape
    return {"input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((b, p + t), np.int64),
            "position_ids": np.broadcast_to(np.arange(p, p + t, dtype=np.int64), (b, t)).copy()}


def generate_onnx(decoder: OrtDecoder, prompt_ids: list[int], max_new_tokens: int, *,
                  greedy: bool = True, temperature: float = 1.0, seed: int = 0,
                  eos_token_id: int | list[int] | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` with the ONNX Runtime decoder."""
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    gen = torch.Generator().manual_seed(seed)
    result = Generation(list(prompt_ids))
    step_in, past = np.asarray([prompt_ids], np.int64), decoder.empty(1)
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        logits, past = decoder.step(step_in, past)
        if greedy:  # numpy: no torch worker threads spinning beside the runtime's
            tok = int(np.argmax(logits[0, -1]))
        else:
            last = torch.from_numpy(logits[0, -1]).float()  # (V,)
            tok = int(torch.multinomial(torch.softmax(last / temperature, dim=-1), 1,
                                        generator=gen))
        now = time.perf_counter()
        if i == 0:
            result.prefill_seconds, t0 = now - t0, now
        result.new_ids.append(tok)
        if tok in eos:
            result.stopped = "eos"
            break
        step_in = np.asarray([[tok]], np.int64)
    result.decode_seconds = time.perf_counter() - t0 if len(result.new_ids) > 1 else 0.0
    return result


def time_decoders(decoders: dict[str, OrtDecoder], prompt_ids: list[int], decode_steps: int,
                  rounds: int = 3) -> dict[str, dict[str, float]]:
    """Prefill and decode speed of each decoder at batch 1, the decoders alternating each round.

    Each round runs every decoder in turn (the order rotated by one each round): a prefill of
    ``prompt_ids`` (timed), then ``decode_steps`` greedy one-token steps (timed together), after
    one untimed warm-up generation. Machine load shifts over seconds; alternating makes the
    ratios of the decoders a side-by-side measurement.

    Returns:
        ``{label: {"prefill_tokens_per_s", "decode_tokens_per_s"`` (from each one's fastest
        round), ``"prefill_tokens_per_s_median", "decode_tokens_per_s_median", "prefill_ms",
        "decode_ms_per_token"`` (medians), ``"rounds", "prompt_tokens"}}``.
    """
    for dec in decoders.values():
        generate_onnx(dec, prompt_ids[:8], 2)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in decoders}
    labels = list(decoders)
    for r in range(rounds):  # the order rotated every round: no decoder always runs after one
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            g = generate_onnx(decoders[label], prompt_ids, decode_steps + 1)
            times[label].append((g.prefill_seconds, g.decode_seconds / max(decode_steps, 1)))
    out = {}
    for label, ts in times.items():
        pre, dec = sorted(t[0] for t in ts), sorted(t[1] for t in ts)
        mid = len(ts) // 2
        out[label] = {"prefill_tokens_per_s": round(len(prompt_ids) / pre[0], 2),
                      "decode_tokens_per_s": round(1 / dec[0], 2),
                      "prefill_tokens_per_s_median": round(len(prompt_ids) / pre[mid], 2),
                      "decode_tokens_per_s_median": round(1 / dec[mid], 2),
                      "prefill_ms": round(pre[mid] * 1e3, 3),
                      "decode_ms_per_token": round(dec[mid] * 1e3, 3),
                      "rounds": rounds, "prompt_tokens": len(prompt_ids)}
    return out
