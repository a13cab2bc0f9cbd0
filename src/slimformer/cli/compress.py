"""``quantize``, ``qat``, ``prune`` and ``search``: one-stage recipes run through the pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slimformer.cli.common import _console, _debugging, _errors, _table
from slimformer.cli.options import (
    CALIB_HELP,
    CALIB_ROWS,
    DATA_HELP,
    EVAL_HELP,
    SET_HELP,
    ConfigOpt,
    FailOnLoss,
    MaxLoss,
    OverwriteOpt,
    SetOpt,
    TaskOpt,
    _data_config,
    _quality,
    _run_one,
    _sets,
    _stage,
)
from slimformer.quantize.budget import ROWS


def quantize(model: Annotated[str, typer.Argument(help="Model (as for inspect).")],
             out: Annotated[Path, typer.Option(help="Folder for the quantized model.")],
             method: Annotated[str | None, typer.Option(
                 help="minmax | percentile | repq | repquant; --weight-only: minmax (round to "
                      "nearest) | gptq  [default: minmax at W8A8 (8-bit weights and "
                      "activations, no --power-of-two-scales), else repq; --weight-only: gptq; "
                      "--act-dynamic: minmax]")] = None,
             weight_bits: Annotated[int, typer.Option(help="Weight bits (2..8).")] = 8,
             act_bits: Annotated[int, typer.Option(help="Activation bits (2..8).")] = 8,
             calib_samples: Annotated[int | None, typer.Option(
                 help="Calibration rows [default: 128; a causal LM weight-only: 512, packed "
                      "into windows of 512 tokens]")] = None,
             budget: Annotated[str | None, typer.Option(
                 help="Accuracy budget: 1pt (accuracy points lost, or top-1 agreement points "
                      "on unlabelled rows), 3%ppl (relative perplexity increase, causal LMs) or "
                      "30dB (output SQNR); the fewest activation sites, ranked by their share "
                      "of the output error, go to 8 bits, then float, to meet it on "
                      "calibration rows past --calib-samples.")] = None,
             softmax: Annotated[str, typer.Option(help="auto | log_sqrt2 | log2 | uniform | "
                                                  "none (attention probabilities).")] = "auto",
             attention: Annotated[str, typer.Option(
                 help="auto | quantized | float: the attention matmuls' inputs (q, k, v, "
                      "probabilities) quantized or float (as ONNX Runtime's Attention op runs "
                      "them); auto: quantized for repq/repquant, --power-of-two-scales or a "
                      "--softmax quantizer, else float.")] = "auto",
             symmetric: Annotated[bool, typer.Option(help="Symmetric (zero point 0) weights "
                                                     "and activations.")] = False,
             weight_only: Annotated[bool, typer.Option(
                 help="Quantize weights only (activations stay float), as LLM runtimes on "
                      "CPUs do.")] = False,
             group_size: Annotated[int | None, typer.Option(
                 help="--weight-only: one scale per this many input columns (32, 64, 128 ...)"
                      "; default per output channel.")] = None,
             awq: Annotated[bool, typer.Option(
                 help="--weight-only: activation-aware scales (AWQ), folded into the norms.")]
             = False,
             gptq: Annotated[bool | None, typer.Option(
                 "--gptq/--no-gptq",
                 help="Quantized activations (minmax, percentile, repq): round the weights by "
                      "GPTQ on their calibrated ranges, kept where the model output error "
                      "falls (--weight-only: --method gptq).  [default: on at 4 weight bits or "
                      "fewer]")] = None,
             head_bits: Annotated[int, typer.Option(
                 help="--weight-only below this many bits: the model's output Linears (an "
                      "LM head, a classifier) get this many weight bits; 0: as the others.")]
             = 8,
             smooth: Annotated[str, typer.Option(
                 help="auto | on | off: SmoothQuant-style migration of activation outliers "
                      "into the weights, folded into norms / Linears, per site where it lowers "
                      "the error; auto keeps it only where the model output error on held-out "
                      "calibration rows drops, on skips that check (not with --weight-only).")]
             = "auto",
             act_dynamic: Annotated[str | None, typer.Option(
                 help="off | tensor | token: quantize the Linear inputs on ranges computed at "
                      "run time (per tensor, or per token: each row its own), as ONNX "
                      "Runtime's DynamicQuantizeLinear; holds massive token outliers. Method "
                      "minmax by default then (or percentile).  [default: token for a causal "
                      "LM quantized by min/max or percentile, else off]")] = None,
             outlier_channels: Annotated[int, typer.Option(
                 help="The most input channels per Linear kept float where their values dwarf "
                      "the rest (massive activations; each site by its output error on the "
                      "calibration rows); 0: none.")] = 8,
             rotate: Annotated[str, typer.Option(
                 help="auto | on | off: rotate the residual stream by a random orthogonal "
                      "matrix folded into the weights before they are quantized (QuaRot/"
                      "SpinQuant R1; exact in float; pre-norm RMSNorm models); auto: with "
                      "--weight-only at 4 bits or fewer where the model allows it.")] = "auto",
             rotate_inputs: Annotated[str | None, typer.Option(
                 help="auto | on | off: rotate each quantized Linear input online by a seeded "
                      "orthogonal matrix (QuaRot's online Hadamard; Kronecker factors; the "
                      "weights W R, exact in float) so its outlier channels spread before the "
                      "grid; methods minmax / percentile; exported to ONNX, not to QONNX or "
                      "hls4ml; auto: kept where it lowers the model output error on held-out "
                      "calibration rows.  [default: auto with activations of 4 bits or fewer, "
                      "else off]")] = None,
             power_of_two_scales: Annotated[bool, typer.Option(
                 help="Power-of-two scales (exact ap_fixed types for export hls).")] = False,
             embedding_bits: Annotated[int | None, typer.Option(
                 help="Quantize embedding tables to this many bits (2..8); 0 keeps them float. "
                      "Default: 8 for a causal LM quantized weight-only to 4 bits or fewer, "
                      "else float.")] = None,
             max_memory: Annotated[str | None, typer.Option(
                 help="Peak memory budget of calibration (4GB, 512MiB): block inputs/outputs "
                      "past it go to memory-mapped files.")] = None,
             clip_steps: Annotated[int, typer.Option(help="repquant: dual-clipping steps.")]
             = 100,
             recon_steps: Annotated[int, typer.Option(help="repquant: weight-reconstruction "
                                                      "steps.")] = 100,
             data: Annotated[str | None, typer.Option(help=DATA_HELP)] = None,
             calib_data: Annotated[str | None, typer.Option(help=CALIB_HELP)] = None,
             eval_data: Annotated[str | None, typer.Option(help=EVAL_HELP)] = None,
             limit: Annotated[int | None, typer.Option(help="Evaluate on the first N test "
                                                       "rows.")] = None,
             config: ConfigOpt = None,
             overwrite: OverwriteOpt = False,
             max_loss: MaxLoss = None, fail_on_loss: FailOnLoss = False,
             set_: SetOpt = None,
             task: TaskOpt = None):
    """Quantize a model post-training, compare it with FP32, save its inference form.

    Runs the one-stage recipe evaluate -> quantize -> evaluate through the pipeline: --out gets
    the report and the quantized model in quantized/ (a MODEL for every other command).
    """
    from slimformer.stages.evaluate import EvaluateStage
    from slimformer.stages.quantize import QuantizeStage

    con, _ = _console()
    with _errors():
        wo = {"weight_only": True, "group_size": group_size, "awq": awq,
              "head_bits": head_bits or None} if weight_only else \
            {k: v for k, v in (("group_size", group_size), ("awq", awq)) if v}  # refused
        named = {k: v for k, v in (("method", method), ("act_dynamic", act_dynamic),
                                   ("gptq", gptq), ("rotate_inputs", rotate_inputs))
                 if v is not None and v != ""}
        if embedding_bits is not None:  # 0: float tables; not given: the task's default
            named["embedding_bits"] = embedding_bits or None
        stage = _stage(QuantizeStage, set_, **named,  # else the defaults (config, task)
                       weight_bits=weight_bits, act_bits=act_bits, **wo,
                       **({"calib_samples": calib_samples} if calib_samples is not None else {}),
                       softmax=softmax, attention=attention,
                       symmetric=symmetric,
                       **({"budget": budget} if budget is not None else {}),
                       smooth=smooth, power_of_two_scales=power_of_two_scales,
                       outlier_channels=outlier_channels, rotate=rotate,
                       max_memory=max_memory,
                       clip_steps=clip_steps, recon_steps=recon_steps)
        quiet = EvaluateStage(latency_batch_sizes=[])
        result = _run_one(con, "quantize", model, config, [quiet, stage, quiet], out, overwrite,
                          _data_config(data, calib_data, eval_data, limit,
                                       max(CALIB_ROWS, stage.calib_samples +
                                           (max(ROWS.values()) if stage.budget else 0))),
                          max_loss, fail_on_loss, task)
    before, q, after = result.report.stages
    dyn = q.metrics.get("act_dynamic", "off")
    con.print(f"{model} {q.metrics['method']} {q.metrics['bits']}"
              f"{'' if dyn == 'off' else f' (run-time ranges per {dyn})'} on "
              f"{result.report.data['dataset']} "
              f"({after.metrics['samples']} rows): {_quality(before)} -> {_quality(after)}"
              f"; calibration {q.metrics['calib_seconds']:.1f} s on {q.metrics['calib_samples']} "
              "samples" + (f", peak RSS {q.metrics['peak_rss_gb']:.2f} GB"
                           if q.metrics.get("peak_rss_gb") else ""))
    for note in q.notes:
        con.print(f"  - {note}", markup=False, highlight=False)
    con.print(f"saved to {out}/ (report, quantized/)")



def qat(model: Annotated[str, typer.Argument(help="A quantized folder (slimformer quantize "
                                             "--out), or a float model: quantized first.")],
        out: Annotated[Path, typer.Option(help="Folder for the fine-tuned quantized model.")],
        steps: Annotated[int, typer.Option(help="Optimizer steps at most.")] = 300,
        batch_size: Annotated[int, typer.Option(help="Rows per step.")] = 32,
        weight_lr: Annotated[float | None, typer.Option(
            help="Adam rate of the Linear weights (default: 1e-4 at <= 4 bits, halved per "
                 "bit above).")] = None,
        scale_lr: Annotated[float, typer.Option(help="Adam rate of the learned scales and zero "
                                                "points, relative to each scale.")] = 1e-3,
        lr_schedule: Annotated[str, typer.Option(help="constant | cosine (the rates decay to "
                                                 "0 over --steps).")] = "cosine",
        rows: Annotated[int, typer.Option(help="Training rows (of the train split; of your "
                                          "own data: its calibration rows), a quarter held "
                                          "out.")] = 4096,
        loss: Annotated[str, typer.Option(help="auto | kl (class scores, LM logits) | mse "
                                          "(features, embeddings).")] = "auto",
        eval_every: Annotated[int, typer.Option(help="Steps between judgements of the "
                                                "held-out rows.")] = 50,
        patience: Annotated[int, typer.Option(help="Judgements without improvement before "
                                              "stopping (0: never).")] = 4,
        max_minutes: Annotated[float | None, typer.Option(help="Wall-clock budget of the "
                                                          "fine-tuning.")] = None,
        method: Annotated[str | None, typer.Option(help="A float MODEL: the quantize method "
                                                   "(minmax | percentile | repq | repquant; "
                                                   "default: minmax at W8A8 or with "
                                                   "--act-dynamic, else repq).")] = None,
        act_dynamic: Annotated[str, typer.Option(help="A float MODEL: off (static input "
                                                 "ranges, learned) | token | tensor (ranges "
                                                 "computed at run time, not learned).")]
        = "off",
        weight_bits: Annotated[int, typer.Option(help="A float MODEL: weight bits (2..8).")] = 4,
        act_bits: Annotated[int, typer.Option(help="A float MODEL: activation bits (2..8).")]
        = 8,
        data: Annotated[str | None, typer.Option(help=DATA_HELP)] = None,
        limit: Annotated[int | None, typer.Option(help="Evaluate on the first N test "
                                                  "rows.")] = None,
        config: ConfigOpt = None,
        overwrite: OverwriteOpt = False,
        max_loss: MaxLoss = None, fail_on_loss: FailOnLoss = False,
        set_: Annotated[list[str] | None, typer.Option(
            "--set", help=SET_HELP + " Keys quantize.KEY go to the quantize stage.")] = None,
        task: TaskOpt = None):
    """Fine-tune a quantized model with its quantizers in the loop (QAT, Brevitas), save it.

    Distills the float model into the quantized one (learned weights, scales and zero points),
    early stopping on held-out training rows. Runs the one-stage recipe evaluate -> [quantize
    ->] qat -> evaluate through the pipeline: --out gets the report and the fine-tuned model in
    quantized/ (an ordinary quantized folder: a MODEL for eval and export). A float MODEL is
    quantized first (--method, --weight-bits, --act-bits, --act-dynamic, --set
    quantize.KEY=VALUE).
    """
    from slimformer.errors import ConfigError
    from slimformer.stages.artifact import find
    from slimformer.stages.evaluate import EvaluateStage
    from slimformer.stages.qat import QatStage
    from slimformer.stages.quantize import QuantizeStage

    con, _ = _console()
    with _errors():
        stage = _stage(QatStage, set_, None, ("quantize",), steps=steps, batch_size=batch_size,
                       weight_lr=weight_lr, scale_lr=scale_lr, lr_schedule=lr_schedule,
                       rows=rows, loss=loss,
                       eval_every=eval_every, patience=patience, max_minutes=max_minutes)
        saved = find(model)
        stages = [stage]
        if saved is not None and saved[0] == "quantized":
            if _sets(set_, "quantize"):
                raise ConfigError(["--set quantize.*: the model is quantized already; drop "
                                   "those --set items"], "options")
        else:
            # static ranges unless asked (a causal LM's quantize default is per token): learned
            named = {"method": method} if method is not None else {}
            stages.insert(0, _stage(QuantizeStage, set_, "quantize", **named,
                                    weight_bits=weight_bits, act_bits=act_bits,
                                    act_dynamic=act_dynamic))
        quiet = EvaluateStage(latency_batch_sizes=[])
        calib = max([CALIB_ROWS, stage.rows] + [s.calib_samples for s in stages[:-1]])
        result = _run_one(con, "qat", model, config, [quiet, *stages, quiet], out, overwrite,
                          _data_config(data, None, None, limit, calib), max_loss, fail_on_loss,
                          task)
    first, *done, after = result.report.stages
    q = done[-1]
    m = q.metrics
    con.print(f"{model} QAT on {result.report.data['dataset']} ({after.metrics['samples']} rows): "
              f"{_quality(first)} -> {_quality(after)}; {m['steps']} steps ({m['stopped']}, kept "
              f"step {m['best_step']}), {m['cpu_seconds_per_step']:.2f} CPU-s per step"
              + (f", peak RSS {m['peak_rss_gb']:.2f} GB" if m.get("peak_rss_gb") else ""),
              markup=False, highlight=False)
    for rec in done:
        for note in rec.notes:
            con.print(f"  - {note}", markup=False, highlight=False)
    con.print(f"saved to {out}/ (report, quantized/)")


def prune(model: Annotated[str, typer.Argument(help="Model (as for inspect).")],
          out: Annotated[Path, typer.Option(help="Folder for the pruned model.")],
          ratio: Annotated[float, typer.Option(help="Fraction of the prunable params/MACs to "
                                               "remove, in (0, 1); 0.5 = 2x.")] = 0.5,
          target: Annotated[str, typer.Option(help="params | macs")] = "params",
          method: Annotated[str, typer.Option(help="upop | magnitude")] = "upop",
          structures: Annotated[str, typer.Option(help="Comma list of: heads, dims, mlp.")]
          = "heads,mlp",
          score: Annotated[str, typer.Option(help="UPop ranking: gradient (the paper's) | "
                                             "taylor (squared gradients, the default).")] = "taylor",
          search_steps: Annotated[int, typer.Option(help="UPop search steps.")] = 200,
          finetune_steps: Annotated[int, typer.Option(help="Fine-tuning steps.")] = 500,
          batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 64,
          lr: Annotated[float, typer.Option(help="Fine-tuning learning rate.")] = 3e-4,
          distill: Annotated[float, typer.Option(help="Distillation weight in [0, 1].")] = 0.5,
          data: Annotated[str | None, typer.Option(help=DATA_HELP)] = None,
          limit: Annotated[int | None, typer.Option(help="Evaluate on the first N test "
                                                    "rows.")] = None,
          checkpoint: Annotated[Path | None, typer.Option(help="Folder for resumable "
                                                          "checkpoints.")] = None,
          config: ConfigOpt = None,
          overwrite: OverwriteOpt = False,
          max_loss: MaxLoss = None, fail_on_loss: FailOnLoss = False,
          set_: SetOpt = None,
          task: TaskOpt = None):
    """Prune heads and MLP units (UPop or magnitude), fine-tune, save the smaller model.

    Runs the one-stage recipe evaluate -> prune -> evaluate through the pipeline: --out gets the
    report and the pruned model in pruned/ (a MODEL for every other command).
    """
    from slimformer.stages.evaluate import EvaluateStage
    from slimformer.stages.prune import PruneStage

    con, _ = _console()
    with _errors():
        stage = _stage(PruneStage, set_, ratio=ratio, target=target, method=method,
                       structures=[x.strip() for x in structures.split(",") if x.strip()],
                       score=score, search_steps=search_steps, finetune_steps=finetune_steps,
                       batch_size=batch_size, lr=lr, distill=distill,
                       checkpoint=str(checkpoint) if checkpoint else None)
        quiet = EvaluateStage(latency_batch_sizes=[])
        result = _run_one(con, "prune", model, config, [quiet, stage, quiet], out, overwrite,
                          _data_config(data, None, None, limit), max_loss, fail_on_loss, task)
    before, p, after = result.report.stages
    m = p.metrics
    target = stage.target
    table = _table("", "before", "after", title=f"{model} {stage.method} ratio {stage.ratio} on "
                   f"{result.report.data['dataset']}")
    table.add_row("params", f"{m['params_before']:,}", f"{m['params_after']:,}")
    table.add_row("MACs/sample", f"{m['macs_before']:,}", f"{m['macs_after']:,}")
    table.add_row(f"prunable {target}", "", f"{m[f'prunable_{target}_reduction']:.2f}x smaller")
    table.add_row("quality", _quality(before), _quality(after))
    for key in ("heads_kept", "mlp_units_kept", "head_dims_kept"):
        if key in m:
            table.add_row(key.replace("_", " "), "", str(m[key]))
    table.add_row("seconds", "", f"search {m['search_seconds']:.1f}, fine-tune "
                  f"{m['finetune_seconds']:.1f}")
    con.print(table)
    for note in p.notes:
        con.print(f"  - {note}", markup=False, highlight=False)
    con.print(f"saved to {out}/ (report, pruned/)")


def search(model: Annotated[str, typer.Argument(help="Model (as for inspect).")],
           out: Annotated[Path, typer.Option(help="Folder for the report and search/ (the "
                                             "front as json, md, png; the chosen sub-network).")],
           objectives: Annotated[str, typer.Option(help="Comma-separated: accuracy plus any of "
                                                   "latency, size, macs.")] = "accuracy,size",
           samples: Annotated[int, typer.Option(help="Sub-networks measured for the "
                                                "predictors.")] = 30,
           train_steps: Annotated[int, typer.Option(help="Super-network fine-tuning "
                                                    "steps.")] = 200,
           front_max: Annotated[int, typer.Option(help="Predicted-front sub-networks "
                                                  "measured.")] = 8,
           val_rows: Annotated[int, typer.Option(help="Rows sub-networks are measured on (test "
                                                 "rows the model never trained on).")] = 1000,
           storage: Annotated[str | None, typer.Option(
               help="Journal file or database URL of the Optuna study (default: a journal in "
               "OUT/state/search/).")] = None,
           supernet: Annotated[Path | None, typer.Option(
               help="File of the fine-tuned super-network (default: beside the journal in "
               "OUT/state/search/).")] = None,
           study: Annotated[str, typer.Option(help="Study name (resumes when it "
                                              "exists).")] = "search",
           worker: Annotated[bool, typer.Option(help="Only measure sub-networks into the study "
                                                "of a search that ran (give its --storage and "
                                                "--supernet).")] = False,
           data: Annotated[str | None, typer.Option(help=DATA_HELP)] = None,
           config: ConfigOpt = None,
           overwrite: OverwriteOpt = False,
           max_loss: MaxLoss = None, fail_on_loss: FailOnLoss = False,
           set_: SetOpt = None,
           task: TaskOpt = None):
    """Search sub-networks and per-layer bit-widths; print the measured Pareto front.

    Runs the one-stage recipe search through the pipeline: --out gets the report and search/
    (a MODEL for every other command: the chosen float sub-network).
    """
    import optuna

    from slimformer.stages.search import SearchStage

    if not _debugging():  # our progress says what Optuna's INFO lines would
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    con, _ = _console()
    with _errors():
        given = {k: v for k, v in (("storage", storage),
                                   ("supernet_path", str(supernet) if supernet else None))
                 if v is not None}
        stage = _stage(SearchStage, set_, objectives=[o.strip() for o in objectives.split(",")
                                                if o.strip()],
                       samples=samples, train_steps=train_steps, front_max=front_max,
                       val_rows=val_rows, study=study, worker=worker, **given)
        if storage is not None:  # a bad storage fails before anything is written
            from slimformer.nas.study import open_storage

            open_storage(stage.search_config().storage_url())
        result = _run_one(con, "search", model, config, [stage], out, overwrite,
                          _data_config(data), max_loss, fail_on_loss, task)
    rec = result.report.stages[-1]
    for note in rec.notes:
        con.print(note, markup=False, highlight=False)
    if stage.worker:
        return
    m = rec.metrics
    con.print(f"hypervolume {m['hypervolume']:.4f}; chosen {m['chosen']}; written to {out}/ "
              "(report, search/)", markup=False, highlight=False)
