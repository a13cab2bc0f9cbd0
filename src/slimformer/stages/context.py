"""What every stage shares: the run context, the run's data by role, and fitting checks.

A stage handler takes a :class:`RunContext` and its stage config and returns a
:class:`~slimformer.report.model.StageRecord`; the context holds the current model (each stage
may replace it), its structure, the data and what is written to the output folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slimformer.data.source_spec import BUILTIN_NAMES, DataSource
from slimformer.errors import DataError
from slimformer.report.model import StageRecord

if TYPE_CHECKING:  # the schemas stay torch-free: recipes validate without importing torch
    import torch

    from slimformer.data.datasets import TensorDictDataset
    from slimformer.models.loading import LoadedModel
    from slimformer.models.spec import ModelSpec
    from slimformer.models.structure import StructureMap
    from slimformer.prune.slicing import SliceSpec

# progress(description, completed, total): called by long steps; None = silent.
Progress = Callable[[str, int, int], None]
DATASET_NAMES = BUILTIN_NAMES


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
    val: DataSource | None = None  # rows a search measures sub-networks on (default: see RunData)
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


@dataclass
class RunContext:
    """What stages share: the current model, its structure, the data and reference predictions."""

    name: str  # the run's name (default study name of a search)
    model_spec: ModelSpec  # the base model's spec (saved with artifacts)
    batch_size: int
    model: torch.nn.Module
    loaded: LoadedModel  # the base model as loaded (its spec, inputs, task, folder)
    structure: StructureMap  # sites of the current model
    eval_data: TensorDictDataset | None  # None: no data (RunData.eval_rows)
    reference_preds: torch.Tensor | None = None
    progress: Progress | None = None
    records: list[StageRecord] = field(default_factory=list)
    artifacts: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # dir -> writer
    slice_spec: SliceSpec | None = None  # set by a prune stage: how the base model was sliced
    history: list[dict] = field(default_factory=list)  # applied model-changing stages (manifest)
    data: RunData | None = None
    staging: Path | None = None  # the output folder being built (swapped in when complete)
    out: Path | None = None  # the output folder (its state/ sub-folder holds resumable state)
    # stages.quality.Quality of the current model (kept, not redone); typed object because
    # stages.quality imports this module (a sibling cycle even under TYPE_CHECKING)
    measured: object = None
    task_cache: dict = field(default_factory=dict)  # the float model's task results (taskquality)

    def state_dir(self, name: str, config=None) -> Path:
        """``<output>/state/<name>[/<key>]/``: journals and checkpoints that survive a failed run.

        With ``config`` (a pydantic model, or a string: the settings' own fingerprint) the folder
        is keyed by it and the base model's spec, so a rerun with other settings starts afresh
        instead of meeting another run's state.
        """
        import hashlib

        from slimformer.store.outdir import state_dir

        folder = state_dir(self.out) / name
        if config is not None:
            spec = self.model_spec.model_dump_json() if hasattr(self.model_spec, "model_dump_json") \
                else str(self.model_spec)
            text = config if isinstance(config, str) else config.model_dump_json()
            key = hashlib.sha256((text + spec).encode()).hexdigest()[:12]
            folder = folder / key
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def artifact_dir(self, name: str) -> Path:
        """A sub-folder ``name`` of the output being built, for a stage to write into."""
        if self.staging is None:  # pragma: no cover - run() always sets it
            raise RuntimeError("no output folder is being written")
        folder = self.staging / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def _fit_length(source, model):
    """A text source's ``max_length`` within ``model``'s positions (default min(128, them)).

    Raises:
        DataError: The source asks for more tokens than the model has positions.
    """
    from slimformer.data.sources import parse_source
    from slimformer.models.loading import max_positions

    spec = source if hasattr(source, "model_fields_set") else parse_source(source)
    limit = max_positions(model)
    if limit is None or "max_length" not in type(spec).model_fields:
        return spec
    if "max_length" not in spec.model_fields_set:
        return spec.model_copy(update={"max_length": min(spec.max_length, limit)})
    if spec.max_length > limit:
        raise DataError(f"{spec.path}: max_length {spec.max_length} is more tokens than the model "
                        f"has positions ({limit}, its config's position table); give max_length "
                        f"<= {limit}")
    return spec


class RunData:
    """The rows a run uses, by role: ``eval``, ``calib`` and ``train``, checked against the model.

    Built-in data set: its eval / calib / train splits. The user's own ``source``: one seeded
    split into ``calib_rows`` calibration rows and the rest for evaluation (never overlapping);
    training stages use the calibration rows. A run none of whose stages reads calibration or
    training rows (``calibrates`` False: evaluate, export, generate; the stages' table
    :data:`slimformer.stages.HANDLERS` says which do) evaluates every row of the
    source instead, unless its task fits a probe / k-NN bank on them
    (:data:`~slimformer.stages.taskquality.TRAIN_ROWS`).
    ``calib`` / ``eval`` sources replace either role. Without any data (``available`` False: no
    own source, no built-in set) every role raises the DataError that says what to give.
    """

    def __init__(self, loaded, cfg, seed: int = 0, calibrates: bool = True,
                 needs_data: bool = True):
        """``needs_data`` False: every stage also runs without data (see :meth:`eval_rows`)."""
        self.loaded, self.cfg, self.seed = loaded, cfg, seed
        from slimformer.stages.taskquality import DEFAULT_DATA, TRAIN_ROWS

        task = getattr(loaded, "task", None)
        self.builtin = cfg.dataset or loaded.dataset or (
            None if cfg.own else DEFAULT_DATA.get(task))
        self.available = cfg.own or self.builtin is not None
        self.needs_data = needs_data
        self.whole = not calibrates and task not in TRAIN_ROWS  # a source is not split
        self._cache: dict[str, object] = {}
        self.notes: list[str] = []  # what the report should say about the data (label numbering)

    def eval_rows(self):
        """The evaluation rows; None without data where every stage runs without it.

        Raises:
            DataError: No data, and a stage that needs it.
        """
        return self.get("eval") if self.available or self.needs_data else None

    @staticmethod
    def missing() -> DataError:
        """The error of a run that needs rows and has none."""
        return DataError("no data: this model has no built-in data set; give your own (recipe "
                         "data.source, CLI --data PATH: a CSV/TSV/JSONL/text file, an image "
                         "folder, a datasets folder or parquet file, .safetensors/.npz) or a "
                         "built-in one")

    @property
    def label(self) -> str:
        """What the report calls the data."""
        if not self.available:
            return "none (synthetic example inputs)"
        c = self.cfg
        own = [f"{role} {getattr(getattr(c, role), 'path', None) or getattr(c, role).name}"
               for role in ("source", "calib", "eval") if getattr(c, role) is not None]
        return ", ".join(own) if own else str(self.builtin)

    def _folder(self) -> Path | None:
        """The Hugging Face folder the model was loaded from (an HF folder, a real zoo model)."""
        folder = getattr(self.loaded, "folder", None)
        if folder is None and getattr(self.loaded.spec, "source", None) == "hf_dir":
            folder = getattr(self.loaded.spec, "path", None)
        return Path(folder) if folder is not None else None

    def tokenizer(self) -> str | None:
        """The model's own Hugging Face folder when it holds a tokenizer (for built-in text)."""
        path = self._folder()
        names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
        return str(path) if path and any((path / n).is_file() for n in names) else None

    def processor(self) -> str | None:
        """The model's own Hugging Face folder when it holds an image processor config.

        Built-in image sets (Fashion-MNIST) are then prepared by that processor (RGB, resized,
        cropped, normalized as the model was trained), see :func:`~slimformer.data.datasets.get_dataset`.
        """
        from slimformer.data.processor import has_processor

        path = self._folder()
        return str(path) if has_processor(path) else None

    def _builtin(self, split: str, **rows):
        """Split ``split`` of the built-in set, prepared for the model (``rows``: limit, sample)."""
        from slimformer.data.datasets import get_dataset

        spec = next(iter(self.loaded.input_specs.values()), None)
        shape = getattr(spec, "shape", None) or ()
        channels = shape[1] if len(shape) == 4 and shape[1] in (1, 3) else 3
        return get_dataset(self.builtin, split, tokenizer=self.tokenizer(),
                           processor=self.processor(), channels=channels, **rows)

    def eval_limit(self) -> int | None:
        """Evaluation rows: ``data.eval_limit``, else the task's default (:data:`EVAL_ROWS`)."""
        from slimformer.stages.taskquality import EVAL_ROWS

        return self.cfg.eval_limit or EVAL_ROWS.get(getattr(self.loaded, "task", None))

    def sample(self, role: str, rows: int):
        """``rows`` rows of ``role`` drawn with seed 0 (all when fewer), in their order, once.

        Of a built-in set only these rows are prepared (an image processor's 224x224 RGB
        Fashion-MNIST would not fit in memory whole).
        """
        key = f"{role}/{rows}"
        if key in self._cache:
            return self._cache[key]
        c = self.cfg
        given = c.eval if role == "eval" else c.calib
        if given is None and c.source is None and self.builtin is not None and role != "eval":
            split = c.calib_split if role == "calib" else "train"
            ds = self._builtin(split, sample=rows)
            self._note(check_fit(self.loaded, ds, self.builtin))
        else:
            from slimformer.data.datasets import seeded_rows

            full = self.get(role)
            ds = full.select(seeded_rows(len(full), rows))
        self._cache[key] = ds
        return ds

    def _load(self, source):
        from slimformer.data.sources import load_source

        m = self.loaded
        model_dir = getattr(m.spec, "path", None) or self._folder()  # a real zoo model's folder
        import inspect

        accepts = list(inspect.signature(m.module.forward).parameters)
        return load_source(_fit_length(source, m.module), m.input_specs, model_dir,
                           accepts=accepts)

    def _split(self):
        from slimformer.data.sources import split_source

        if "split" not in self._cache:
            full = self._load(self.cfg.source)
            rows = min(self.cfg.calib_rows, max(1, len(full) // 2))
            self._cache["split"] = split_source(full, rows, self.seed)
        return self._cache["split"]

    def validation(self, rows: int, seed: int = 0):
        """``(rows the model was not trained on, where they come from)`` for a search.

        ``data.val`` when given; else ``rows`` rows (seeded) of the test split that the
        evaluation does not use, or, when the evaluation uses it all, of the evaluation rows
        (said in the note: they then overlap the rows the chosen model is evaluated on).
        """
        import torch

        if self.cfg.val is not None:
            ds = self._load(self.cfg.val)
            self._note(check_fit(self.loaded, ds, self._where(self.cfg.val)))
            return ds, f"{len(ds)} rows of {getattr(self.cfg.val, 'path', self.cfg.val)}"
        c = self.cfg
        if c.source is None and c.eval is None and self.builtin is not None:
            full, what = self._builtin(c.eval_split), f"the {c.eval_split} split"
        else:
            full, what = self.get("eval"), "the evaluation rows"
        used = len(self.get("eval")) if full is not self.get("eval") else len(full)
        gen = torch.Generator().manual_seed(seed)
        spare = torch.arange(used, len(full))
        if len(spare) >= rows:
            idx, note = spare[torch.randperm(len(spare), generator=gen)[:rows]], \
                f"{rows} rows of {what} the evaluation does not use (seed {seed})"
        else:
            n = min(rows, len(full))
            idx = torch.randperm(len(full), generator=gen)[:n]
            note = (f"{n} rows of {what} (seed {seed}); the model was not trained on them, but "
                    "they overlap the evaluation rows (give data.val or a smaller "
                    "data.eval_limit to keep them apart)")
        ds = full.select(idx.sort().values)
        self._note(check_fit(self.loaded, ds, what))
        return ds, note

    def get(self, role: str):
        """The data set for ``role`` (``eval``, ``calib`` or ``train``), loaded once, checked."""
        if role in self._cache:
            return self._cache[role]
        if not self.available:
            raise self.missing()
        c = self.cfg
        given = c.eval if role == "eval" else c.calib
        if given is not None:
            ds = self._load(given)
        elif c.source is not None and self.whole:
            if role != "eval":  # stages.HANDLERS' calibrates is out of date
                raise RuntimeError(f"{role} rows asked of a run declared not to calibrate: "
                                   "every row of data.source is evaluated")
            ds = self._load(c.source)
        elif c.source is not None:
            ds = self._split()[1 if role == "eval" else 0]
        elif self.builtin is None:
            raise DataError(f"no {role} data: give data.{'eval' if role == 'eval' else 'calib'}")
        elif role == "eval":  # only the rows evaluated are prepared
            ds = self._builtin(c.eval_split, limit=self.eval_limit())
        else:
            ds = self._builtin(c.calib_split if role == "calib" else "train")
        limit = self.eval_limit() if role == "eval" else None
        if limit is not None and limit < len(ds):
            import torch

            ds = ds.select(torch.arange(limit))
        if role == "eval" and c.eval_limit is None and limit is not None and len(ds) == limit:
            self._note(f"evaluated on the first {limit} rows, the default of task "
                       f"{self.loaded.task} (bounded time); give --limit / data.eval_limit "
                       "for more")
        self._note(check_fit(self.loaded, ds, self._where(given or c.source or self.builtin)))
        self._cache[role] = ds
        return ds

    @staticmethod
    def _where(source) -> str:
        return str(getattr(source, "path", None) or getattr(source, "name", None) or source)

    def _note(self, note: str | None) -> None:
        if note and note not in self.notes:
            self.notes.append(note)


def evaluate_model(model: torch.nn.Module, dataset, batch_size: int = 256,
                   progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and labels of ``model`` on ``dataset`` (a progress bar via ``progress``)."""
    from slimformer.data.datasets import make_loader
    from slimformer.models.evaluate import predict

    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress("evaluate", done[0], len(dataset))

    return predict(model, make_loader(dataset, batch_size), tick)


def check_fit(loaded, dataset, where: str = "data") -> str | None:
    """Fail early, with shapes, when the data's inputs or labels do not match the model's.

    A data set with one input feeds a model with one input whatever their names (the data set's
    key is renamed in place); otherwise the names must match. Labels are numbered in the model's
    class order and checked against its classes (:func:`slimformer.models.labels.check_labels`).

    Returns:
        A note for the report when class names were numbered alphabetically, else ``None``.
    """
    import inspect

    expected, have = list(loaded.input_specs), list(dataset.inputs)
    accepts = set(expected) | set(inspect.signature(loaded.module.forward).parameters)
    if len(expected) == 1 and len(have) == 1 and expected != have:
        dataset.inputs = {expected[0]: dataset.inputs[have[0]]}
    elif not set(have) <= accepts:
        raise DataError(f"data provides inputs {sorted(have)} but the model takes "
                        f"{sorted(expected)}")
    import torch

    from slimformer.models.evaluate import run_batch
    from slimformer.models.labels import check_labels

    with torch.no_grad():
        run_batch(loaded.module, {k: v[:2] for k, v in dataset.inputs.items()})
    return check_labels(loaded.module, dataset, getattr(loaded, "dataset", None), where)
