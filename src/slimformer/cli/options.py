"""Options shared by the commands, and the one-stage recipes they run through the pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slimformer.cli.common import _console, _progress, _said, _say_code, _trust

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
# options several commands share, declared once (their --help text is the same everywhere)
ConfigOpt = Annotated[str | None, typer.Option(help="JSON config (as for inspect).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
TrustCodeOpt = Annotated[bool, typer.Option("--trust-code", help="Allow a saved folder that names "
                                            "a package.module:factory to run it.")]
OverwriteOpt = Annotated[bool, typer.Option(help=OVERWRITE_HELP)]
OverwriteFileOpt = Annotated[bool, typer.Option(help="Replace an existing file at --out.")]



DATA_HELP = ("Data: a built-in set (fashion-mnist, vader-movie, trec, digits-seq) or your own file "
             "or folder (CSV/TSV/JSONL/text, image folder, datasets folder / parquet, "
             ".safetensors / .npz), or a JSON object with options ('{\"path\": \"photos\", "
             "\"size\": 28, \"mean\": [0.5], \"std\": [0.5], \"channels\": 1}'); one source "
             "is split into calibration and evaluation rows; a command that calibrates nothing "
             "(eval) evaluates every row (default: the zoo model's own set).")
CALIB_HELP = "Separate calibration data (file, folder or built-in set)."
EVAL_HELP = "Separate evaluation data (file, folder or built-in set)."


CALIB_ROWS = 256  # rows of one own data file kept for calibration (recipe data.calib_rows)


def _data_config(data: str | None, calib_data: str | None = None, eval_data: str | None = None,
                 limit: int | None = None, calib_rows: int = CALIB_ROWS, split: str = "test",
                 batch_size: int = 256):
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
                         eval_limit=limit, calib_rows=calib_rows, batch_size=batch_size)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, DataConfig), "data options") from None
    return cfg


def _spec(model: str, config: str | None, task: str | None = None, trust_code: bool = False):
    """The spec of a CLI MODEL argument; a saved folder gets ``--trust-code`` (global or own)."""
    from slimformer.models.loading import parse_model_arg
    from slimformer.models.spec import ArtifactSpec

    spec = parse_model_arg(model, config, task)
    factory = getattr(spec, "factory", None)
    if factory and factory != model and factory not in _said:  # named in a spec file: say so
        _said.add(factory)
        _console()[1].print(f"note: the model spec {model!r} runs code: factory {factory!r} is "
                            "imported and called when the model loads", markup=False,
                            highlight=False)
    if isinstance(spec, ArtifactSpec) and (_trust["on"] or trust_code):
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
SetOpt = Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)]


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


def _run_one(con, name: str, model: str, config: str | None, stages: list, out: Path | None,
             overwrite: bool, data_cfg, max_loss: str | None = None, fail_on_loss: bool = False,
             task: str | None = None, trust_code: bool = False):
    """Build the one-stage recipe of a command and run it through the pipeline.

    A stage's loss past the budget (``--max-loss``) is printed as a warning here. ``out`` None:
    a command that only prints (``eval``); the run's folder is temporary, removed after.
    ``trust_code``: the command's own ``--trust-code`` (a saved folder's factory may run).
    """
    from slimformer.pipeline import run as run_pipeline

    if out is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="slimformer-") as tmp:
            return _run_one(con, name, model, config, stages, Path(tmp) / "run", False,
                            data_cfg, max_loss, fail_on_loss, task, trust_code)
    from slimformer.recipe import OutputConfig, Recipe
    from slimformer.store.outdir import check_output

    budget = _budget(max_loss, fail_on_loss)
    check_output(out, overwrite)  # before the model is loaded
    literal = str(out).replace("{", "{{").replace("}", "}}")  # a CLI path is no template
    recipe = Recipe(name=name, model=_spec(model, config, task, trust_code), data=data_cfg,
                    stages=stages, output=OutputConfig(dir=literal, overwrite=overwrite),
                    max_loss=budget)
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
