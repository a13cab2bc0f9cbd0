"""The recipe schema: YAML -> typed, versioned objects, all problems reported at once.

A recipe names a model, the data, an ordered list of stages and where to write the report::

    version: 1
    model: {source: zoo, name: vit-fmnist}
    data: {dataset: fashion-mnist, eval_limit: 2000}
    stages:
      - {type: evaluate, latency_batch_sizes: [1, 32]}
      - {type: quantize, method: repq, weight_bits: 4, act_bits: 8, symmetric: true}
      - {type: evaluate}
      - {type: export, openvino: true}
    output: {dir: runs/quickstart}
    max_loss: {accuracy_points: 5}   # optional: warn when a stage loses more than its input

Stages are a tagged union on ``type`` (evaluate, quantize, qat, prune, search, export, hls,
generate), each run
by its handler in :mod:`slimformer.stages` through :mod:`slimformer.pipeline`. The shipped
default (``slimformer run`` with no argument) is ``slimformer/recipes/quickstart.yaml``.
``max_loss`` (:class:`~slimformer.stages.quality.LossBudget`) is how much quality each stage may
lose against its input before the run warns, or with ``fail: true`` stops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slimformer.errors import ConfigError, SlimformerError
from slimformer.models.spec import ArtifactSpec, ModelSpec, ZooSpec
from slimformer.stages import HANDLERS
from slimformer.stages.context import DATASET_NAMES, DataConfig
from slimformer.stages.evaluate import EvaluateStage
from slimformer.stages.export import ExportStage
from slimformer.stages.generate import GenerateStage
from slimformer.stages.hls import HlsStage
from slimformer.stages.prune import PruneStage
from slimformer.stages.qat import QatStage
from slimformer.stages.quality import LossBudget
from slimformer.stages.quantize import QuantizeStage
from slimformer.stages.search import SearchStage
from slimformer.validation import NAME_PATTERN, format_errors, safe_load_bounded

RECIPE_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Stage = Annotated[EvaluateStage | QuantizeStage | QatStage | PruneStage | SearchStage | HlsStage
                  | ExportStage | GenerateStage,
                  Field(discriminator="type")]


class OutputConfig(_Strict):
    """Where the run writes ``report.{json,md,html}`` and its artifacts.

    ``dir`` may hold the placeholder ``{name}`` (the recipe's name). An existing folder there is
    replaced only when slimformer wrote it and ``overwrite`` is true; anything else is refused.
    """

    dir: Annotated[str, Field(min_length=1, max_length=4096)] = "runs/{name}"
    overwrite: bool = False

    @field_validator("dir")
    @classmethod
    def _template(cls, v: str) -> str:
        from slimformer.store.outdir import format_dir

        try:
            format_dir(v, name="x")
        except SlimformerError as exc:
            raise ValueError(str(exc)) from None
        return v


class Recipe(_Strict):
    """A whole run: model, data, stages in order, output."""

    version: Literal[1] = RECIPE_VERSION
    name: Annotated[str, Field(min_length=1, max_length=200, pattern=NAME_PATTERN)] = "run"
    seed: Annotated[int, Field(ge=0)] = 0
    model: ModelSpec = Field(default_factory=lambda: ZooSpec(name="vit-fmnist"))
    data: DataConfig = Field(default_factory=DataConfig)
    stages: list[Stage] = Field(default_factory=lambda: [EvaluateStage()])
    output: OutputConfig = Field(default_factory=OutputConfig)
    max_loss: LossBudget = Field(default_factory=LossBudget)  # per stage, vs its input

    def output_dir(self) -> Path:
        """The output folder with ``{name}`` filled in."""
        from slimformer.store.outdir import format_dir

        return Path(format_dir(self.output.dir, name=self.name))

    def slow_settings(self) -> list[str]:
        """Quantize settings that make a later export slow on its target (checked up front).

        E.g. a log-sqrt2 softmax exported for a CPU target: one line per setting, naming the
        two stages (:func:`slimformer.export.targets.config_slow_settings`).
        """
        from slimformer.export.targets import config_slow_settings

        out, quant = [], None
        for i, st in enumerate(self.stages):
            if st.type == "quantize":
                quant = (i, st.quant_config())
            elif st.type == "export" and quant is not None:
                out += [f"stages[{quant[0]}] (quantize) -> stages[{i}] (export, target "
                        f"{st.target}): {w}"
                        for w in config_slow_settings(quant[1], st.onnx_config())]
        return out

    def code_it_runs(self) -> list[str]:
        """Factories (``package.module:function``) this recipe imports and calls, if any."""
        from slimformer.models.spec import FactorySpec

        return [self.model.factory] if isinstance(self.model, FactorySpec) else []


def parse_recipe(data: object, source: str = "recipe") -> Recipe:
    """Validate a mapping (e.g. from YAML) into a :class:`Recipe`; raises :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): must be a mapping, got {type(data).__name__}"], source)
    version = data.get("version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise ConfigError([f"version: this slimformer reads recipe version {RECIPE_VERSION}, "
                           f"got {version!r}"], source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, Recipe), source) from None
    problems = _cross_checks(recipe)
    if problems:
        raise ConfigError(problems, source)
    return recipe


def _cross_checks(recipe: Recipe) -> list[str]:
    problems = []
    from slimformer.stages.taskquality import DEFAULT_DATA

    task_data = DEFAULT_DATA.get(getattr(recipe.model, "task", None))  # a task's own test text
    if not isinstance(recipe.model, ZooSpec) and recipe.data.dataset is None and task_data is None \
            and not recipe.data.own and any(s.type == "evaluate" for s in recipe.stages):
        problems.append("data: a model that is not from the zoo needs data: data.source (your "
                        "own file or folder) or data.dataset, one of: "
                        f"{', '.join(DATASET_NAMES)}")
    if recipe.data.source is not None and (recipe.data.calib or recipe.data.eval):
        problems.append("data.source: give either one source (split into calibration and "
                        "evaluation rows) or data.calib / data.eval, not both")
    seen_quantize = False  # the stages' order rules: slimformer.stages.HANDLERS
    for i, st in enumerate(recipe.stages):
        rules = HANDLERS[st.type]
        if seen_quantize and rules.after_quantized:
            problems.append(f"stages[{i}]: {rules.after_quantized}")
        if rules.needs_quantized and not seen_quantize and \
                not isinstance(recipe.model, ArtifactSpec):  # a folder: checked when loaded
            problems.append(f"stages[{i}]: {rules.needs_quantized}")
        seen_quantize |= rules.quantizes
    return problems


MAX_RECIPE_BYTES = 1_000_000


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe YAML file (bounded size and alias expansion, ``yaml.safe_load``), validate it.

    Raises:
        ConfigError: Missing, unreadable, too large, not UTF-8, not YAML, or invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"file {path} does not exist" + (" (it is a folder)" if path.is_dir()
                                                            else "")], "recipe")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise ConfigError([f"file is {size:,} bytes; a recipe may be at most "
                               f"{MAX_RECIPE_BYTES:,} bytes"], str(path))
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or exc}"], str(path)) from None
    return parse_recipe(safe_load_bounded(raw, str(path)), str(path))
