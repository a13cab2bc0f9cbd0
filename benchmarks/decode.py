"""Causal-LM deployment side by side: perplexity, prefill and decode tokens/s, size, memory.

One KV-cache decoder graph per row (:func:`slimformer.export.decoder.export_decoder`), every row
run the way it generates (a prefill, then one-token steps on its own cache):

- ``ort float``: our float decoder graph in ONNX Runtime (the baseline of every ratio), in the
  export's default form for ONNX Runtime (``GroupQueryAttention``, the cache updated in place:
  :mod:`slimformer.export.ortgqa`);
- ``ort int4 ours``: our weight-only INT4 (``--method``, default GPTQ, ``--group-size``) as
  ``MatMulNBits`` holding our codes, at the export's default accuracy level (4: int8
  activations in blocks of 32) and at level 0 (float activations, what PyTorch computes);
  ``+ emb int8``: the same with the embedding table quantized too (``embedding_bits`` 8, per
  row: ``GatherBlockQuantized``); ``ours-e8-norot``: that one without the residual rotation
  (``rotate: off``; on by default at 4 bits); ``--variants`` picks which are built;
- ``ort int4 MatMulNBitsQuantizer``: ONNX Runtime's own INT4 tool on the float graph (same group
  size, asymmetric, accuracy level 4), its default round-to-nearest;
- ``ov f32`` / ``ov bf16``: the float graph in OpenVINO's form
  (:meth:`slimformer.export.decoder.DecoderConfig.for_openvino`) compiled by OpenVINO, stateful
  (the cache kept inside the infer request, attention fused with it:
  :class:`slimformer.export.openvino.OvDecoder`); ``ov int4 ours``: our INT4 codes in that form
  (MatMulNBits with the groups' own blocks, not merged) read by OpenVINO; ``ov int4 nncf gN``:
  NNCF ``compress_weights`` INT4_ASYM (data-free, ``ratio`` 1) of the same float graph read by
  OpenVINO (groups of 64: NNCF refuses 128 where a Linear has 576 inputs). Both INT4 rows run
  with the plugin's defaults (its dynamic int8 quantization of the activations included).

Perplexity: ``--tokens`` held-out tokens (nyt-editorials test) in windows of ``--window``, each
window one prefill of the graph (teacher-forced logits). Speed: a ``--prompt``-token prompt's
prefill and ``--steps`` greedy decode steps at batch 1, 2 threads, every row alternating in
each of ``--rounds`` rounds (:func:`slimformer.export.ortgen.time_decoders`); ratios of the
medians (best round in brackets) vs ``ort float``. Memory: resident memory added by loading the
row and running its first prefill (RSS of this process before and after).

    .venv/bin/python benchmarks/decode.py --work /tmp/decode --out /tmp/decode.md
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from pathlib import Path

import numpy as np
import torch


def rss_gb() -> float:
    """Resident memory of this process now (GB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e9


def cpu_name() -> str:
    """The CPU model and its vector extensions."""
    info = Path("/proc/cpuinfo").read_text()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                 if ln.startswith("model name")), "unknown CPU")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                      if ln.startswith("flags")), []))
    isa = [f for f in ("avx512_vnni", "avx512_bf16", "amx_tile", "avx2") if f in flags]
    return f"{name} ({', '.join(isa)})"


def perplexity(dec, tokens: list[int], window: int) -> float:
    """exp(mean NLL) of ``tokens`` in windows of ``window``, one prefill each."""
    nll, n = 0.0, 0
    for s in range(0, len(tokens) - 1, window):
        ids = np.asarray([tokens[s:s + window]], np.int64)
        if ids.shape[1] < 2:
            break
        logits, _ = dec.step(ids, dec.empty(1))
        lg = torch.from_numpy(np.ascontiguousarray(logits[0, :-1])).float()
        nll += float(torch.nn.functional.cross_entropy(lg, torch.from_numpy(ids[0, 1:]),
                                                       reduction="sum"))
        n += ids.shape[1] - 1
    return math.exp(nll / n)


# QuantConfig fields of each of our builds (beside weight-only INT4 and the calibration rows)
VARIANTS = {"ours": {}, "ours-e8": {"embedding_bits": 8},
            "ours-e8-norot": {"embedding_bits": 8, "rotate": "off"}}


def build(args, work: Path) -> dict[str, Path]:
    """Every row's file, built once into ``work`` (kept between runs)."""
    from slimformer.data.datasets import get_dataset
    from slimformer.export.decoder import DecoderConfig, export_decoder
    from slimformer.models.loading import load_model, parse_model_arg
    from slimformer.models.pretrained.install import model_dir

    files = {"float": work / "float.onnx", "float-ov": work / "float-ov.onnx",
             "ort-int4": work / "ort-int4.onnx",
             "nncf-int4": work / f"nncf-int4-g{args.nncf_group}.xml"}
    for v in args.variants:
        files |= {v: work / f"{v}.onnx", f"{v}-l0": work / f"{v}-l0.onnx",
                  f"{v}-ov": work / f"{v}-ov.onnx"}
    if all(p.exists() for p in files.values()):
        return files
    lm = load_model(parse_model_arg(args.model))
    folder = str(model_dir(args.model))
    for key, cfg in (("float", DecoderConfig(check=False)),
                     ("float-ov", DecoderConfig.for_openvino(check=False))):
        if not files[key].exists():
            t0 = time.process_time()
            export_decoder(lm.module, files[key], cfg)
            print(f"{key} export {time.process_time() - t0:.0f} CPU-s", flush=True)
    for v in args.variants:
        if all(files[k].exists() for k in (v, f"{v}-l0", f"{v}-ov")):
            continue
        from slimformer.models import taskeval as T
        from slimformer.quantize.api import quantize
        from slimformer.quantize.config import QuantConfig

        calib = get_dataset("nyt-editorials", "train", tokenizer=folder)
        calib = calib.select(slice(0, min(args.calib, len(calib))))
        t0 = time.process_time()
        cfg = QuantConfig(weight_only=True, weight_bits=4, group_size=args.group_size,
                          calib_samples=len(calib), **VARIANTS[v],
                          calib_window=args.calib_window or None,
                          **({"method": args.method} if args.method else {}))
        q = quantize(lm.module, cfg, calib).model
        print(f"{v} quantize ({cfg.method}) {time.process_time() - t0:.0f} CPU-s", flush=True)
        stream = T.token_stream(get_dataset("nyt-editorials", "test", tokenizer=folder),
                                args.prompt)
        prompt = [int(t) for t in stream[:args.prompt]]
        for key, cfg in ((v, DecoderConfig(accuracy_level=4)),
                         (f"{v}-l0", DecoderConfig(accuracy_level=0)),
                         (f"{v}-ov", DecoderConfig.for_openvino())):
            res = export_decoder(q, files[key], cfg, prompt)
            print(f"{key}: accuracy_level {res.accuracy_level}, tokens {res.tokens}, "
                  f"notes {res.warnings}", flush=True)
        del q
    if not files["ort-int4"].exists():
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        t0 = time.process_time()
        quant = MatMulNBitsQuantizer(onnx.load(str(files["float"])), bits=4,
                                     block_size=args.group_size, is_symmetric=False,
                                     accuracy_level=4)
        quant.process()
        onnx.save(quant.model.model, str(files["ort-int4"]))
        print(f"ORT MatMulNBitsQuantizer {time.process_time() - t0:.0f} CPU-s", flush=True)
    if not files["nncf-int4"].exists():
        import nncf
        import openvino as ov

        t0 = time.process_time()
        m = ov.Core().read_model(str(files["float-ov"]))
        q = nncf.compress_weights(m, mode=nncf.CompressWeightsMode.INT4_ASYM,
                                  group_size=args.nncf_group, ratio=1.0)
        ov.save_model(q, str(files["nncf-int4"]), compress_to_fp16=False)
        print(f"NNCF compress_weights {time.process_time() - t0:.0f} CPU-s", flush=True)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nncf-group", type=int, default=64)
    ap.add_argument("--method", default=None, help="ours: quantize method (default: the "
                    "config's, GPTQ for weight-only)")
    ap.add_argument("--calib", type=int, default=512, help="ours: calibration rows (nyt train)")
    ap.add_argument("--calib-window", type=int, default=512,
                    help="ours: rows packed into windows of this many tokens (0: as given); "
                         "512 / 512 are the quantize stage's defaults for a causal LM")
    ap.add_argument("--variants", nargs="+", default=["ours", "ours-e8"], choices=list(VARIANTS))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/slimformer-decode"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    files = build(args, args.work)
    gc.collect()

    from slimformer.data.datasets import get_dataset
    from slimformer.export.openvino import OvDecoder
    from slimformer.export.ortgen import OrtDecoder, time_decoders
    from slimformer.models import taskeval as T
    from slimformer.models.pretrained.install import model_dir

    folder = str(model_dir(args.model))
    tokens = [int(t) for t in T.token_stream(get_dataset("nyt-editorials", "test",
                                                         tokenizer=folder), args.tokens)]
    prompt = tokens[:args.prompt]
    name = {"ours": "ours", "ours-e8": "ours + emb int8",
            "ours-e8-norot": "ours + emb int8, not rotated"}
    rows = {"ort float": (OrtDecoder, files["float"], {})}
    for v in args.variants:
        rows[f"ort int4 {name[v]} (level 4)"] = (OrtDecoder, files[v], {})
        rows[f"ort int4 {name[v]} (level 0)"] = (OrtDecoder, files[f"{v}-l0"], {})
    rows[f"ort int4 MatMulNBitsQuantizer g{args.group_size}"] = (OrtDecoder, files["ort-int4"],
                                                                {})
    rows["ov f32"] = (OvDecoder, files["float-ov"], {"precision": "f32"})
    rows["ov bf16"] = (OvDecoder, files["float-ov"], {"precision": "bf16"})
    for v in args.variants:
        rows[f"ov int4 {name[v]}"] = (OvDecoder, files[f"{v}-ov"], {"precision": "f32"})
    rows[f"ov int4 nncf g{args.nncf_group}"] = (OvDecoder, files["nncf-int4"],
                                                {"precision": "f32"})
    decs, table = {}, {}
    for label, (cls, path, kw) in rows.items():
        before = rss_gb()
        try:
            dec = cls(path, args.threads, **kw)
            ppl = perplexity(dec, tokens, args.window)
        except Exception as exc:  # noqa: BLE001 - a runtime refusing a file is a row
            table[label] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(label, table[label], flush=True)
            continue
        data = Path(str(path) + ".data")
        size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
        if path.suffix == ".xml":
            size += path.with_suffix(".bin").stat().st_size
        table[label] = {"ppl": round(ppl, 3), "file_mb": round(size / 1e6, 1),
                        "rss_added_gb": round(rss_gb() - before, 2)}
        decs[label] = dec
        print(label, table[label], flush=True)
    timed = time_decoders(decs, prompt, args.steps, args.rounds)
    base = timed["ort float"]
    for label, t in timed.items():
        table[label] |= {
            "prefill_x": round(t["prefill_tokens_per_s_median"]
                               / base["prefill_tokens_per_s_median"], 2),
            "prefill_x_best": round(t["prefill_tokens_per_s"] / base["prefill_tokens_per_s"], 2),
            "decode_x": round(t["decode_tokens_per_s_median"]
                              / base["decode_tokens_per_s_median"], 2),
            "decode_x_best": round(t["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2),
            "decode_tok_s": t["decode_tokens_per_s_median"],
            "prefill_tok_s": t["prefill_tokens_per_s_median"]}
    fl = table["ort float"]
    head = (f"{args.model}, {cpu_name()}, {args.threads} threads; perplexity on {len(tokens)} "
            f"nyt-editorials test tokens (windows of {args.window}); {args.prompt}-token "
            f"prompt, {args.steps} decode steps, {args.rounds} alternating rounds: median "
            "(best round)")
    lines = [head, "", "| row | perplexity | vs float | file MB | smaller | prefill vs ORT float "
             "| decode vs ORT float | decode tok/s | RSS added GB |", "|---|---|---|---|---|---|"
             "---|---|---|"]
    for label, r in table.items():
        if "error" in r:
            lines.append(f"| {label} | {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {label} | {r['ppl']:.2f} | {(r['ppl'] / fl['ppl'] - 1) * 100:+.1f}% | "
                     f"{r['file_mb']} | {fl['file_mb'] / r['file_mb']:.2f}x | "
                     f"{r['prefill_x']:.2f}x ({r['prefill_x_best']:.2f}x) | "
                     f"{r['decode_x']:.2f}x ({r['decode_x_best']:.2f}x) | {r['decode_tok_s']} | "
                     f"{r['rss_added_gb']} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n\n" + json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
