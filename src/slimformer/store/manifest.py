"""One artifact format for every stage's output: a sealed ``slimformer.json`` beside the weights.

Every folder a stage saves (``quantized/``, ``pruned/``, ``search/``) holds one manifest,
``slimformer.json``, with the same header::

    format: slimformer-artifact      format_version: 4        slimformer_version: ...
    kind: quantized | pruned | search (what the weights file holds)
    model_spec: the base model's spec (what loading rebuilds first)
    stages: [{stage, config, result}, ...] the applied stages, in order (prune before quantize)
    slice_spec: how the base model was sliced (or null)
    weights: the safetensors file name (or null: a search that chose nothing)
    tensors: {name: {dtype, shape}} of the weights file
    integrity: SHA-256 and size of every file, SHA-256 of every other section

plus the sections of its kind (a quantized folder's packed-code records, for instance). Loading
replays ``stages`` on the base model: it is rebuilt from ``model_spec``, sliced by ``slice_spec``,
wrapped by the recorded quantizers, and the weights are loaded after every hash is checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from slimformer.errors import ModelLoadError

MANIFEST = "slimformer.json"
FORMAT = "slimformer-artifact"
FORMAT_VERSION = 4  # 4: one manifest for every stage (was quant.json 3, prune.json 2, search.json 1)
KINDS = ("quantized", "pruned", "search")
RUN_SUBFOLDERS = ("quantized", "search", "pruned")  # artifacts in a run folder, most advanced first
LEGACY = ("quant.json", "prune.json", "search.json")  # manifests of format versions 1-3
_HEADER = ("format", "kind", "model_spec", "stages", "slice_spec", "weights", "tensors")


def stage_entry(stage: str, config=None, result: dict | None = None) -> dict:
    """One ``stages`` entry: the stage type, its config (a pydantic model or a dict), results."""
    cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    return {"stage": stage, "config": cfg, "result": dict(result or {})}


def write_manifest(folder: str | Path, kind: str, model_spec, stages: Sequence[dict],
                   weights: str | None, files: Iterable[str] = (), slice_spec=None,
                   **sections) -> dict:
    """Seal and write ``folder / slimformer.json``; returns the manifest as written.

    Args:
        folder: The artifact folder (already holding ``weights`` and ``files``).
        kind: One of :data:`KINDS`.
        model_spec: The base model's spec (pydantic) or None.
        stages: :func:`stage_entry` records, in the order they were applied.
        weights: The safetensors file name inside ``folder``, or None.
        files: Other files to hash.
        slice_spec: A :class:`~slimformer.prune.slicing.SliceSpec` (or its dict), or None.
        sections: Kind-specific JSON-ready sections.
    """
    from slimformer import __version__
    from slimformer.store.integrity import seal, tensor_manifest

    if kind not in KINDS:  # pragma: no cover - callers pass a constant
        raise ValueError(f"unknown artifact kind {kind!r}")
    folder = Path(folder)
    if slice_spec is not None and hasattr(slice_spec, "to_dict"):
        slice_spec = slice_spec.to_dict()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "slimformer_version": __version__, "kind": kind,
            "model_spec": _absolute(model_spec.model_dump(mode="json"))
            if model_spec is not None else None,
            "stages": list(stages), "slice_spec": slice_spec, "weights": weights,
            "tensors": tensor_manifest(folder / weights) if weights else {}, **sections}
    meta = seal(meta, folder, [*([weights] if weights else []), *files])
    (folder / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


SPEC_PATHS = ("path", "weights")  # fields of a model spec that name files or folders


def _absolute(spec: dict) -> dict:
    """``spec`` with its relative file and folder paths made absolute (from this working dir).

    A saved folder must load from any working directory; the paths were typed relative to this
    one.
    """
    import os

    return {k: os.path.abspath(v) if k in SPEC_PATHS and isinstance(v, str) and v else v
            for k, v in spec.items()}


def candidates(path: str | Path) -> list[Path]:
    """Folders at ``path`` that hold a manifest (current or older), in the order to read them.

    ``path`` itself, then the artifacts of a run folder (:data:`RUN_SUBFOLDERS`, most advanced
    first).
    """
    p = Path(path)
    if not p.is_dir():
        return []
    return [d for d in (p, *(p / sub for sub in RUN_SUBFOLDERS))
            if any((d / m).is_file() for m in (MANIFEST, *LEGACY))]


def kind_of(folder: str | Path) -> str | None:
    """The ``kind`` of the artifact in ``folder``, or None when it holds no manifest.

    Raises:
        ModelLoadError: A manifest that cannot be read, of another format, or a folder written
            by an older slimformer (one manifest per stage).
    """
    from slimformer.store.integrity import read_manifest

    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        legacy = next((n for n in LEGACY if (folder / n).is_file()), None)
        if legacy is not None:
            raise ModelLoadError(f"{folder / legacy} was written by an older slimformer (one "
                                 f"manifest per stage; this one reads {MANIFEST}, format "
                                 f"{FORMAT_VERSION}): re-create the folder with the command "
                                 "that wrote it")
        return None
    meta = read_manifest(path, ("format", "kind"), "re-create the folder")
    if meta["format"] != FORMAT or meta["kind"] not in KINDS:
        raise ModelLoadError(f"{path} is not a slimformer artifact manifest (format "
                             f"{str(meta['format'])[:40]!r}, kind {str(meta['kind'])[:40]!r}; "
                             f"expected {FORMAT!r} of kind {' / '.join(KINDS)})")
    return meta["kind"]


def read_artifact(folder: str | Path, kind: str, weights: str, keys: Iterable[str] = (),
                  redo: str = "re-create the folder", what: str = "model") -> dict:
    """The checked manifest of the ``kind`` artifact in ``folder``.

    Checks: a manifest of this format version and kind, with the header and ``keys``; every
    file's and section's SHA-256 (:func:`~slimformer.store.integrity.verify`); the weights
    file's tensor header against the manifest.

    Raises:
        ModelLoadError: Naming the file and what differs, ending with ``redo``.
    """
    from slimformer.store.integrity import read_sealed

    folder = Path(folder)
    found = kind_of(folder)
    if found is None:
        raise ModelLoadError(f"{folder} is not a saved {what} (needs {MANIFEST} and {weights})")
    if found != kind:
        raise ModelLoadError(f"{folder / MANIFEST} holds a {found} artifact, not a {kind} one")
    meta = read_sealed(folder, MANIFEST, weights, (*_HEADER, *keys), FORMAT_VERSION, redo, what)
    if meta["weights"] != weights or not isinstance(meta["stages"], list):
        raise ModelLoadError(f"{folder / MANIFEST}: weights {str(meta['weights'])[:60]!r} and "
                             f"stages do not describe a {kind} artifact; {redo}")
    return meta


def applied(meta: dict) -> list[str]:
    """The stage types recorded in a manifest, in order (``["prune", "quantize"]``)."""
    return [str(s.get("stage")) for s in meta.get("stages", []) if isinstance(s, dict)]
