"""Typed specs of the user's own data sources (torch-free: recipes validate without torch).

See :mod:`slimformer.data.sources` for loading them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from slimformer.errors import ConfigError
from slimformer.store.limits import MAX_IMAGE_SIZE

# the names of data.datasets.DATASETS
BUILTIN_NAMES = ("fashion-mnist", "vader-movie", "trec", "nyt-editorials", "digits-seq")
TEXT_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".txt": "txt"}
TABLE_SUFFIXES = (".parquet", ".arrow")
TENSOR_SUFFIXES = (".safetensors", ".npz")
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class InputLike(Protocol):
    """What the data layer needs of a model input spec (``slimformer.models.spec.InputSpec``)."""

    shape: list[int]
    dtype: str
    high: int | None


_Side = Annotated[int, Field(ge=1, le=MAX_IMAGE_SIZE)]  # pixels


class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuiltinData(_Source):
    """A built-in data set (``slimformer data list``) and one of its splits."""

    kind: Literal["builtin"] = "builtin"
    name: str
    split: str = "test"


class ImageFolderData(_Source):
    """A folder of images: class sub-folders or flat (no labels).

    Folder names are numbered by ``classes`` (the model's class order), else by the model's own
    class names, else alphabetically (:mod:`slimformer.data.labels`).

    Preprocessing: explicit ``mean`` and ``std`` (with ``size`` or the model's input size) if
    given, else the image processor config (``preprocessor_config.json``) of ``processor`` or of
    the model's directory.
    """

    kind: Literal["images"] = "images"
    path: str
    size: _Side | tuple[_Side, _Side] | None = None  # (height, width)
    mean: list[float] | None = Field(None, min_length=1, max_length=4)
    std: list[Annotated[float, Field(gt=0)]] | None = Field(None, min_length=1, max_length=4)
    channels: Literal[1, 3] | None = None  # grey or RGB; default the model's input channels
    processor: str | None = None  # folder with preprocessor_config.json
    input: str | None = None  # model input name; default the model's only image-shaped input
    classes: list[str] | None = None  # the model's class order; default: the model's names


class _TextFields(_Source):
    text: str | None = None  # column; default "text" / "sentence", or the only column
    text_pair: str | None = None  # second column for sentence pairs
    label: str | Literal[False] | None = None  # column; None: "label"/"labels" if present
    classes: list[str] | None = None  # the model's class order of string labels (as images)
    tokenizer: str | None = None  # tokenizer folder; default the model's directory
    max_length: int = Field(128, ge=1, le=65536)
    padding: Literal["max_length", "longest"] = "max_length"


class TextFileData(_TextFields):
    """Text in CSV, TSV (header row), JSONL (one object a line) or plain text (one row a line)."""

    kind: Literal["text"] = "text"
    path: str
    format: Literal["csv", "tsv", "jsonl", "txt"] | None = None  # default from the suffix


class TableData(_TextFields):
    """A ``datasets.save_to_disk`` folder, a ``.parquet`` or ``.arrow`` file.

    Either a text column (tokenized as for :class:`TextFileData`) or ``inputs``: model input name
    -> column of numbers (lists for sequences), taken as they are.
    """

    kind: Literal["table"] = "table"
    path: str
    split: str | None = None  # for a saved DatasetDict
    inputs: dict[str, str] | None = None


class TensorFileData(_Source):
    """A ``.safetensors`` or ``.npz`` file: keys are model input names, plus ``label``'s key."""

    kind: Literal["tensors"] = "tensors"
    path: str
    label: str = "labels"


def _kind_of_path(path: str) -> str:
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in TABLE_SUFFIXES:
        return "table"
    if suffix in TENSOR_SUFFIXES:
        return "tensors"
    if p.is_dir():
        return "table" if any((p / m).is_file() for m in DATASETS_MARKERS) else "images"
    allowed = ", ".join([*TEXT_SUFFIXES, *TABLE_SUFFIXES, *TENSOR_SUFFIXES])
    if not p.exists():
        raise ValueError(f"data path {path!r} does not exist (a file {allowed}, an image folder "
                         f"or a datasets folder), and is no built-in data set "
                         f"({', '.join(sorted(BUILTIN_NAMES))})")
    raise ValueError(f"cannot tell the kind of data in {path!r} from its suffix {suffix!r}; "
                     f"allowed: {allowed}, a folder, or give kind: images|text|table|tensors")


def _infer_kind(value: Any) -> Any:
    if isinstance(value, (str, Path)):
        text = str(value)
        if text in BUILTIN_NAMES and not Path(text).exists():
            return {"kind": "builtin", "name": text}
        return {"kind": _kind_of_path(text), "path": text}
    if isinstance(value, Mapping) and "kind" not in value:
        if "path" in value and isinstance(value["path"], str):
            return {"kind": _kind_of_path(value["path"]), **value}
        if "name" in value:
            return {"kind": "builtin", **value}
        raise ValueError("a data source needs `path` (a file or folder) or `name` (a built-in "
                         "data set), or an explicit kind: builtin|images|text|table|tensors")
    return value


DataSource = Annotated[
    BuiltinData | ImageFolderData | TextFileData | TableData | TensorFileData,
    Field(discriminator="kind"), BeforeValidator(_infer_kind),
]
"""A data source in a recipe: a path string, or a mapping with ``path`` (or ``name``) and options."""

_ADAPTER = TypeAdapter(DataSource)


def parse_source(value: str | Path | Mapping) -> BuiltinData | ImageFolderData | TextFileData | \
        TableData | TensorFileData:
    """A typed source from a CLI path / built-in name or a recipe mapping; ConfigError if invalid."""
    try:
        return _ADAPTER.validate_python(value)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(x) for x in e['loc']) or 'data'}: "
                    f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        raise ConfigError(problems, source="data source") from None
