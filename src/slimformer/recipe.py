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

from slimformer.errors import ConfigError, SlimformerError
from slimformer.export.config import OnnxConfig, TensorRTConfig
from slimformer.hardware.config import HlsConfig
from slimformer.models.spec import ModelSpec, ZooSpec
from slimformer.nas.config import SearchConfig
from slimformer.prune.config import PruneConfig
from slimformer.quantize.config import QuantConfig

RECIPE_VERSION = 1
NAME_PATTERN = r"^[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*$"
_PATTERN_WORDS = {NAME_PATTERN: "must be letters, digits, '_', '.' and '-' only, and not only dots"}
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
        if kind == "union_tag_not_found":  # pydantic's words for a missing tag field
            msg = _missing_tag(root, loc, err.get("ctx", {}))
        elif kind == "union_tag_invalid":
            msg = _bad_tag(err.get("ctx", {}))
        elif kind == "string_pattern_mismatch":
            msg = _PATTERN_WORDS.get(err.get("ctx", {}).get("pattern"), msg)
        got = err.get("input")
        show = kind not in ("missing", "union_tag_not_found", "union_tag_invalid") and \
            not isinstance(got, dict | list)
        lines.append(f"{_path(loc)}: {msg}" + (f", got {short_repr(got)}" if show else ""))
    return lines


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters (errors never echo huge values)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = limit, limit, 6, 6, 2
    text = r.repr(value)
    return text if len(text) <= limit + 10 else f"{text[:limit]}...({len(text)} chars)"


def _missing_tag(root, loc: tuple, ctx: dict) -> str:
    field = ctx.get("discriminator", "").strip("'") or "source"
    tags = ", ".join(_tags_of(root, loc, field))
    return f"{field} is missing; it must be one of: {tags}" if tags else f"{field} is missing"


def _bad_tag(ctx: dict) -> str:
    field = ctx.get("discriminator", "").strip("'")
    expected = ctx.get("expected_tags", "")
    return f"unknown {field} {ctx.get('tag')!r}; allowed: {expected}"


def _tags_of(root, loc: tuple, field: str) -> list[str]:
    """The allowed values of the tag ``field`` of the union at ``loc`` under ``root``."""
    if field == "type":
        return list(STAGE_TYPES)
    from slimformer.models.spec import ModelSpec

    out = []
    for a in typing.get_args(ModelSpec):
        for b in typing.get_args(a) or (a,):
            fld = getattr(b, "model_fields", {}).get(field)
            if fld is not None:
                out += list(typing.get_args(fld.annotation))
    return out


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


MAX_RECIPE_BYTES = 1_000_000
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64


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


def safe_load_bounded(raw: bytes | str, source: str = "YAML") -> object:
    """``yaml.safe_load`` that refuses huge alias expansion or nesting before building values.

    The YAML is composed into nodes first; expanding every alias is counted (at most
    :data:`MAX_YAML_NODES` nodes, :data:`MAX_YAML_DEPTH` levels) before any value is built.

    Raises:
        ConfigError: Not UTF-8, not YAML, or over the bounds.
    """
    import yaml

    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError([f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                               f"{exc.start}); save the file as UTF-8"], source) from None
    loader = yaml.SafeLoader(raw)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {short_repr(str(exc), 300)}"], source) from None
    except RecursionError:
        raise ConfigError([f"nesting deeper than {MAX_YAML_DEPTH} levels"], source) from None
    finally:
        loader.dispose()


def _check_size(root, source: str) -> None:
    import yaml

    count, stack = 0, [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise ConfigError([f"more than {MAX_YAML_NODES:,} values once aliases are expanded "
                               "(an alias bomb?); a recipe is far smaller"], source)
        if depth > MAX_YAML_DEPTH:
            raise ConfigError([f"nested deeper than {MAX_YAML_DEPTH} levels"], source)
        if isinstance(node, yaml.SequenceNode):
            stack += [(n, depth + 1) for n in node.value]
        elif isinstance(node, yaml.MappingNode):
            stack += [(n, depth + 1) for kv in node.value for n in kv]
