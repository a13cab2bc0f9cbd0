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

import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slimformer.errors import ConfigError
from slimformer.export.config import OnnxConfig, TensorRTConfig
from slimformer.hardware.config import HlsConfig
from slimformer.models.spec import ModelSpec, ZooSpec
from slimformer.nas.config import SearchConfig
from slimformer.prune.config import PruneConfig
from slimformer.quantize.config import QuantConfig

RECIPE_VERSION = 1
DATASET_NAMES = ("fashion-mnist", "vader-movie", "trec", "digits-seq")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Evaluation and calibration data: a built-in data set and how much of it to use."""

    dataset: str | None = None  # default: the zoo model's own data set
    eval_split: Literal["test", "train", "calib"] = "test"
    eval_limit: Annotated[int, Field(ge=1)] | None = None
    calib_split: Literal["calib", "train"] = "calib"
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 256

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in DATASET_NAMES:
            raise ValueError(f"unknown data set {v!r}; built-in ones: {', '.join(DATASET_NAMES)}")
        return v


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
    """Where the run writes ``report.{json,md,html}``."""

    dir: str = "runs/{name}"


class Recipe(_Strict):
    """A whole run: model, data, stages in order, output."""

    version: Literal[1] = RECIPE_VERSION
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] = "run"
    seed: Annotated[int, Field(ge=0)] = 0
    model: ModelSpec = Field(default_factory=lambda: ZooSpec(name="vit-fmnist"))
    data: DataConfig = Field(default_factory=DataConfig)
    stages: list[Stage] = Field(default_factory=lambda: [EvaluateStage()])
    output: OutputConfig = Field(default_factory=OutputConfig)

    def output_dir(self) -> Path:
        """The output folder with ``{name}`` filled in."""
        return Path(self.output.dir.format(name=self.name))


_TAGS = {"zoo", "hf_dir", "hf_config", "timm", "factory", *STAGE_TYPES}


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TAGS or "[" in str(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _allowed(root: type[BaseModel], loc: tuple) -> list[str] | None:
    cls: object = root
    for part in loc:
        if isinstance(part, int):
            args = typing.get_args(cls)
            cls = args[0] if args else cls
        elif isinstance(cls, type) and issubclass(cls, BaseModel) and part in cls.model_fields:
            cls = cls.model_fields[part].annotation
        else:
            cls = _pick_tag(cls, part)
        while typing.get_origin(cls) in (Annotated, list) or typing.get_origin(cls) is typing.Union:
            args = [a for a in typing.get_args(cls) if a is not type(None)]
            if typing.get_origin(cls) is typing.Union or len(args) != 1:
                break
            cls = args[0]
    return sorted(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _pick_tag(cls, tag):
    for a in typing.get_args(cls) or ():
        for b in typing.get_args(a) or (a,):
            if isinstance(b, type) and issubclass(b, BaseModel):
                for f in ("source", "type"):
                    fld = b.model_fields.get(f)
                    if fld is not None and tag in typing.get_args(fld.annotation):
                        return b
    return cls


def format_errors(exc: ValidationError, root: type[BaseModel] | None = None) -> list[str]:
    """One ``path: message, got value`` line per pydantic error."""
    lines = []
    for err in exc.errors(include_url=False):
        loc, kind = tuple(err["loc"]), err["type"]
        if kind == "extra_forbidden":
            allowed = _allowed(root, loc[:-1]) if root else None
            tail = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{_path(loc)}: unknown key{tail}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        show = kind not in ("missing",) and not isinstance(got, dict)
        lines.append(f"{_path(loc)}: {msg}" + (f", got {got!r}" if show else ""))
    return lines


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
    if not isinstance(recipe.model, ZooSpec) and recipe.data.dataset is None and any(
            s.type == "evaluate" for s in recipe.stages):
        problems.append("data.dataset: required to evaluate a model that is not from the zoo; "
                        f"built-in ones: {', '.join(DATASET_NAMES)}")
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


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe YAML file with ``yaml.safe_load`` and validate it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"file {path} does not exist"], "recipe")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    return parse_recipe(data, str(path))
