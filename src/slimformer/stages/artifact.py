"""Saved outputs as models: every command's MODEL may be a folder slimformer wrote.

An artifact is a folder with one sealed manifest, ``slimformer.json``
(:mod:`slimformer.report.manifest`: base model spec, the applied stages with their configs and
results, slice spec, SHA-256 of every file) and safetensors weights, of kind ``quantized``
(:mod:`slimformer.quantize.serialize`), ``pruned`` (:mod:`slimformer.prune.serialize`) or
``search`` (:mod:`slimformer.nas.output`), or a run folder holding them as ``quantized/`` /
``search/`` / ``pruned/`` (the last model-changing stage wins). Restoring replays the
recorded stages on the base model: the base is built from its spec, sliced by the slice spec,
wrapped by the recorded quantizers, and the weights are loaded strictly after the hashes are
checked. A base spec that names a factory is refused unless ``trust_code``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from slimformer.errors import ModelLoadError
from slimformer.report.manifest import MANIFEST, RUN_SUBFOLDERS, applied, candidates, kind_of


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


def find(path: str | Path) -> tuple[str, Path] | None:
    """``(kind, folder)`` of the artifact at ``path`` (itself or inside a run folder), or None.

    Raises:
        ModelLoadError: A manifest that cannot be read, or one of an older slimformer.
    """
    folders = candidates(path)
    return (kind_of(folders[0]), folders[0]) if folders else None


def restore(path: str | Path, trust_code: bool = False) -> Restored:
    """Rebuild the model saved at ``path`` (an artifact or a run folder holding one).

    Raises:
        ModelLoadError: Not an artifact; edited, truncated or wrong-shape files (named); a base
            spec naming a factory without ``trust_code``.
    """
    found = find(path)
    if found is None:
        raise ModelLoadError(f"{path} holds no slimformer artifact ({MANIFEST}, or a run folder "
                             f"with {' / '.join(s + '/' for s in RUN_SUBFOLDERS)} in it)")
    kind, folder = found
    if kind == "search":
        return _chosen(folder, trust_code)
    if kind == "pruned":
        from slimformer.prune.serialize import load_pruned

        lm = load_pruned(folder, trust_code=trust_code)  # hashes and trust checked first
        meta = _meta(folder)
        return Restored(lm, lm.module, applied(meta), _sliced(meta), folder, meta["stages"])
    from slimformer.models.loading import load_model
    from slimformer.quantize.serialize import load_quantized, saved_spec

    base = saved_spec(folder, trust_code=trust_code)  # hashes and trust checked first
    qmodel = load_quantized(folder, trust_code=trust_code)
    lm = load_model(base)
    meta = _meta(folder)
    sspec = _sliced(meta)
    if sspec is not None:  # the float reference is the pruned base, as it was quantized
        from slimformer.models.structure import discover
        from slimformer.prune.slicing import slice_model

        x = lm.example_inputs(2)
        slice_model(lm.module, discover(lm.module, x, require_attention=False), sspec,
                    inplace=True, check_inputs=x)
    return Restored(lm, qmodel, applied(meta), sspec, folder, meta["stages"])


def _chosen(folder: Path, trust_code: bool) -> Restored:
    """The chosen float sub-network of a search output, rebuilt from its base model."""
    from slimformer.models.loading import load_model, saved_model_spec
    from slimformer.models.structure import discover
    from slimformer.nas.output import load_chosen, read_search

    meta = read_search(folder)  # hashes checked before anything is built
    if not meta.get("model_spec"):
        raise ModelLoadError(f"{folder / MANIFEST} records no base model (written by the search "
                             "API without one): run the search again to restore it as a model")
    lm = load_model(saved_model_spec(meta["model_spec"], str(folder / MANIFEST), trust_code))
    structure = discover(lm.module, lm.example_inputs(2), require_attention=False)
    sub = load_chosen(lm.module, structure, folder).eval()  # hashes checked here
    import dataclasses

    return Restored(dataclasses.replace(lm, module=sub), sub, applied(meta), None, folder,
                    meta["stages"])


def _meta(folder: Path) -> dict:
    """The manifest of an artifact its loader has just checked."""
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def _sliced(meta: dict):
    """The slice spec recorded in a (hash-checked) manifest, or None."""
    from slimformer.prune.slicing import SliceSpec

    raw = meta.get("slice_spec")
    return SliceSpec.from_dict(raw) if raw else None
