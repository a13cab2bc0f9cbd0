"""``prune(model, PruneConfig, train_data, eval_data)``: search, slice, fine-tune.

The input model is never changed: the search trains a copy. With a ``checkpoint`` folder the
run writes ``search.pt`` (the slice spec and the sliced weights) after the search and
``finetune.pt`` every ``checkpoint_every`` fine-tuning steps, atomically; a run given the same
folder, model, data and config resumes from the last of them, and a checkpoint of another run
is refused.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from slimformer.data.rng import keeps_rng
from slimformer.errors import ConfigError, DataError, UnsupportedModelError
from slimformer.prune.config import PruneConfig
from slimformer.prune.slicing import SliceSpec, slice_model, sliceable
from slimformer.prune.train import Progress, finetune, make_loss


@dataclass
class PruneResult:
    """A pruned model and what it cost.

    Attributes:
        model: The sliced, fine-tuned model (eval mode).
        spec: Kept heads / MLP units per site (replays the slicing on the original model).
        kept: ``{"heads": {site: (kept, total)}, "mlp": {site: (kept, total)},
            "dims": {site: (kept q/k dims, kept v dims, head_dim)}}``.
        params_before / params_after: All parameters of the model.
        macs_before / macs_after: MACs per sample on the example inputs.
        prunable_before / prunable_after: The prunable cost (params or MACs, as ``target``).
        search_seconds / finetune_seconds: Wall time of the two phases.
        accuracy_before / accuracy_after: On ``eval_data`` when given.
        skipped: Sites that cannot be sliced, with the reason.
        notes: What else the run decided (resumed, distillation only ...).
        cut: ``{kind: (sites cut, sites that could be cut)}`` per structure kind searched
            (``heads``, ``mlp``, ``dims`` ...). The prunable cost counts only the kinds of which
            some unit was cut, so :attr:`reduction` never credits a structure left whole.
        target: What the prunable cost counts (``params`` or ``macs``).
    """

    model: nn.Module
    spec: SliceSpec
    kept: dict
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    prunable_before: float
    prunable_after: float
    search_seconds: float
    finetune_seconds: float
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    skipped: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cut: dict = field(default_factory=dict)
    target: str = "params"

    @property
    def reduction(self) -> float:
        """``prunable_before / prunable_after`` (e.g. 2.0 for a 2x smaller prunable part)."""
        return self.prunable_before / max(self.prunable_after, 1e-12)

    @property
    def headline(self) -> str:
        """One line: the reduction, what was cut, and what was not cut and why.

        E.g. ``2.00x fewer params in the structures cut (1.17x in the whole model): MLP units
        cut at 4 of 4 sites; heads not cut at 6 of 6 sites (the sliced forward failed: ...)``.
        """
        before, after = ((self.macs_before, self.macs_after) if self.target == "macs" else
                         (self.params_before, self.params_after))
        whole = before / max(after, 1)
        cut, kept, refused = [], [], []
        for kind in dict.fromkeys([*self.cut, *self.skipped]):
            done, able = self.cut.get(kind, (0, 0))
            bad = self.skipped.get(kind, {})
            total = able + len(bad)
            label = _KIND_LABEL.get(kind, kind)
            if done:
                cut.append(f"{label} cut at {done} of {total} sites")
            elif able:
                kept.append(f"{label} left whole at {able} of {total} sites (none chosen)")
            if bad:
                reasons = "; ".join(dict.fromkeys(_short_reason(w) for w in bad.values()))
                refused.append(f"{label} not cut at {len(bad)} of {total} sites ({reasons})")
        what = "MACs" if self.target == "macs" else "params"
        head = (f"{self.reduction:.2f}x fewer {what} in the structures cut ({whole:.2f}x in the "
                "whole model)" if cut else f"nothing cut ({whole:.2f}x fewer {what} in all)")
        return head + ": " + "; ".join(cut + kept + refused) if cut + kept + refused else head

    def summary(self) -> dict:
        """JSON-ready numbers (no model)."""
        return {"params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "prunable_before": self.prunable_before, "prunable_after": self.prunable_after,
                "prunable_reduction": round(self.reduction, 4), "headline": self.headline,
                "search_seconds": round(self.search_seconds, 2),
                "finetune_seconds": round(self.finetune_seconds, 2),
                "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
                "kept": {k: {str(i): list(v) for i, v in d.items()} for k, d in self.kept.items()}}


_KIND_LABEL = {"heads": "heads", "mlp": "MLP units", "dims": "head dims",
               "dims_qk": "query/key dims", "dims_v": "value dims"}


def _short_reason(why: str, limit: int = 110) -> str:
    """A slicing refusal without its site prefix, first sentence, at most ``limit`` characters."""
    text = why.split("): ", 1)[1] if why.startswith("cannot slice") and "): " in why else why
    text = text.split(". ", 1)[0].rstrip(".")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def as_config(config) -> PruneConfig:
    """A :class:`PruneConfig` from itself or a mapping; bad values raise :class:`ConfigError`."""
    if isinstance(config, PruneConfig):
        return config
    try:
        return PruneConfig.model_validate(config)
    except ValidationError as exc:
        from slimformer.validation import format_errors

        raise ConfigError(format_errors(exc, PruneConfig), "prune config") from None


def _inputs(train_data, eval_data, inputs) -> dict:
    if inputs is not None:
        return inputs
    for d in (train_data, eval_data):
        if d is not None and len(d):
            from slimformer.data.datasets import trim_padding

            return trim_padding([d[i] for i in range(min(2, len(d)))])[0]
    raise DataError("no example inputs: give train_data, eval_data or inputs")


def _accuracy(model: nn.Module, data, batch_size: int = 256) -> float:
    from slimformer.data.datasets import make_loader
    from slimformer.models.evaluate import predict

    preds, labels = predict(model, make_loader(data, batch_size))
    return float((preds == labels).float().mean())


def _cost(groups, keep=None) -> float:
    from slimformer.prune.upop import kept_cost

    return kept_cost(groups, keep if keep is not None else
                     [torch.ones(g.n, dtype=torch.bool) for g in groups])


class _Checkpoints:
    """``search.pt`` / ``finetune.pt`` in a folder, keyed by the model, the data and the config.

    The key holds SHA-256 fingerprints of the model's weights, the training data and the
    config. A checkpoint with another key is refused (never resumed, never overwritten): it
    belongs to another run. ``KEYS`` names what each part means in messages.
    """

    KEYS = {"model": "model (other weights)", "data": "training data", "config": "prune config"}
    FIELDS = {"search.pt": ("spec", "state", "keep"),
              "finetune.pt": ("model", "optimizer", "scheduler", "step")}

    def __init__(self, folder: str | Path | None, cfg: PruneConfig, model: nn.Module, data):
        from slimformer.store.integrity import data_fingerprint, module_fingerprint, sha256_json

        self.folder = Path(folder) if folder is not None else None
        self.key = {} if self.folder is None else {
            "model": module_fingerprint(model), "data": data_fingerprint(data),
            "config": sha256_json(cfg.model_dump(mode="json"))}

    def load(self, name: str) -> dict | None:
        """The checkpoint ``name`` of this run, None if absent; another run's is refused.

        Raises:
            ModelLoadError: The file is unreadable or damaged, or of another model, data or
                config.
        """
        if self.folder is None or not (self.folder / name).is_file():
            return None
        from slimformer.store.integrity import load_keyed

        path = self.folder / name
        return load_keyed(path, self.key, self.KEYS, "checkpoint", "checkpoint",
                          "was made with another", f"delete {path} or give another checkpoint "
                          "folder", self.FIELDS.get(name, ()), "resuming it would mix two runs: ")

    def save(self, name: str, state: dict) -> None:
        """Write checkpoint ``name`` atomically with this run's key."""
        if self.folder is None:
            return
        from slimformer.store.atomic import atomic_path

        with atomic_path(self.folder / name) as tmp:
            torch.save({**state, "key": self.key}, tmp)


@keeps_rng
def prune(model: nn.Module, config, train_data=None, eval_data=None, structure=None,
          progress: Progress = None, inputs: dict | None = None,
          checkpoint: str | Path | None = None) -> PruneResult:
    """Prune ``model`` to ``config.ratio`` of its prunable cost; returns the smaller model.

    Args:
        model: Any transformer (not modified: its weights stay, and so does each module's
            train / eval mode, though it runs in eval mode during the call).
        config: :class:`PruneConfig` (or a mapping of its fields).
        train_data: ``TensorDictDataset`` for the search and fine-tuning (its train split).
        eval_data: Optional ``TensorDictDataset``; accuracy before and after is measured on it.
        structure: The model's :class:`StructureMap` (discovered when None).
        progress: ``progress(phase, done, total)``.
        inputs: Example inputs (default: two rows of the data).
        checkpoint: Folder for resumable checkpoints.

    Raises:
        ConfigError: Bad config; a structure to prune that the model does not have.
        DataError: Training asked for without ``train_data``; no example inputs.
        UnsupportedModelError: No attention found, or no site can be sliced.
    """
    cfg = as_config(config)
    if cfg.needs_training and (train_data is None or len(train_data) == 0):
        why = "the upop search trains" if cfg.method == "upop" else \
            f"finetune_steps={cfg.finetune_steps}"
        raise DataError(f"train_data is required: {why}; give the training split (e.g. "
                        "get_dataset(name, 'train')), or use method='magnitude' with "
                        "finetune_steps=0")
    x = _inputs(train_data, eval_data, inputs)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return _prune(model, cfg, train_data, eval_data, structure, progress, x, checkpoint)
    finally:
        for m, training in modes.items():
            m.training = training


def _prune(model: nn.Module, cfg, train_data, eval_data, structure, progress: Progress,
           x: dict, checkpoint) -> PruneResult:
    """:func:`prune` on ``model`` in eval mode, with its example inputs ``x``."""
    from slimformer.models.structure import discover
    from slimformer.prune.units import to_spec, unit_groups
    from slimformer.prune.upop import magnitude_keep, upop_search

    if structure is None:
        structure = discover(model, x, require_attention="heads" in cfg.structures)
    missing = [f"structures: the model has no {s} (found {len(structure.attention)} attention "
               f"site(s), {len(structure.mlps)} MLP(s)); leave {s} out of structures"
               for s, n in
               (("heads", len(structure.attention)), ("mlp", len(structure.mlps)))
               if s in cfg.structures and n == 0]
    if missing:
        raise ConfigError(missing, "prune config")
    found = sliceable(model, structure, x, kinds=tuple(cfg.structures))
    modes = found.pop("dims_mode", {})
    skipped = {k: v for k, v in found.items() if k in cfg.structures}
    groups = unit_groups(model, structure, cfg.structures, skipped, cfg.target, x, modes)
    if not groups:
        raise UnsupportedModelError(f"nothing to prune: no site can be sliced: {skipped}")
    notes: list[str] = []
    ckpt = _Checkpoints(checkpoint, cfg, model, train_data)
    torch.manual_seed(cfg.seed)
    teacher = model if cfg.distill > 0 else None
    loss_fn = make_loss(cfg.distill, cfg.temperature, teacher)
    t0 = time.perf_counter()
    saved = ckpt.load("search.pt")
    if saved is not None:
        spec = SliceSpec.from_dict(json.loads(saved["spec"]))
        pruned = slice_model(model, structure, spec, check_inputs=x)
        pruned.load_state_dict(saved["state"])
        keep = [torch.tensor(k) for k in json.loads(saved["keep"])]
        notes.append("search resumed from checkpoint")
    else:
        work = copy.deepcopy(model)
        if cfg.method == "upop":
            keep = upop_search(work, groups, cfg, train_data, loss_fn, progress)
        else:
            keep = magnitude_keep(work, groups, cfg.ratio)
        spec = to_spec(groups, keep)
        pruned = slice_model(work, structure, spec, inplace=True, check_inputs=x)
        ckpt.save("search.pt", {"spec": json.dumps(spec.to_dict()), "state": pruned.state_dict(),
                                "keep": json.dumps([k.tolist() for k in keep])})
    search_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if cfg.finetune_steps > 0:
        resume = ckpt.load("finetune.pt")
        if resume is not None:
            notes.append(f"fine-tuning resumed at step {resume['step']}")
        finetune(pruned, train_data, cfg, loss_fn, cfg.finetune_steps, progress,
                 lambda step, state: ckpt.save("finetune.pt", state), resume)
    ft_s = time.perf_counter() - t1
    pruned.eval()
    after = discover(pruned, x, require_attention=False)
    kept = {"heads": {g.site: (int(k.sum()) * g.group, g.n * g.group)
                      for g, k in zip(groups, keep, strict=True) if g.kind == "heads"},
            "mlp": {g.site: (int(k.sum()), g.n)
                    for g, k in zip(groups, keep, strict=True) if g.kind == "mlp"},
            "dims": {i: (len(qk), len(v), structure.attention[i].head_dim)
                     for i, (qk, v) in spec.dims.items()}}
    # exact when the target is params (only prunable tensors shrink); for MACs, and heads and
    # dims cut at one site, the per-unit costs overlap and the sum is an estimate
    removed = structure.params - after.params if cfg.target == "params" else None
    cut_kinds = {g.kind for g, k in zip(groups, keep, strict=True) if not bool(k.all())}
    cut = {kind: (len({g.site for g, k in zip(groups, keep, strict=True)
                       if g.kind == kind and not bool(k.all())}),
                  len({g.site for g in groups if g.kind == kind}))
           for kind in dict.fromkeys(g.kind for g in groups)}
    # the prunable cost counts only the kinds that were cut (all of them when nothing was)
    counted = [i for i, g in enumerate(groups) if g.kind in cut_kinds or not cut_kinds]
    c_groups, c_keep = [groups[i] for i in counted], [keep[i] for i in counted]
    before = _cost(c_groups)
    res = PruneResult(pruned, spec, kept, structure.params, after.params, structure.macs,
                      after.macs, before,
                      before - removed if removed is not None else _cost(c_groups, c_keep),
                      search_s, ft_s,
                      skipped={k: v for k, v in skipped.items() if v}, notes=notes, cut=cut,
                      target=cfg.target)
    if eval_data is not None:
        res.accuracy_before = _accuracy(model, eval_data)
        res.accuracy_after = _accuracy(pruned, eval_data)
    return res
