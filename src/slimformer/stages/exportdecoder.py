"""The export stage for causal LMs: the KV-cache decoder graph, token parity, tokens/s.

A causal LM (task ``causal-lm``), float or weight-only quantized, is written as one decoder
graph for prefill and decode (:func:`~slimformer.export.decoder.export_decoder`; MatMulNBits
with our codes when quantized). The export itself checks every output of a prefill and a decode
step and the greedy tokens against the PyTorch model (the float model's tokens equal for
``decode_tokens`` steps; the quantized model's on ``min_token_agreement`` of them). With
``tokens_per_s`` the file's prefill (a ``prompt_tokens`` prompt) and decode tokens/s at batch 1
are timed in ONNX Runtime beside the float model's decoder graph (``compare_float``), the two
alternating every round (:func:`~slimformer.export.ortgen.time_decoders`). The prompt is the
evaluation rows' tokens, concatenated; seeded random tokens fill it where they run short.

Target ``openvino`` (or ``openvino_ir``) writes the graph in OpenVINO's
form (:meth:`~slimformer.export.decoder.DecoderConfig.for_openvino`), checked in ONNX Runtime
as above and by its greedy tokens in OpenVINO (f32); ``openvino_ir`` adds the stateful IR
``export/model.{xml,bin}`` (:func:`~slimformer.export.openvino.write_decoder_ir`: the cache kept
inside, our int4/int8 codes kept); tokens/s are then timed in OpenVINO, beside the float model
in the same form.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from slimformer.report.model import StageRecord
from slimformer.stages.context import RunContext

FULL_ONLY = ("tensorrt", "portable")  # targets whose forms are full-sequence QDQ


def wants_decoder(ctx: RunContext, stage) -> tuple[bool, str | None]:
    """``(decoder?, note)``: whether ``stage`` writes the decoder graph, and why not if not."""
    from slimformer.quantize.state import QuantizedModel

    if stage.graph == "full":
        return False, None
    if stage.graph == "decoder":
        return True, None
    if getattr(ctx.loaded, "task", None) == "seq2seq-lm":
        return False, ("an encoder-decoder model: the full-sequence graph, without a key/value "
                       "cache (the decoder graph is written for causal LMs; an encoder graph "
                       "and a decoder graph with self- and cross-attention caches are not)")
    if getattr(ctx.loaded, "task", None) != "causal-lm":
        return False, None
    m = ctx.model
    if isinstance(m, QuantizedModel) and not getattr(m.quant, "weight_only", False):
        return False, ("a causal LM with quantized activations is exported as the full-sequence "
                       "QDQ graph (no key/value cache): the decoder graph takes float or "
                       "weight-only models")
    if stage.target in FULL_ONLY or stage.tensorrt is not None:
        return False, (f"target {stage.target}: the full-sequence graph (the decoder graph is "
                       "written for ONNX Runtime and OpenVINO: target auto, ort-cpu or "
                       "openvino)")
    return True, None


def prompt_of(ctx: RunContext, tokens: int, room: int | None) -> tuple[list[int], str | None]:
    """``(ids, note)``: ``tokens`` prompt ids (at most ``room``) from the evaluation rows."""
    want = tokens if room is None else max(1, min(tokens, room))
    ids: list[int] = []
    data = ctx.eval_data
    if data is not None and "input_ids" in data.inputs:
        x, mask = data.inputs["input_ids"], data.inputs.get("attention_mask")
        for i in range(x.shape[0]):
            row = x[i][mask[i].bool()] if mask is not None else x[i]
            ids += row.tolist()
            if len(ids) >= want:
                break
    note = None
    if len(ids) < want:
        vocab = int(getattr(getattr(ctx.loaded.module, "config", None), "vocab_size", 0) or
                    (max(ids) + 1 if ids else 2))
        fill = torch.randint(0, vocab, (want - len(ids),),
                             generator=torch.Generator().manual_seed(0)).tolist()
        note = (f"the prompt of the token parity and timing: {len(ids)} tokens of the evaluation "
                f"rows and {len(fill)} seeded random ones")
        ids += fill
    if want < tokens:
        note = (note + "; " if note else "") + (f"prompt of {want} tokens, not {tokens}: the "
                                                "model's positions hold no more beside the "
                                                "decoded ones")
    return ids[:want], note


def decoder_into(ctx: RunContext, stage, tmp: Path) -> StageRecord:
    """Write ``tmp/model.onnx`` as the decoder graph; parity and tokens/s (see module doc)."""
    from slimformer.export.config import DECODER_ACCURACY_LEVEL
    from slimformer.export.decoder import export_decoder
    from slimformer.models.loading import max_positions
    from slimformer.stages.generate import hf_model

    tick = ctx.progress or (lambda *a: None)
    limit = max_positions(hf_model(ctx.model))
    prompt, note = prompt_of(ctx, stage.prompt_tokens,
                             None if limit is None else limit - stage.decode_tokens - 1)
    ov = openvino_form(stage)
    level = {} if ov else {"accuracy_level": DECODER_ACCURACY_LEVEL if stage.accuracy_level
                           is None else stage.accuracy_level}  # OpenVINO's form: level 0
    cfg = decoder_config(stage, check=stage.check,
                         parity_steps=stage.decode_tokens if stage.check else 0,
                         min_token_agreement=stage.min_token_agreement, **level)
    tick("export: decoder graph (checked in ONNX Runtime)", 0, 1)
    res = export_decoder(ctx.model, tmp / "model.onnx", cfg, prompt)
    tick("export: decoder graph (checked in ONNX Runtime)", 1, 1)
    rec = StageRecord(index=0, type=stage.type, config=stage.model_dump(mode="json"),
                      result=res.summary() | {"path": f"{tmp.name}/model.onnx",
                                              "graph": "decoder"})
    rec.metrics = {"graph": "decoder", "opset": res.opset, "quantized": res.quantized,
                   "file_bytes": res.size_bytes, "export_seconds": round(res.seconds, 2),
                   "accuracy_level": res.accuracy_level,
                   **{f"parity_{k}_min_sqnr_db": min(m["sqnr_db"] for m in v.values())
                      for k, v in res.parity.items()}}
    if res.tokens:
        rec.metrics |= {"token_agreement": res.tokens["agreement"],
                        "token_steps": res.tokens["steps"],
                        "first_token_difference": res.tokens["first_difference"]}
    rec.size = {"bytes": res.size_bytes}
    rec.notes += [n for n in (note,) if n] + list(res.warnings)
    if res.nbits:
        rec.notes.append(f"weight-only: {res.nbits['replaced']} Linears as MatMulNBits "
                         f"(accuracy_level {res.accuracy_level}): {res.nbits['by_form']}")
    if stage.evaluate:
        rec.notes.append("the decoder graph is judged by its greedy tokens against PyTorch "
                         "(token_agreement), not by evaluation rows in ONNX Runtime")
    ov_file = _openvino(ctx, stage, rec, tmp, res.quantized, prompt, tick) if ov else None
    if stage.tokens_per_s:
        _time(ctx, stage, rec, ov_file or tmp / "model.onnx", res.quantized, prompt, tick)
    return rec


def openvino_form(stage) -> bool:
    """Whether ``stage`` writes the decoder graph in OpenVINO's form (target or IR)."""
    return stage.target == "openvino" or stage.openvino_ir


def decoder_config(stage, **fields):
    """The stage's :class:`~slimformer.export.decoder.DecoderConfig`, ``fields`` on top.

    Its runtime's form (:func:`openvino_form`), its opset and threads.
    """
    from slimformer.export.decoder import DecoderConfig

    fields = {"opset": stage.opset, "threads": stage.threads, **fields}
    return DecoderConfig.for_openvino(**fields) if openvino_form(stage) else \
        DecoderConfig(**fields)


def _openvino(ctx: RunContext, stage, rec: StageRecord, tmp: Path, quantized: bool,
              prompt: list[int], tick) -> Path:
    """The stateful IR (``openvino_ir``) and OpenVINO's greedy tokens; returns the file run.

    OpenVINO runs the file with its defaults (int4 / int8 weights: int8 activations per group
    of 32), so the greedy tokens are judged as the ONNX check judges them, on as many steps.

    Raises:
        ExportError: OpenVINO's greedy tokens agree with the PyTorch model's on fewer steps
            than the ONNX check asks (a float model: on all of them).
    """
    from slimformer.errors import ExportError
    from slimformer.export.genparity import token_parity
    from slimformer.export.openvino import OvDecoder, write_decoder_ir

    path = tmp / "model.onnx"
    if stage.openvino_ir:
        tick("export: stateful OpenVINO IR", 0, 1)
        path = write_decoder_ir(path, tmp / "model.xml")
        rec.result["openvino_ir"] = f"{tmp.name}/model.xml"
        rec.metrics["openvino_ir_bytes"] = path.stat().st_size + \
            path.with_suffix(".bin").stat().st_size
        tick("export: stateful OpenVINO IR", 1, 1)
    if stage.check:
        tick("export: greedy tokens in OpenVINO", 0, 1)
        steps = rec.metrics.get("token_steps", stage.decode_tokens)  # as the ONNX check's
        tp = token_parity(ctx.model, OvDecoder(path, stage.threads), prompt, steps)
        rec.metrics["openvino_token_agreement"] = tp.agreement
        if quantized:  # the difference from what quantize measured, reported
            rec.notes.append(f"OpenVINO runs the int4/int8 weights with its default int8 "
                             f"activations (dynamic, per group): greedy tokens agree with the "
                             f"quantized PyTorch model on {tp.agreement:.1%} of {tp.steps} steps")
        need = stage.min_token_agreement if quantized else 1.0
        if tp.agreement < need:
            raise ExportError(f"OpenVINO ({path.name}, f32): greedy tokens agree with the "
                              f"PyTorch model on {tp.agreement:.0%} of {tp.steps} steps, under "
                              f"{need:.0%} (first difference at step {tp.first_difference})")
        tick("export: greedy tokens in OpenVINO", 1, 1)
    return path


def _time(ctx: RunContext, stage, rec: StageRecord, path: Path, quantized: bool,
          prompt: list[int], tick) -> None:
    """Prefill / decode tokens/s of ``path`` beside the float decoder graph, interleaved.

    In OpenVINO for its form (:func:`openvino_form`), else in ONNX Runtime; the float graph is
    exported in the same form.
    """
    from slimformer.export.decoder import export_decoder
    from slimformer.export.openvino import OvDecoder
    from slimformer.export.ortgen import OrtDecoder, time_decoders
    from slimformer.store.outdir import scratch_root

    runtime, runner = (("openvino", OvDecoder) if openvino_form(stage)
                       else ("onnxruntime", OrtDecoder))
    with tempfile.TemporaryDirectory(prefix="float-decoder-", dir=scratch_root()) as folder:
        files = {runtime: path}
        if quantized and stage.compare_float:
            tick("export: float decoder graph (the baseline)", 0, 1)
            base = export_decoder(ctx.loaded.module, Path(folder) / "float.onnx",
                                  decoder_config(stage, check=False))
            files[f"{runtime} float"] = base.path
            rec.metrics["float_file_bytes"] = base.size_bytes
            rec.metrics["size_ratio"] = round(base.size_bytes / rec.size["bytes"], 3)
            tick("export: float decoder graph (the baseline)", 1, 1)
        tick(f"export: tokens/s in {runtime}", 0, 1)
        timed = time_decoders({k: runner(p, stage.threads) for k, p in files.items()},
                              prompt, stage.decode_tokens, stage.timing_rounds)
        tick(f"export: tokens/s in {runtime}", 1, 1)
    for key, t in timed.items():
        pre = "float_" if key.endswith(" float") else ""
        rec.metrics |= {f"{pre}{k}": v for k, v in t.items() if "tokens_per_s" in k}
        runtime, _, fl = key.partition(" ")
        rec.latency[f"{runtime} prefill {fl + ' ' if fl else ''}batch=1"] = {
            "median_ms": t["prefill_ms"], "prompt_tokens": t["prompt_tokens"]}
        rec.latency[f"{runtime} decode {fl + ' ' if fl else ''}batch=1"] = {
            "median_ms": t["decode_ms_per_token"]}
    if f"{runtime} float" in timed:
        q, f = timed[runtime], timed[f"{runtime} float"]
        for k in ("prefill", "decode"):
            rec.metrics[f"{k}_speedup"] = round(q[f"{k}_tokens_per_s"] /
                                                f[f"{k}_tokens_per_s"], 3)
            rec.metrics[f"{k}_speedup_median"] = round(q[f"{k}_tokens_per_s_median"] /
                                                       f[f"{k}_tokens_per_s_median"], 3)
    rec.notes.append(f"tokens/s at batch 1, {stage.threads} threads: prefill of "
                     f"{len(prompt)} tokens, {stage.decode_tokens} decode steps, "
                     f"{stage.timing_rounds} rounds alternating the files (fastest round; "
                     "*_median: the median round)")
