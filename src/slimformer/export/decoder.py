"""Export a causal LM as one ONNX graph for prefill and decode, with its key/value cache.

``export_decoder(model, path, DecoderConfig()) -> DecoderResult``. The graph::

    inputs   input_ids (B, T) int64, attention_mask (B, P + T) int64, position_ids (B, T) int64,
             past_key_values.{i}.key / .value (B, kv_heads, P, head_dim)   for each layer i
    outputs  logits (B, T, vocab) (T = 1 with last_logits),
             present.{i}.key / .value (B, kv_heads, P + T, head_dim)

Prefill feeds the prompt with ``P = 0`` (empty past tensors); each decode step feeds one token
and the previous step's presents. Grouped-query attention is kept (``kv_heads``, not heads),
also inside: the opset-23 ``Attention`` reads the cache's kv heads without the traced copies
(:mod:`slimformer.export.gqa`). The
layer count, kv heads and head dim come from the cache the model itself returns on one forward
(:func:`cache_layout`), never from module names. The Hugging Face cache object is built inside
the traced module from the flat past tensors (:class:`DecoderEntry`).

A weight-only quantized model (:class:`~slimformer.quantize.state.QuantizedModel` with
``weight_only``) is exported as its float graph in which every quantized Linear's MatMul is
ONNX Runtime's ``com.microsoft::MatMulNBits`` holding *our* codes and scales
(:mod:`slimformer.export.nbits`). The file is written only after ONNX Runtime ran a prefill and
a decode step and every output was compared with PyTorch (SQNR and max relative error; a float
export must reach ``DecoderConfig.min_sqnr_db``, a quantized one is compared with the quantized
PyTorch model and reported), and after ``parity_steps`` greedy tokens were compared
(:mod:`slimformer.export.genparity`): a float export must give PyTorch's tokens, a quantized
one agree with the quantized PyTorch model on ``min_token_agreement`` of the steps.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimformer.errors import ConfigError, ExportError, UnsupportedModelError
from slimformer.export.config import ACCURACY_LEVELS, DECODER_ACCURACY_LEVEL
from slimformer.export.nbits import BLOCKS, INT8_BLOCK

OPSETS = (17, 18, 19, 20, 21, 22, 23)
KV_FORMS = ("ort-gqa", "fold", "gqa", "repeat")
KV_FORM_KEY = "slimformer.kv_form"  # model metadata: the form written (a fallback recorded)


@dataclass(frozen=True)
class DecoderConfig:
    """How to export a decoder.

    Attributes:
        opset: None tries 23 and falls back to 20 when ONNX Runtime cannot run the graph.
        threads: ONNX Runtime intra-op threads of the check.
        check: Run the ONNX Runtime check (prefill + one decode step) before writing.
        min_sqnr_db: A float export whose ONNX Runtime outputs reach less SQNR vs PyTorch fails.
        accuracy_level: MatMulNBits' activation precision: 0 or 1 (float32, what PyTorch
            computes), 4 (int8 in the runtime's kernel: several times faster to decode, not
            exactly what PyTorch computes; the default, see
            :data:`~slimformer.export.config.DECODER_ACCURACY_LEVEL`).
        check_tokens: Prompt length of the check's prefill.
        parity_steps: Greedy tokens compared with PyTorch after the prompt (0: none).
        quantized_parity_steps: A quantized export compares at least this many (within the
            model's positions): at 32 steps the 95% bar allows one near-tie, so which side of it
            a model lands on is close to chance; more steps measure the rate.
        min_token_agreement: A quantized export agreeing with the quantized PyTorch model on
            fewer of the steps fails (a float export must agree on all).
        int8_block: At ``accuracy_level`` 4, MatMulNBits blocks of at most this many inputs
            (larger groups split, their scales repeated): ONNX Runtime's int8 activation ranges
            are per block (:data:`~slimformer.export.nbits.INT8_BLOCK`; None: the groups').
        accuracy_fallback: At ``accuracy_level`` 4 under ``min_token_agreement``, write level 0
            instead (noted in the warnings) rather than fail.
        kv_form: How attention reads the grouped cache: ``ort-gqa`` (the default: ONNX
            Runtime's ``GroupQueryAttention``, the cache updated in place by
            :class:`~slimformer.export.ortgen.OrtDecoder`, :mod:`slimformer.export.ortgqa`;
            ONNX Runtime only; where the graph does not match, ``gqa`` instead, noted),
            ``fold`` (query heads folded onto their kv head: plain attention, every runtime),
            ``gqa`` (the opset-23 op's own grouped attention: ONNX Runtime only, OpenVINO
            2026.4 misreads it) or ``repeat`` (the traced copies of the kv heads kept:
            OpenVINO's form, whose CPU plugin runs each layer's attention as one kernel with
            the cache appended in place, :class:`~slimformer.export.openvino.OvDecoder`);
            :mod:`slimformer.export.gqa`. The form written is the file's metadata
            :data:`KV_FORM_KEY`.
        last_logits: Output ``logits`` ``(B, 1, vocab)`` of the last position only (the model's
            ``logits_to_keep``): generation needs no more; perplexity needs the default.
        merge_matmuls: Merge the MatMulNBits ops that read one input (Q/K/V, gate/up) into one
            op + ``Split`` (:mod:`slimformer.export.fusenbits`; ONNX Runtime's form). OpenVINO
            fuses each projection with its activation instead: its form keeps them apart.
    """

    opset: int | None = None
    threads: int = 2
    check: bool = True
    min_sqnr_db: float = 60.0
    accuracy_level: int = DECODER_ACCURACY_LEVEL
    int8_block: int | None = INT8_BLOCK
    check_tokens: int = 8
    parity_steps: int = 32
    quantized_parity_steps: int = 128
    min_token_agreement: float = 0.95
    accuracy_fallback: bool = True
    kv_form: str = "ort-gqa"
    last_logits: bool = False
    merge_matmuls: bool = True

    @classmethod
    def for_openvino(cls, **fields) -> DecoderConfig:
        """The form OpenVINO runs fastest (:class:`~slimformer.export.openvino.OvDecoder`).

        ``kv_form`` ``repeat`` (its CPU plugin's attention with the cache appended in place),
        MatMulNBits not merged (each projection fused with its activation) and at accuracy
        level 0 (OpenVINO picks its own activation precision; level 4's split blocks would only
        multiply the scales); ``fields`` override.
        """
        return cls(**{"kv_form": "repeat", "merge_matmuls": False, "accuracy_level": 0,
                      **fields})

    def __post_init__(self):
        """Validate the fields (ConfigError naming the allowed values)."""
        bad = []
        if self.opset is not None and self.opset not in OPSETS:
            bad.append(f"opset: {self.opset}; allowed: {', '.join(map(str, OPSETS))} or None")
        if self.accuracy_level not in ACCURACY_LEVELS:
            bad.append(f"accuracy_level: {self.accuracy_level}; allowed: "
                       f"{', '.join(map(str, ACCURACY_LEVELS))}")
        if self.int8_block is not None and self.int8_block not in BLOCKS:
            bad.append(f"int8_block: {self.int8_block}; allowed: "
                       f"{', '.join(map(str, BLOCKS))} or None")
        if self.kv_form not in KV_FORMS:
            bad.append(f"kv_form: {self.kv_form!r}; allowed: {', '.join(KV_FORMS)}")
        if not 1 <= self.threads <= 256:
            bad.append(f"threads: {self.threads}; allowed: 1 to 256")
        if not 1 <= self.check_tokens <= 4096:
            bad.append(f"check_tokens: {self.check_tokens}; allowed: 1 to 4096")
        if not 0 <= self.parity_steps <= 4096:
            bad.append(f"parity_steps: {self.parity_steps}; allowed: 0 to 4096")
        if not 0 <= self.quantized_parity_steps <= 4096:
            bad.append(f"quantized_parity_steps: {self.quantized_parity_steps}; allowed: 0 to "
                       "4096")
        if not 0.0 <= self.min_token_agreement <= 1.0:
            bad.append(f"min_token_agreement: {self.min_token_agreement}; allowed: 0 to 1")
        if bad:
            raise ConfigError(bad, "decoder export")


@dataclass(frozen=True)
class CacheLayout:
    """The key/value cache of a causal LM, as its own forward returns it."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int

    def past_names(self) -> list[str]:
        """``past_key_values.{i}.key``, ``past_key_values.{i}.value`` for each layer."""
        return [f"past_key_values.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]

    def input_names(self) -> list[str]:
        """Every graph input, in order."""
        return ["input_ids", "attention_mask", "position_ids", *self.past_names()]

    def output_names(self) -> list[str]:
        """``logits`` and ``present.{i}.key`` / ``.value``."""
        return ["logits", *(f"present.{i}.{k}" for i in range(self.layers)
                            for k in ("key", "value"))]

    def empty(self, batch: int, length: int = 0) -> list[torch.Tensor]:
        """Past tensors ``(batch, kv_heads, length, head_dim)`` of zeros, one per graph input."""
        return [torch.zeros(batch, self.kv_heads, length, self.head_dim)
                for _ in range(2 * self.layers)]


@dataclass
class DecoderResult:
    """A written decoder graph and what was checked about it."""

    path: Path
    opset: int
    layout: CacheLayout
    quantized: bool
    size_bytes: int
    seconds: float = 0.0
    parity: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    nbits: dict = field(default_factory=dict)  # MatMulNBits replacements (nbits.NbitsStats)
    tokens: dict = field(default_factory=dict)  # greedy-token parity (genparity.TokenParity)
    accuracy_level: int | None = None  # MatMulNBits' level written (None: float)
    kv_unrepeated: int = 0  # Attention ops fed the cache's kv heads directly (export.gqa)
    ort_gqa: int = 0  # layers as GroupQueryAttention with the cache in place (export.ortgqa)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-ready summary for reports."""
        return {"path": str(self.path), "opset": self.opset, "layout": asdict(self.layout),
                "quantized": self.quantized, "size_bytes": self.size_bytes,
                "seconds": round(self.seconds, 2), "parity": self.parity, "nbits": self.nbits,
                "tokens": self.tokens, "accuracy_level": self.accuracy_level,
                "kv_unrepeated": self.kv_unrepeated, "ort_gqa": self.ort_gqa,
                "warnings": self.warnings}


def inner(model: nn.Module) -> nn.Module:
    """The Hugging Face module of ``model`` (a quantized wrapper's own, else ``model``)."""
    from slimformer.quantize.state import QuantizedModel

    return model.model if isinstance(model, QuantizedModel) else model


def cache_pairs(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(key, value)]`` per layer of a Hugging Face cache object or legacy tuple."""
    if hasattr(cache, "layers"):
        return [(getattr(lay, "keys", None), getattr(lay, "values", None)) for lay in cache.layers]
    if hasattr(cache, "to_legacy_cache"):
        cache = cache.to_legacy_cache()
    return [(kv[0], kv[1]) for kv in cache]


def make_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]], config):
    """A Hugging Face ``DynamicCache`` holding ``pairs`` (``[(key, value)]`` per layer)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(ddp_cache_data=pairs, config=config)
    except TypeError:  # older transformers
        return DynamicCache.from_legacy_cache(tuple(pairs))


@torch.no_grad()
def cache_layout(model: nn.Module) -> CacheLayout:
    """Layers, kv heads and head dim read from the cache one forward of ``model`` returns.

    Raises:
        UnsupportedModelError: No cache, or layers whose caches differ in shape or are not plain
            key/value tensors (sliding windows, state-space layers).
    """
    import inspect

    from slimformer.models.generate import cache_argument

    hf = inner(model)
    params = inspect.signature(hf.forward).parameters
    if getattr(getattr(hf, "config", None), "is_encoder_decoder", False) or \
            "decoder_input_ids" in params:
        raise UnsupportedModelError(
            f"{type(hf).__name__} is an encoder-decoder model: the decoder export writes causal "
            "LMs (one graph, its own key/value cache). Not written for encoder-decoders: an "
            "encoder graph, and a decoder graph taking the encoder's output with a self-"
            "attention cache and a cross-attention cache; export it as the full-sequence graph "
            "(graph: full) instead")
    ids = torch.tensor([[1, 2, 3]])
    try:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    except (TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise UnsupportedModelError(
            f"{type(hf).__name__} does not run as a causal LM (input_ids, attention_mask, "
            f"use_cache=True): {type(exc).__name__}: {str(exc)[:200]}") from exc
    cache = getattr(out, "cache", None) if cache_argument(hf) == "cache" else None
    cache = cache if cache is not None else getattr(out, "past_key_values", None)
    logits = getattr(out, "logits", None)
    if cache is None or not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise UnsupportedModelError(f"{type(hf).__name__} returns no logits (B, T, vocab) and "
                                    "key/value cache: the decoder export needs a causal LM")
    layers = getattr(cache, "layers", [])
    if any(getattr(lay, "is_sliding", False) for lay in layers):
        raise UnsupportedModelError(f"{type(hf).__name__} has sliding-window cache layers; the "
                                    "decoder export supports full key/value caches only")
    pairs = cache_pairs(cache)
    shapes = {(tuple(k.shape), tuple(v.shape)) if isinstance(k, torch.Tensor) and
              isinstance(v, torch.Tensor) else None for k, v in pairs}
    if not pairs or None in shapes or len(shapes) != 1:
        raise UnsupportedModelError(f"{type(hf).__name__}'s cache layers are not key/value "
                                    f"tensors of one shape (found {sorted(map(str, shapes))}); "
                                    "the decoder export needs (batch, kv_heads, tokens, head_dim)")
    (k_shape, v_shape), = shapes
    if len(k_shape) != 4 or k_shape != v_shape or k_shape[2] != ids.shape[1]:
        raise UnsupportedModelError(f"{type(hf).__name__}'s cached keys {list(k_shape)} / "
                                    f"values {list(v_shape)} are not (batch, kv_heads, 3, "
                                    "head_dim) after 3 tokens")
    return CacheLayout(len(pairs), k_shape[1], k_shape[3], logits.shape[-1])


class DecoderEntry(nn.Module):
    """``forward(input_ids, attention_mask, position_ids, *past) -> (logits, *presents)``.

    Flat tensors in and out (the exporter's view); the cache object is built inside.
    """

    def __init__(self, model: nn.Module, layout: CacheLayout, last_logits: bool = False):
        super().__init__()
        import inspect

        from slimformer.models.generate import cache_argument

        hf = inner(model)
        if last_logits and "logits_to_keep" not in inspect.signature(hf.forward).parameters:
            raise UnsupportedModelError(f"{type(hf).__name__}.forward takes no logits_to_keep: "
                                        "export it with last_logits=False (all positions)")
        self.model, self.layout = model, layout
        self.keep = {"logits_to_keep": 1} if last_logits else {}
        self.hf_config = getattr(inner(model), "config", None)
        self.cache_arg = cache_argument(inner(model))

    def forward(self, *args):
        """Run one step; see the module doc for the shapes."""
        input_ids, attention_mask, position_ids, *past = args
        cache = make_cache([(past[2 * i], past[2 * i + 1]) for i in range(self.layout.layers)],
                           self.hf_config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True, **{self.cache_arg: cache},
                         **self.keep)
        new = getattr(out, "cache", None) if self.cache_arg == "cache" else None
        new = new if new is not None else out.past_key_values
        return (out.logits, *(t for kv in cache_pairs(new) for t in kv))


def export_decoder(model: nn.Module, path: str | Path, config: DecoderConfig | None = None,
                   prompt_ids: list[int] | None = None) -> DecoderResult:
    """Write ``model`` (a causal LM, float or weight-only quantized) as a decoder graph.

    ``prompt_ids``: the prompt of the greedy-token parity (default: ``check_tokens`` seeded
    random ids); with ``parity_steps`` it must fit the model's positions.

    Raises:
        ExportError: Bad path, a quantization without an ONNX Runtime form, an export or
            ONNX Runtime failure, or a float export that differs from PyTorch.
        UnsupportedModelError: Not a causal LM with a plain key/value cache.
    """
    from slimformer.export.onnx import _first_line
    from slimformer.quantize.state import QuantizedModel

    config = config or DecoderConfig()
    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"{path}: the output file must end in .onnx")
    if not path.parent.is_dir():
        raise ExportError(f"{path}: folder {path.parent} does not exist (create it first)")
    quantized = isinstance(model, QuantizedModel)
    if quantized and not getattr(model.quant, "weight_only", False):
        raise ExportError("the decoder export takes a float or a weight-only quantized model "
                          "(MatMulNBits); a model with quantized activations has no decoder "
                          "form here: export it with `export onnx` (full sequences, QDQ)")
    if quantized:
        from slimformer.export.nbits import check_supported

        check_supported(model)
    model.eval()
    t0 = time.perf_counter()
    layout = cache_layout(model)
    opsets = [config.opset] if config.opset is not None else [23, 20]
    notes: list[str] = []
    for i, opset in enumerate(opsets):
        try:
            result = _export_once(model, path, layout, opset, config, notes, prompt_ids)
            break
        except (ExportError, UnsupportedModelError):
            if i + 1 == len(opsets):
                raise
        except Exception as exc:  # noqa: BLE001 - the exporter and ONNX Runtime raise many types
            if i + 1 == len(opsets):
                raise ExportError(f"exporting the decoder failed at opset {opset} "
                                  f"({type(exc).__name__}: {_first_line(exc)})") from exc
            notes.append(f"opset {opset} failed ({type(exc).__name__}: {_first_line(exc)}): "
                         f"exported at opset {opsets[i + 1]}")
    result.seconds = time.perf_counter() - t0
    return result


def _export_once(model, path: Path, layout: CacheLayout, opset: int, config: DecoderConfig,
                 notes: list[str], prompt_ids: list[int] | None) -> DecoderResult:
    import onnx

    from slimformer.export.genparity import check_decoder, step_inputs
    from slimformer.export.gqa import unrepeat_kv
    from slimformer.export.onnx import TWO_GB, _file_bytes, _move_external, _param_bytes
    from slimformer.store.atomic import atomic_path

    quantized = inner(model) is not model
    # traced on the float module; a quantized model's Linears are rewritten afterwards
    entry = DecoderEntry(inner(model), layout, config.last_logits).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, layout.vocab, (2, 3), generator=g)
    args = tuple(step_inputs(ids, [torch.randn(2, layout.kv_heads, 4, layout.head_dim,
                                               generator=g) for _ in range(2 * layout.layers)]))
    big = _param_bytes(entry) > TWO_GB
    with atomic_path(path) as tmp:
        try:
            _trace(entry, args, layout, tmp, opset, big)
            traced = onnx.load(str(tmp))
            form = "gqa" if config.kv_form == "ort-gqa" else config.kv_form
            result = DecoderResult(path=path, opset=opset, layout=layout, quantized=quantized,
                                   size_bytes=0, kv_unrepeated=0 if form == "repeat"
                                   else unrepeat_kv(traced, form), warnings=notes)
            if config.kv_form == "ort-gqa":
                result.ort_gqa = _ort_gqa(traced, inner(model), notes)
            written = ("ort-gqa" if result.ort_gqa else
                       form if form == "repeat" or result.kv_unrepeated else "repeat")
            onnx.helper.set_model_props(traced, {**{m.key: m.value
                                                    for m in traced.metadata_props},
                                                 KV_FORM_KEY: written})
            levels = [config.accuracy_level] if quantized else [None]
            if quantized and config.accuracy_level == 4 and config.accuracy_fallback:
                levels.append(0)
            for j, level in enumerate(levels):
                proto = traced
                if j + 1 < len(levels):  # a retry rewrites the traced graph afresh
                    proto = onnx.ModelProto()
                    proto.CopyFrom(traced)
                if quantized:
                    from slimformer.export.nbits import to_matmul_nbits

                    result.nbits = to_matmul_nbits(proto, model, level, config.int8_block,
                                                   config.merge_matmuls).as_dict()
                    result.accuracy_level = level
                _save(proto, tmp, big)
                if not config.check:
                    break
                onnx.checker.check_model(str(tmp) if big else proto)
                result.parity = check_decoder(tmp, DecoderEntry(model, layout,
                                                              config.last_logits).eval(),
                                              layout, config)
                _judge(result, config)
                why = _tokens(result, model, tmp, layout, config, prompt_ids) \
                    if config.parity_steps else None
                if why is None:
                    break
                if j + 1 == len(levels):
                    raise ExportError(why)
                notes.append(f"accuracy_level {level}: {why}; written at accuracy_level "
                             f"{levels[j + 1]} instead (float activations, as PyTorch)")
            result.size_bytes = _file_bytes(tmp)
            if big:
                _move_external(tmp, path)
        except BaseException:
            for f in tmp.parent.glob(tmp.name + ".*"):
                f.unlink(missing_ok=True)
            raise
    return result


def _ort_gqa(proto, hf: nn.Module, notes: list[str]) -> int:
    """:func:`~slimformer.export.ortgqa.to_ort_gqa` on ``proto``, a note where it does not apply."""
    from slimformer.export.ortgqa import to_ort_gqa

    window = getattr(getattr(hf, "config", None), "sliding_window", None)
    if isinstance(window, int) and window > 0 and \
            getattr(hf.config, "use_sliding_window", True) is not False:
        notes.append(f"kv_form ort-gqa: the model's sliding window ({window}) is not carried "
                     "over: written as kv_form gqa (the cache concatenated every step)")
        return 0
    done, why = to_ort_gqa(proto)
    if why:
        notes.append(f"kv_form ort-gqa: {why}; " + (
            "the cache is not updated in place" if done else
            "written as kv_form gqa (the cache concatenated every step)"))
    return done


def _trace(entry, args, layout: CacheLayout, tmp: Path, opset: int, big: bool) -> None:
    """``torch.onnx.export(dynamo=True)`` with symbolic batch, sequence and past axes."""
    from torch.export import Dim

    from slimformer.export.onnx import _quiet_logs

    batch, seq, past, total = (Dim(n) for n in ("batch", "sequence", "past_sequence",
                                                "total_sequence"))
    shapes = (({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
               *[{0: batch, 2: past}] * (2 * layout.layers)),)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_logs():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(entry, args, dynamo=True, dynamic_shapes=shapes,
                                 input_names=layout.input_names(),
                                 output_names=layout.output_names(), opset_version=opset,
                                 external_data=big, optimize=True, verbose=False)
    if prog is None:
        raise ExportError("torch.onnx.export returned nothing")
    prog.save(str(tmp), external_data=big)


def _save(proto, tmp: Path, big: bool) -> None:
    """Re-save ``proto`` at ``tmp`` without per-node debug metadata."""
    import onnx

    for n in proto.graph.node:  # the exporter's source stack traces
        del n.metadata_props[:]
        n.doc_string = ""
    if big:
        onnx.save(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=tmp.name + ".data")
    else:
        onnx.save(proto, str(tmp))


def _judge(result: DecoderResult, config: DecoderConfig) -> None:
    """ExportError when a float export's output falls under ``min_sqnr_db``."""
    if result.quantized:
        return
    worst = min(((step, name, m) for step, outs in result.parity.items()
                 for name, m in outs.items()), key=lambda x: x[2]["sqnr_db"])
    if worst[2]["sqnr_db"] < config.min_sqnr_db:
        raise ExportError(f"ONNX Runtime differs from PyTorch at the {worst[0]} step on "
                          f"{worst[1]} (SQNR {worst[2]['sqnr_db']:.1f} dB); a float decoder "
                          f"export must reach {config.min_sqnr_db} dB on every output")


def _tokens(result: DecoderResult, model, tmp: Path, layout: CacheLayout, config: DecoderConfig,
            prompt_ids: list[int] | None) -> str | None:
    """Greedy-token parity into ``result.tokens``; what is wrong when under the config's bar."""
    from slimformer.export.genparity import token_parity
    from slimformer.export.ortgen import OrtDecoder
    from slimformer.models.loading import max_positions

    prompt = prompt_ids or torch.randint(0, layout.vocab, (config.check_tokens,),
                                         generator=torch.Generator().manual_seed(2)).tolist()
    steps = config.parity_steps
    if result.quantized and config.quantized_parity_steps > steps:
        limit = max_positions(inner(model))
        room = config.quantized_parity_steps if limit is None else limit - len(prompt) - 1
        steps = max(steps, min(config.quantized_parity_steps, room))
    tp = token_parity(model, OrtDecoder(tmp, config.threads), prompt, steps)
    result.tokens = tp.as_dict()
    need = 1.0 if not result.quantized else config.min_token_agreement
    if tp.agreement >= need:
        return None
    what = ("the float export must give PyTorch's greedy tokens" if not result.quantized
            else f"a quantized export must agree on {need:.0%} (min_token_agreement)")
    level = result.accuracy_level
    hint = ("" if level in (None, 0, 1) else
            f"; accuracy_level {level} runs int8 activations: 0 computes what PyTorch does")
    return (f"ONNX Runtime's greedy tokens differ from the "
            f"{'quantized ' if result.quantized else ''}PyTorch model's: "
            f"{tp.agreement:.1%} of {tp.steps} steps agree (first difference at step "
            f"{tp.first_difference}, the PyTorch top-2 logit gap there {tp.min_margin}); "
            f"{what}{hint}")
