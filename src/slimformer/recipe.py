"""The recipe schema: YAML -> typed, versioned objects, all problems reported at once.

A recipe names a model, the data, an ordered list of stages and where to write the report::

    version: 1
    model: {source: zoo, name: vit-fmnist}
    data: {dataset: fashion-mnist, eval_limit: 2000}
    stages:
      - {type: evaluate, latency_batch_sizes: [1, 32]}
      - {type: quantize, method: repq, weight_bits: 4, act_bits: 4}
      - {type: evaluate}
    output: {dir: runs/quickstart}

Stages are a tagged union on ``type``; the compression stages (quantize, prune, search, export,
hls) join the union as their issues land, each with a handler in :mod:`slimformer.pipeline`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimformer.data.source_spec import DataSource
from slimformer.errors import ConfigError, SlimformerError
from slimformer.export.config import OnnxConfig, TensorRTConfig
from slimformer.hardware.config import HlsConfig
from slimformer.models.spec import ModelSpec, ZooSpec
from slimformer.nas.config import SearchConfig
from slimformer.prune.config import PruneConfig
from slimformer.quantize.config import QuantConfig
from slimformer.validation import NAME_PATTERN, format_errors, safe_load_bounded

RECIPE_VERSION = 1
DATASET_NAMES = ("fashion-mnist", "vader-movie", "trec", "digits-seq")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Evaluation and calibration data: a built-in data set, or the user's own.

    ``dataset`` names a built-in set (default: the zoo model's own). ``source`` is the user's
    own data (a path, or a mapping with options: see :mod:`slimformer.data.sources`), split by
    ``seed`` into ``calib_rows`` calibration rows and the rest for evaluation, never
    overlapping; ``calib`` / ``eval`` name separate sources instead. Training stages (prune,
    search) use the calibration rows of a user's source. ``data: mine.csv`` is short for
    ``data: {source: mine.csv}``.
    """

    dataset: str | None = None  # default: the zoo model's own data set
    source: DataSource | None = None
    calib: DataSource | None = None
    eval: DataSource | None = None
    calib_rows: Annotated[int, Field(ge=1)] = 256
    eval_split: Literal["test", "train", "calib"] = "test"
    eval_limit: Annotated[int, Field(ge=1)] | None = None
    calib_split: Literal["calib", "train"] = "calib"
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 256

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        if isinstance(v, str) or (isinstance(v, dict) and ("path" in v or "kind" in v)):
            return {"source": v}
        return v

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in DATASET_NAMES:
            raise ValueError(f"unknown data set {v!r}; built-in ones: {', '.join(DATASET_NAMES)}"
                             "; for your own data give data.source (a file or folder)")
        return v

    @property
    def own(self) -> bool:
        """Whether any of the user's own sources is given."""
        return any(x is not None for x in (self.source, self.calib, self.eval))


class EvaluateStage(_Strict):
    """Measure the model as it stands: metric, agreement with the input model, latency, size."""

    type: Literal["evaluate"] = "evaluate"
    latency_batch_sizes: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        default_factory=lambda: [1, 32])
    latency_repeats: Annotated[int, Field(ge=1, le=1000)] = 20


class QuantizeStage(QuantConfig):
    """Post-training quantization (see :class:`~slimformer.quantize.config.QuantConfig`).

    The model that later stages see is the quantized one, in inference form; with ``save`` it is
    also written to ``<output>/quantized/``.
    """

    type: Literal["quantize"] = "quantize"
    save: bool = True

    def quant_config(self) -> QuantConfig:
        """The plain config, without the stage fields."""
        return QuantConfig(**self.model_dump(exclude={"type", "save"}))


class PruneStage(PruneConfig):
    """Structured pruning (see :class:`~slimformer.prune.config.PruneConfig`).

    Searches and fine-tunes on the data set's train split; later stages see the smaller model
    (its structure rediscovered). With ``save`` it is written to ``<output>/pruned/``. Must come
    before quantization.
    """

    type: Literal["prune"] = "prune"
    save: bool = True

    def prune_config(self) -> PruneConfig:
        """The plain config, without the stage fields."""
        return PruneConfig(**self.model_dump(exclude={"type", "save"}))


class SearchStage(SearchConfig):
    """Multi-objective search over sub-networks and bit-widths (see ``SearchConfig``).

    ``val_rows`` rows drawn from the train split (seeded) measure sub-networks (the rest
    fine-tunes the super-network); later stages see the chosen sub-network, quantized, in inference form. The
    default study name is the recipe's name.
    """

    type: Literal["search"] = "search"
    val_rows: Annotated[int, Field(ge=10)] = 1000
    save: bool = True

    def search_config(self) -> SearchConfig:
        """The plain config, without the stage fields."""
        return SearchConfig(**self.model_dump(exclude={"type", "val_rows", "save"}))


class HlsStage(HlsConfig):
    """An hls4ml FPGA project of the current model (see ``HlsConfig``); written to ``<output>/hls/``.

    The project is compiled and C-simulated on the evaluation data unless ``csim`` is false.
    """

    type: Literal["hls"] = "hls"
    csim: bool = True

    def hls_config(self) -> HlsConfig:
        """The plain config, without the stage fields."""
        return HlsConfig(**self.model_dump(exclude={"type", "csim"}))


class ExportStage(OnnxConfig):
    """Export the current model (float or quantized) to ONNX, optionally a TensorRT engine.

    Writes ``<output>/export/model.onnx`` (QDQ when quantized); records ONNX Runtime parity,
    accuracy and agreement on the evaluation data, latency per batch size, file size, which
    matmuls ONNX Runtime runs in integer kernels, and the TensorRT QDQ lint. With
    ``tensorrt``, also builds ``model.plan`` where ``import tensorrt`` works, and always writes the
    equivalent ``trtexec`` command to ``export/model.plan.trtexec.sh``.
    """

    type: Literal["export"] = "export"
    example_rows: Annotated[int, Field(ge=1, le=256)] = 2
    evaluate: bool = True
    latency_batch_sizes: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        default_factory=lambda: [1, 32])
    latency_repeats: Annotated[int, Field(ge=1, le=1000)] = 20
    tensorrt: TensorRTConfig | None = None

    def onnx_config(self) -> OnnxConfig:
        """The plain ONNX config, without the stage fields."""
        return OnnxConfig(**self.model_dump(include=set(OnnxConfig.model_fields)))


Stage = Annotated[EvaluateStage | QuantizeStage | PruneStage | SearchStage | HlsStage | ExportStage,
                  Field(discriminator="type")]
STAGE_TYPES = ("evaluate", "quantize", "prune", "search", "hls", "export")


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
        from slimformer.report.outdir import format_dir

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

    def output_dir(self) -> Path:
        """The output folder with ``{name}`` filled in."""
        from slimformer.report.outdir import format_dir

        return Path(format_dir(self.output.dir, name=self.name))

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
    if not isinstance(recipe.model, ZooSpec) and recipe.data.dataset is None and \
            not recipe.data.own and any(s.type == "evaluate" for s in recipe.stages):
        problems.append("data: a model that is not from the zoo needs data: data.source (your "
                        "own file or folder) or data.dataset, one of: "
                        f"{', '.join(DATASET_NAMES)}")
    if recipe.data.source is not None and (recipe.data.calib or recipe.data.eval):
        problems.append("data.source: give either one source (split into calibration and "
                        "evaluation rows) or data.calib / data.eval, not both")
    seen_quantize = False
    for i, st in enumerate(recipe.stages):
        if st.type in ("quantize", "search"):  # search quantizes the chosen sub-network
            if seen_quantize:
                problems.append(f"stages[{i}]: the model is quantized already (one quantize "
                                "stage per recipe)")
            seen_quantize = True
        if st.type == "prune" and seen_quantize:
            problems.append(f"stages[{i}]: prune must come before quantize/search: a quantized "
                            "model cannot be pruned (put the prune stage first)")
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
