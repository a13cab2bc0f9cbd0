"""Rows of text files (CSV, TSV, JSONL, plain text) and tables (datasets folder, parquet, arrow).

Both are read into a :class:`Table` of columns that knows where each row came from, then encoded
into model inputs by :func:`encode`: a text column (or two) tokenized by the model's tokenizer,
or numeric columns taken as they are, plus an optional label column.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimformer.data.datasets import TensorDictDataset
from slimformer.data.source_spec import TEXT_SUFFIXES
from slimformer.errors import DataError
from slimformer.store import limits

TEXT_COLUMNS = ("text", "sentence")
LABEL_COLUMNS = ("label", "labels")


@dataclass
class Table:
    """Columns of equal length read from ``file``; ``lines`` are 1-based line numbers, if any."""

    file: str
    columns: dict[str, list]
    lines: list[int] | None = None
    classes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # class names per column

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def where(self, i: int) -> str:
        """``"mine.csv line 17"`` for text files, ``"data.parquet row 5"`` for tables."""
        return f"{self.file} line {self.lines[i]}" if self.lines is not None else f"{self.file} row {i + 1}"

    def column(self, name: str, role: str) -> list:
        """The values of column ``name``; DataError listing the columns there are."""
        if name not in self.columns:
            raise DataError(f"{self.file}: no {role} column {name!r}; its columns: "
                            f"{', '.join(map(repr, self.columns)) or 'none'}")
        return self.columns[name]


def read_text_file(spec, limit: int | None = None) -> Table:
    """Read a CSV / TSV (header row), JSONL (one object a line) or plain text file (one text a line).

    The file is streamed: reading stops after ``limit`` rows, and lines and the bytes read are
    bounded (:mod:`slimformer.store.limits`).
    """
    path = Path(spec.path)
    fmt = spec.format or TEXT_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: cannot tell the text format from the suffix {path.suffix!r}; give "
                        f"format: csv|tsv|jsonl|txt")
    size = limits.regular(path, "a text data file", DataError).stat().st_size
    if limit is None and size > limits.MAX_TEXT_BYTES:
        raise DataError(f"{path}: {size:,} bytes, over the text data limit of "
                        f"{limits.mib(limits.MAX_TEXT_BYTES)} "
                        f"(slimformer.store.limits.MAX_TEXT_BYTES); take fewer rows (--limit, "
                        f"limit:) or split the file")
    lines, cap = limits.read_lines(path, DataError), float("inf") if limit is None else limit
    try:
        if fmt in ("csv", "tsv"):
            table = _read_csv(str(path), lines, "," if fmt == "csv" else "\t", cap)
        elif fmt == "jsonl":
            table = _read_jsonl(str(path), lines, cap)
        else:
            rows = []
            for i, t in lines:
                t = t.rstrip("\r\n")
                if t.strip():
                    rows.append((i, t))
                    if len(rows) >= cap:
                        break
            table = Table(str(path), {"text": [t for _, t in rows]}, [i for i, _ in rows])
    finally:
        lines.close()
    if not len(table):
        raise DataError(f"{path}: no data rows")
    return table


def _read_csv(file: str, source, delimiter: str, limit) -> Table:
    reader = csv.reader((t for _, t in source), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{file}: empty, expected a header row naming the columns")
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup or any(not h.strip() for h in header):
            raise DataError(f"{file} line 1: the header needs unique, non-empty column names; got "
                            f"{header}")
        columns, lines, start = {h: [] for h in header}, [], reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{file} line {line}: {len(row)} fields, the header has {len(header)} "
                                f"({', '.join(header)})")
            for h, v in zip(header, row, strict=True):
                columns[h].append(v)
            lines.append(line)
            if len(lines) >= limit:  # stop before reading another line
                break
    except csv.Error as exc:
        raise DataError(f"{file} line {reader.line_num}: malformed {'CSV' if delimiter == ',' else 'TSV'} "
                        f"({exc})") from None
    return Table(file, columns, lines)


def _read_jsonl(file: str, source, limit) -> Table:
    records, numbers = [], []
    for i, line in source:
        if not line.strip():
            continue
        try:
            rec = limits.loads_json(line, f"{file} line {i}", DataError)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file} line {i}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{file} line {i}: expected a JSON object {{\"column\": value, ...}}, got "
                            f"{type(rec).__name__}")
        records.append(rec)
        numbers.append(i)
        if len(records) >= limit:
            break
    names = list(dict.fromkeys(k for r in records for k in r))
    return Table(file, {k: [r.get(k) for r in records] for k in names}, numbers)


def read_table(spec, limit: int | None = None) -> Table:
    """Read a ``save_to_disk`` folder (one split of a DatasetDict), a ``.parquet`` or ``.arrow`` file."""
    import pyarrow as pa

    path = Path(spec.path)
    classes: dict[str, tuple[str, ...]] = {}
    try:
        if path.is_dir():
            table, classes = _read_datasets_folder(path, spec.split, limit)
        elif path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            table = _read_arrow(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as a table ({type(exc).__name__}: {exc})") from None
    if limit is not None:
        table = table.slice(0, limit)
    if not table.num_rows:
        raise DataError(f"{path}: no data rows")
    return Table(str(path), table.to_pydict(), None, classes)


def _read_arrow(path: Path):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        return ipc.open_file(path).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as src:  # the streaming format, as datasets writes it
            return ipc.open_stream(src).read_all()


def _read_datasets_folder(path: Path, split: str | None, limit: int | None):
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise DataError(f"{path}: a DatasetDict with splits {', '.join(ds)}; give split: NAME"
                            + (f" (no split {split!r})" if split else ""))
        ds = ds[split]
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    classes = {k: tuple(f.names) for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
    return ds.with_format("arrow")[:], classes


def encode(table: Table, spec, model_dir, keep: set[str] | None) -> TensorDictDataset:
    """Model inputs (tokenized text or numeric columns) and labels of a table.

    Args:
        table: The rows read from the file.
        spec: A ``TextFileData`` or ``TableData``.
        model_dir: The model's Hugging Face directory (its tokenizer), if any.
        keep: Input names the model takes (extra tokenizer outputs outside it are dropped); ``None``
            keeps all.
    """
    label_col = _label_column(table, spec)
    inputs = getattr(spec, "inputs", None)
    if inputs is None and getattr(spec, "kind", "") == "table" and spec.text is None and keep:
        found = [c for c in table.columns if c in keep]
        if found and not any(c in table.columns for c in TEXT_COLUMNS):
            inputs = {c: c for c in found}
    if inputs:
        x = {name: _numeric(table, col) for name, col in inputs.items()}
    else:
        x = _tokenize(table, spec, model_dir, keep)
    labels, classes, numbered = (None, None, None) if label_col is None else \
        _labels(table, label_col, spec.classes)
    return TensorDictDataset(x, labels, classes, numbered)


def _text_column(table: Table, spec) -> str:
    if spec.text is not None:
        table.column(spec.text, "text")
        return spec.text
    for name in TEXT_COLUMNS:
        if name in table.columns:
            return name
    rest = [c for c in table.columns if c not in LABEL_COLUMNS and c != spec.label]
    if len(rest) == 1:
        return rest[0]
    raise DataError(f"{table.file}: which column is the text? give text: COLUMN; its columns: "
                    f"{', '.join(map(repr, table.columns))}")


def _label_column(table: Table, spec) -> str | None:
    if spec.label is False:
        return None
    if spec.label is not None:
        table.column(spec.label, "label")
        return spec.label
    return next((c for c in LABEL_COLUMNS if c in table.columns), None)


def _texts(table: Table, col: str) -> list[str]:
    out = table.column(col, "text")
    for i, v in enumerate(out):
        if v is None or (isinstance(v, str) and not v.strip()):
            raise DataError(f"{table.where(i)}: column {col!r} is empty")
        if not isinstance(v, str):
            raise DataError(f"{table.where(i)}: column {col!r} holds {type(v).__name__} {v!r}, not text")
    return out


def load_tokenizer(folder: str | Path):
    """A Hugging Face tokenizer from a local folder only, never running the folder's code."""
    from transformers import AutoTokenizer

    if not Path(folder).is_dir():
        raise DataError(f"tokenizer folder {folder} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot load a tokenizer from {folder}: {exc}") from None


def _tokenize(table: Table, spec, model_dir, keep: set[str] | None) -> dict[str, torch.Tensor]:
    folder = spec.tokenizer or model_dir
    if folder is None:
        raise DataError(f"{table.file}: text needs a tokenizer and the model is no Hugging Face "
                        f"folder; give tokenizer: FOLDER (one with tokenizer.json or vocab files)")
    tok = load_tokenizer(folder)
    first = _texts(table, _text_column(table, spec))
    pair = _texts(table, spec.text_pair) if spec.text_pair else None
    enc = tok(first, pair, padding=spec.padding, truncation=True, max_length=spec.max_length,
              return_tensors="pt")
    return {k: v.long() for k, v in enc.items() if k == "input_ids" or keep is None or k in keep}


def _numeric(table: Table, col: str) -> torch.Tensor:
    values = table.column(col, "input")
    shape = None
    for i, v in enumerate(values):
        if v is None:
            raise DataError(f"{table.where(i)}: column {col!r} is empty")
        s = torch.tensor(v).shape if not isinstance(v, str) else None
        if s is None:
            raise DataError(f"{table.where(i)}: column {col!r} holds text {v[:40]!r}; model inputs "
                            f"need numbers (or give text: {col})")
        if shape is not None and s != shape:
            raise DataError(f"{table.where(i)}: column {col!r} has shape {tuple(s)}, the rows before "
                            f"{tuple(shape)}")
        shape = s
    t = torch.tensor(values)
    if t.is_floating_point():
        bad = ~torch.isfinite(t.reshape(len(t), -1)).all(1)
        if bad.any():
            raise DataError(f"{table.where(int(bad.nonzero()[0]))}: column {col!r} holds NaN or inf")
        return t.float()
    return t.long()


def _labels(table: Table, col: str, classes: list[str] | None) \
        -> tuple[torch.Tensor, tuple | None, str | None]:
    """Labels ``(N,)``, class names and how names were numbered (``label_names``, see datasets)."""
    values = table.column(col, "label")
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and not v.strip()):
            raise DataError(f"{table.where(i)}: column {col!r} is empty")
        if isinstance(v, (float, bool, list, dict)) and not (isinstance(v, float) and v.is_integer()):
            raise DataError(f"{table.where(i)}: column {col!r} holds {v!r}; labels are class "
                            f"indices (0, 1, ...) or class names")
    named = tuple(classes) if classes is not None else table.classes.get(col)
    strs = [str(int(v)) if isinstance(v, (int, float)) else v.strip() for v in values]
    if all(s.lstrip("-").isdigit() for s in strs):
        y = torch.tensor([int(s) for s in strs], dtype=torch.long)
        bad = (y < 0) | (y >= len(named)) if named else y < 0
        if bad.any():
            i = int(bad.nonzero()[0])
            raise DataError(f"{table.where(i)}: column {col!r} holds class index {int(y[i])}; allowed: "
                            f"0 to {len(named) - 1 if named else 'any'}")
        return y, named, None
    order = tuple(classes) if classes is not None else tuple(sorted(set(strs)))
    index = {c: i for i, c in enumerate(order)}
    for i, s in enumerate(strs):
        if s not in index:
            shown = ", ".join(order[:20]) + (", ..." if len(order) > 20 else "")
            raise DataError(f"{table.where(i)}: column {col!r} holds {s!r}, not one of the classes "
                            f"({shown})")
    return torch.tensor([index[s] for s in strs], dtype=torch.long), order, \
        "given" if classes is not None else "sorted"
