"""``inspect``, ``eval`` and ``generate``: look at a model, measure it, run it."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from slimformer.cli.common import _bounded, _console, _errors, _table
from slimformer.cli.options import (
    DATA_HELP,
    EVAL_HELP,
    ConfigOpt,
    JsonOpt,
    TaskOpt,
    _data_config,
    _load,
    _load_any,
    _run_one,
    _stage,
)


def inspect(model: Annotated[str, typer.Argument(help="Zoo name, HF dir, timm:NAME, "
                                                 "hf:MODEL_TYPE, pkg.mod:factory or spec file.")],
            config: Annotated[str | None, typer.Option(help="JSON kwargs/config for timm:, hf:, "
                                                       "factory models.")] = None,
            as_json: JsonOpt = False,
            task: TaskOpt = None):
    """Print the discovered structure (norms -> Linears, attention, MLPs), params and MACs."""
    from slimformer.models.structure import discover

    con, err = _console()
    with _errors(), err.status("loading the model and tracing one forward pass"):
        lm = _load(model, config, task)
        smap = discover(lm.module, lm.example_inputs(2), require_attention=False)
    if as_json:
        print(json.dumps(smap.to_dict(), indent=2))
        return
    con.print(f"[bold]{type(lm.module).__name__}[/]: {smap.params:,} params, "
              f"{smap.macs:,} MACs per sample, inputs "
              f"{ {k: v.shape for k, v in lm.input_specs.items()} }")
    t = _table("norm", "kind", "feeds Linears", "other consumers", "foldable", title="Norms")
    for n in smap.norms:
        t.add_row(n.module, n.kind, "\n".join(n.linears), ", ".join(n.other_consumers),
                  str(n.foldable))
    con.print(t)
    t = _table("module", "kind", "q / k / v", "out", "heads x dim", "fused", "cross",
               title="Attention")
    for a in smap.attention:
        qkv = a.q[0] if a.fused_qkv else "\n".join((*a.q, *a.k, *a.v))
        t.add_row(a.module, a.kind, qkv, "\n".join(a.out), f"{a.heads} x {a.head_dim}",
                  str(a.fused_qkv), str(a.cross))
    con.print(t)
    if not smap.attention:
        err.print("note: no attention found (no softmax of scores, scaled_dot_product_attention "
                  "or nn.MultiheadAttention): quantize builds no softmax quantizer, prune cuts "
                  "MLP units only (structures: [mlp])", markup=False)
    t = _table("fc1", "activation", "fc2", "hidden", title="MLPs")
    for m in smap.mlps:
        t.add_row("\n".join(m.fc1), ", ".join(m.activation), m.fc2, str(m.hidden))
    con.print(t)


LATENCY_BUDGET_S = 10.0  # eval: seconds per batch size before the default repeats stop


def eval_(model: Annotated[str, typer.Argument(help="Model (as for inspect).")],
          data: Annotated[str | None, typer.Option(help=DATA_HELP)] = None,
          eval_data: Annotated[str | None, typer.Option(help=EVAL_HELP)] = None,
          split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
          limit: Annotated[int | None, typer.Option(help="Evaluate the first N rows.")] = None,
          batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 256,
          repeats: Annotated[int | None, typer.Option(
              help="Latency repeats. Default: 20, or fewer once a batch size took 10 s (a "
              "large model at batch 32).", show_default=False)] = None,
          config: ConfigOpt = None,
          as_json: JsonOpt = False,
          task: TaskOpt = None):
    """Metric, latency (median of repeated runs at batch 1 and 32) and size of a model.

    Runs the one-stage recipe evaluate through the pipeline (its output folder is temporary):
    the rows such a recipe evaluates; of your own --data file, every row (nothing calibrates, so
    no row is set aside; ``quantize`` scores the rows it does not calibrate on). A model whose
    task is sentence-embedding, image-features or causal-lm prints its task's metrics against
    its float model (itself, or a saved folder's base) on held-out rows.
    """
    from slimformer.stages.evaluate import EvaluateStage
    from slimformer.stages.taskquality import TASKS

    con, err = _console()
    with _errors():
        _bounded(limit=(limit, 1, 10**9), batch_size=(batch_size, 1, 4096),
                 repeats=(repeats, 1, 1000))
        stage = EvaluateStage(latency_batch_sizes=[1, 32], latency_repeats=repeats or 20,
                              latency_budget_s=None if repeats else LATENCY_BUDGET_S)
        data_cfg = _data_config(data, None, eval_data, limit, split=split, batch_size=batch_size)
        # notes go to stderr: stdout is the result (JSON with --json)
        rep = _run_one(err, "eval", model, config, [stage], None, False, data_cfg,
                       task=task).report
    rec, task_name = rep.stages[0], rep.model.get("task")
    metrics = rec.metrics if task_name in TASKS else None
    samples = rep.data["eval_samples"]
    result = {"model": model, "data": rep.data["dataset"], "split": split, "samples": samples,
              "accuracy": rec.metrics.get("accuracy") if metrics is None else None,
              "latency": rec.latency, "size": rec.size, "notes": rep.data.get("labels", [])}
    fidelity = {k: v for k, v in rec.metrics.items() if k.startswith("output_")}
    if metrics is not None:
        result |= {"task": task_name, "metrics": metrics}
    elif fidelity:  # no labels or no class scores: every output vs the float model
        result["fidelity"] = fidelity
    if as_json:
        print(json.dumps(result, indent=2))
        return
    con.print(f"{model} on {result['data']}/{split} ({samples} samples): " +
              (_task_line(task_name, metrics) if metrics is not None else
               _accuracy_line(rec.metrics)))
    for note in result["notes"]:
        con.print(f"  note: {note}", markup=False)
    for b, s in rec.latency.items():
        con.print(f"  latency {b}: median {s['median_ms']:.2f} ms (p90 {s['p90_ms']:.2f}, "
                  f"{s['repeats']} runs, {s['threads']} threads)")
    con.print(f"  size: {result['size']['params']:,} params, {result['size']['bytes']:,} bytes")


def _accuracy_line(m: dict) -> str:
    """Accuracy, or why there is none and the outputs' fidelity vs the float model."""
    if m.get("accuracy") is not None:
        return f"accuracy {m['accuracy']:.4f}"
    line = ("no labels" if "agreement" in m else "no class scores") + ": accuracy not measured"
    if "output_cosine_min" in m:
        sqnr = m["output_sqnr_db_min"]
        line += (f"; outputs vs the float model: cosine min {m['output_cosine_min']:.5f}, SQNR "
                 f"min {sqnr if isinstance(sqnr, str) else f'{sqnr:.1f}'} dB")
    return line


def _task_line(task: str, m: dict) -> str:
    """One line of a task's metrics (see ``stages.taskquality.task_metrics``)."""
    if task == "causal-lm":
        return (f"perplexity {m['perplexity']:.3f} (float {m['perplexity_float']:.3f}) on "
                f"{m['tokens']:,} held-out tokens (window {m['window']}, stride {m['stride']}), "
                f"next-token agreement with float {m['top1_agreement']:.4f}")
    word = "embedding" if task == "sentence-embedding" else "feature"
    line = (f"{word} cosine vs float mean {m[word + '_cosine_mean']:.4f} min "
            f"{m[word + '_cosine_min']:.4f}")
    if "neighbour_agreement" in m:
        line += f", nearest-neighbour agreement {m['neighbour_agreement']:.4f}"
    if "probe_accuracy" in m:
        line += (f", probe accuracy {m['probe_accuracy']:.4f} (float "
                 f"{m['probe_accuracy_float']:.4f}, fitted on {m['probe_train_rows']} float rows)")
    if "knn_accuracy" in m:
        line += (f", k-NN accuracy {m['knn_accuracy']:.4f} (float {m['knn_accuracy_float']:.4f}, "
                 f"bank {m['knn_bank_rows']} float rows)")
    return line



def generate(model: Annotated[str, typer.Argument(help="A causal LM (as for inspect): float, "
                                                  "or a saved pruned / quantized folder.")],
             prompt: Annotated[str, typer.Option(help="Text to continue.")],
             max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most "
                                                         "(1..4096).")] = 32,
             greedy: Annotated[bool, typer.Option("--greedy/--sample", help="Argmax, or sample "
                                                  "with --temperature and --seed.")] = True,
             temperature: Annotated[float, typer.Option(help="Sampling temperature "
                                                        "(0.001..100).")] = 1.0,
             seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
             chat: Annotated[bool, typer.Option(help="Apply the tokenizer's chat template (the "
                                                "prompt as a user turn).")] = False,
             tokenizer: Annotated[str | None, typer.Option(
                 help="Tokenizer folder (default: the model's own folder).")] = None,
             runtime: Annotated[str, typer.Option(
                 help="torch, or onnxruntime / openvino: export the model (float or "
                      "weight-only quantized) as a decoder graph with its KV cache and run "
                      "it in ONNX Runtime / OpenVINO (the same ONNX file).")] = "torch",
             config: ConfigOpt = None,
             as_json: JsonOpt = False,
             task: TaskOpt = None):
    """Continue a prompt with a causal LM (KV cache): the text, prefill and decode tokens/s."""
    from slimformer.stages.generate import MAX_NEW_TOKENS, TEMPERATURE_RANGE, GenerateStage

    con, err = _console()
    with _errors():
        _bounded(max_new_tokens=(max_new_tokens, 1, MAX_NEW_TOKENS),
                 temperature=(temperature, *TEMPERATURE_RANGE), seed=(seed, 0, 2**63 - 1))
        stage = _stage(GenerateStage, None, prompt=prompt, max_new_tokens=max_new_tokens,
                       greedy=greedy, temperature=temperature, seed=seed, chat=chat,
                       tokenizer=tokenizer, runtime=runtime)
        from slimformer.stages.generate import generate_text

        with err.status("loading the model"):
            loaded, module = _load_any(model, config, task=task)
        g, text = generate_text(module, loaded, stage)
    result = {"model": model, "runtime": runtime, "prompt": prompt, "text": text,
              "new_ids": g.new_ids,
              "prompt_tokens": len(g.prompt_ids), "new_tokens": len(g.new_ids),
              "stopped": g.stopped, "prefill_tokens_per_s": g.prefill_tokens_per_s,
              "decode_tokens_per_s": g.decode_tokens_per_s}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    con.print(prompt + text, markup=False, highlight=False)
    err.print(f"prefill: {len(g.prompt_ids)} tokens, {g.prefill_tokens_per_s:.1f} tokens/s; "
              f"decode: {len(g.new_ids)} new tokens ({g.stopped}), "
              f"{g.decode_tokens_per_s:.1f} tokens/s", markup=False, highlight=False)
