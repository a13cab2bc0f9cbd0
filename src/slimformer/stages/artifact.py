"""Saved outputs as models: every command's MODEL may be a folder slimformer wrote.

An artifact is a folder with one sealed manifest, ``slimformer.json``
(:mod:`slimformer.store.manifest`: base model spec, the applied stages with their configs and
results, slice spec, SHA-256 of every file) and safetensors weights, of kind ``quantized``
(:mod:`slimformer.quantize.serialize`), ``pruned`` (:mod:`slimformer.prune.serialize`) or
``search`` (:mod:`slimformer.nas.output`), or a run folder holding them as ``quantized/`` /
``search/`` / ``pruned/`` (the last model-changing stage wins). Restoring = checking every hash,
building the base model from its spec once, then replaying the recorded stages in order, each
by its own ``restore`` in :data:`slimformer.stages.HANDLERS` (prune slices, quantize wraps a copy
in the recorded quantizers, search cuts the chosen sub-network); the stage that wrote the folder
loads its weights. A base spec that names a factory is refused unless ``trust_code``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slimformer.errors import ModelLoadError
from slimformer.store.manifest import MANIFEST, RUN_SUBFOLDERS, applied, candidates, kind_of


@dataclass
class Restored:
    """A model restored from an artifact.

    Attributes:
        loaded: The base model as loaded (``module``: the float model the artifact started
            from, sliced when it was pruned: the reference for fidelity); input specs, data set.
        module: The restored model (quantized or pruned) that stages continue from.
        applied: The stages recorded in the artifact, in order (``["prune", "quantize"]``).
        slice_spec: How the base model was sliced, if it was pruned.
        folder: The artifact folder that was read.
        history: The manifest's stage entries (config and results of each applied stage).
    """

    loaded: object
    module: object
    applied: list[str] = field(default_factory=list)
    slice_spec: object = None
    folder: Path | None = None
    history: list[dict] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        """Whether the artifact's model is quantized (no further prune or quantize stage)."""
        return "quantize" in self.applied


def load(spec, trust_code: bool = False) -> Restored:
    """Any model spec: a saved folder (``ArtifactSpec``) restored, anything else loaded.

    ``trust_code`` (or the spec's own) allows a saved folder's factory.
    """
    from slimformer.models.loading import load_model
    from slimformer.models.spec import ArtifactSpec

    if isinstance(spec, ArtifactSpec):
        return restore(spec.path, trust_code=spec.trust_code or trust_code)
    lm = load_model(spec)
    return Restored(lm, lm.module)


@dataclass(frozen=True)
class Artifact:
    """A saved folder being restored: its kind and its checked manifest (hashes verified)."""

    folder: Path
    kind: str
    meta: dict

    @property
    def manifest(self) -> Path:
        """The manifest file (named in errors)."""
        return self.folder / MANIFEST


def find(path: str | Path) -> tuple[str, Path] | None:
    """``(kind, folder)`` of the artifact at ``path`` (itself or inside a run folder), or None.

    Raises:
        ModelLoadError: A manifest that cannot be read, or one of an older slimformer.
    """
    folders = candidates(path)
    return (kind_of(folders[0]), folders[0]) if folders else None


def read(folder: Path, kind: str) -> dict:
    """The manifest of the ``kind`` artifact in ``folder``, checked before anything is built.

    Format, every file's and section's hash, the weights' tensor header, the kind's sections.
    """
    from slimformer.nas.output import read_search
    from slimformer.prune.serialize import read_pruned
    from slimformer.quantize.serialize import read_quantized

    readers = {"pruned": read_pruned, "quantized": read_quantized, "search": read_search}
    return readers[kind](folder)


def restore(path: str | Path, trust_code: bool = False) -> Restored:
    """Rebuild the model saved at ``path`` (an artifact or a run folder holding one).

    Raises:
        ModelLoadError: Not an artifact; edited, truncated or wrong-shape files (named); a base
            spec naming a factory without ``trust_code``; recorded stages that cannot be
            replayed.
    """
    from slimformer.models.loading import load_model, saved_model_spec
    from slimformer.stages import HANDLERS

    found = find(path)
    if found is None:
        raise ModelLoadError(f"{path} holds no slimformer artifact ({MANIFEST}, or a run folder "
                             f"with {' / '.join(s + '/' for s in RUN_SUBFOLDERS)} in it)")
    kind, folder = found
    art = Artifact(folder, kind, read(folder, kind))  # hashes checked before anything is built
    entries = art.meta["stages"]
    names = applied(art.meta)
    replayable = [k for k, h in HANDLERS.items() if h.restore is not None]
    for i, name in enumerate(names):
        if name not in replayable:
            raise ModelLoadError(f"{art.manifest}: stages[{i}] is {name[:40]!r}, not a stage "
                                 f"that changes the model ({', '.join(replayable)}); "
                                 "re-create the folder with the command that wrote it")
    if not names or HANDLERS[names[-1]].saves != kind:
        raise ModelLoadError(f"{art.manifest}: the last recorded stage "
                             f"({names[-1] if names else 'none'}) did not write this {kind} "
                             "folder; re-create the folder with the command that wrote it")
    if not art.meta.get("model_spec"):
        raise ModelLoadError(f"{art.manifest} records no base model (written by the {kind} API "
                             "without one): run it again with a model spec to restore it as a "
                             "model")
    lm = load_model(saved_model_spec(art.meta["model_spec"], str(art.manifest), trust_code))
    r = Restored(lm, lm.module, [], None, folder, entries)
    for name, entry in zip(names, entries, strict=True):
        HANDLERS[name].restore(r, entry, art)
        r.applied.append(name)
    return r
