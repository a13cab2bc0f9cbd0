"""The ``generate`` stage: a causal LM continues a prompt; the text and tokens/s are recorded.

Also what ``slimformer generate`` runs (:func:`generate_text`). The model is the run's model as
it stands (float, pruned or quantized, in a recipe or restored from a saved folder); the prompt
is tokenized by the model's own tokenizer (its Hugging Face folder, or ``tokenizer``), through
the tokenizer's chat template with ``chat``. Decoding uses the KV cache
(:mod:`slimformer.models.generate`). ``runtime: onnxruntime`` exports the model (float or
weight-only quantized) as a decoder graph with its cache into a temporary folder
(:func:`~slimformer.export.decoder.export_decoder`, checked against PyTorch) and generates
through ONNX Runtime (:mod:`slimformer.export.ortgen`); ``runtime: openvino`` exports the
graph in OpenVINO's form (:meth:`~slimformer.export.decoder.DecoderConfig.for_openvino`, checked
the same way) and runs it in OpenVINO (:class:`~slimformer.export.openvino.OvDecoder`, f32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from slimformer.errors import ConfigError, DataError
from slimformer.report.model import StageRecord
from slimformer.stages.context import RunContext, _Strict

MAX_NEW_TOKENS = 4096
TEMPERATURE_RANGE = (1e-3, 100.0)
MAX_PROMPT_CHARS = 100_000


class GenerateStage(_Strict):
    """Continue ``prompt`` with the model (a causal LM); greedy unless ``greedy: false``."""

    type: Literal["generate"] = "generate"
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] = 32
    greedy: bool = True
    temperature: Annotated[float, Field(ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])] = 1.0
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    chat: bool = False  # apply the tokenizer's chat template (a user turn)
    tokenizer: Annotated[str | None, Field(min_length=1, max_length=4096)] = None
    runtime: Literal["torch", "onnxruntime", "openvino"] = "torch"


def hf_model(model):
    """The Hugging Face module inside ``model`` (a quantized wrapper's own, else ``model``)."""
    from slimformer.quantize.state import QuantizedModel

    return model.model if isinstance(model, QuantizedModel) else model


def tokenizer_of(loaded, folder: str | None = None):
    """The tokenizer in ``folder``, else in the model's Hugging Face folder.

    The model's folder: an HF folder it was loaded from, or a real zoo model's built folder.

    Raises:
        DataError: No folder to read one from, or none in it.
    """
    from slimformer.data.tabular import load_tokenizer

    folder = folder or getattr(loaded, "folder", None) or (
        getattr(loaded.spec, "path", None)
        if getattr(loaded.spec, "source", None) == "hf_dir" else None)
    if folder is None:
        raise DataError("the model has no Hugging Face folder to read a tokenizer from: give "
                        "--tokenizer FOLDER (recipe: tokenizer:), a folder with tokenizer.json or "
                        "vocab files")
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
             "tokenizer.model")
    if not any((Path(folder) / n).is_file() for n in names):
        raise DataError(f"{folder} holds no tokenizer (none of {', '.join(names)}): give "
                        "--tokenizer FOLDER (recipe: tokenizer:)")
    return load_tokenizer(folder)


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    """The prompt's token ids, through the chat template with ``chat``.

    Raises:
        ConfigError: ``chat`` without a chat template, or a prompt of no tokens.
    """
    if chat:
        if not getattr(tok, "chat_template", None):
            raise ConfigError(["--chat (recipe: chat): the model's tokenizer has no chat "
                               "template; leave it out to feed the prompt as plain text"],
                              "options")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tok(prompt)["input_ids"]
    ids = [int(i) for i in ids]
    if not ids:
        raise ConfigError(["--prompt: the tokenizer made no tokens of it; give some text"],
                          "options")
    return ids


def generate_text(model, loaded, stage: GenerateStage, use_cache: bool = True):
    """``(generation, text)``: ``model`` continues ``stage.prompt`` (see module doc).

    Raises:
        ConfigError: The prompt and new tokens exceed the model's positions; ``chat`` without
            a template.
        DataError: No tokenizer.
        UnsupportedModelError: Not a causal language model.
    """
    from slimformer.models.generate import cache_argument, check_causal, generate_tokens
    from slimformer.models.loading import max_positions

    hf = hf_model(model)
    what = type(hf).__name__
    tok = tokenizer_of(loaded, stage.tokenizer)
    ids = prompt_ids(tok, stage.prompt, stage.chat)
    limit = max_positions(hf)
    if limit is not None and len(ids) + stage.max_new_tokens > limit:
        raise ConfigError([f"--max-new-tokens: the prompt's {len(ids)} tokens plus "
                           f"{stage.max_new_tokens} new ones exceed the model's {limit} "
                           f"positions; allowed: 1 to {max(limit - len(ids), 0)}"], "options")
    model.eval()
    arg = cache_argument(hf)
    check_causal(model, ids, what, arg)
    gcfg = getattr(hf, "generation_config", None)
    eos = getattr(gcfg, "eos_token_id", None)
    eos = eos if eos is not None else tok.eos_token_id
    if stage.runtime in ("onnxruntime", "openvino"):
        g = _generate_onnx(model, ids, stage, eos)
    else:
        g = generate_tokens(model, ids, stage.max_new_tokens, greedy=stage.greedy,
                            temperature=stage.temperature, seed=stage.seed, use_cache=use_cache,
                            eos_token_id=eos, what=what, cache_arg=arg)
    return g, tok.decode(g.new_ids, skip_special_tokens=True)


def _generate_onnx(model, ids: list[int], stage: GenerateStage, eos):
    """Export ``model`` as a decoder graph (temporary folder); generate in ``stage.runtime``."""
    import tempfile

    from slimformer.export.decoder import DecoderConfig, export_decoder
    from slimformer.export.openvino import OvDecoder
    from slimformer.export.ortgen import OrtDecoder, generate_onnx

    with tempfile.TemporaryDirectory(prefix="slimformer-decoder-") as folder:
        # each runtime's own form: both append to the cache in place
        cfg = DecoderConfig.for_openvino() if stage.runtime == "openvino" else DecoderConfig()
        res = export_decoder(model, Path(folder) / "decoder.onnx", cfg)
        runner = OvDecoder if stage.runtime == "openvino" else OrtDecoder
        return generate_onnx(runner(res.path), ids, stage.max_new_tokens,
                             greedy=stage.greedy, temperature=stage.temperature,
                             seed=stage.seed, eos_token_id=eos)


def run(ctx: RunContext, stage: GenerateStage) -> StageRecord:
    """Generate from the run's model; the prompt, text and tokens/s go into the report."""
    rec = StageRecord(index=0, type=stage.type, config=stage.model_dump(mode="json"))
    if ctx.progress:
        ctx.progress("generate", 0, 1)
    g, text = generate_text(ctx.model, ctx.loaded, stage)
    rec.metrics = {"text": text, "runtime": stage.runtime, "prompt_tokens": len(g.prompt_ids),
                   "new_tokens": len(g.new_ids), "stopped": g.stopped,
                   "prefill_tokens_per_s": round(g.prefill_tokens_per_s, 2),
                   "decode_tokens_per_s": round(g.decode_tokens_per_s, 2)}
    rec.notes.append(f"{stage.prompt!r} -> {text!r}")
    return rec
