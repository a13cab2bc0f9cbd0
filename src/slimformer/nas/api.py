"""``search(model, SearchConfig, train_data, eval_data) -> SearchResult`` (SimQ-NAS / InstaTune).

1. Search space from the structure map (blocks, heads, MLP widths, bits per block), restricted by
   the user. 2. Super-network: rank heads/units, fine-tune with the sandwich rule (saved, so a
   restarted search skips it). 3. Measure the INT8 full model and a random sample of
   sub-networks (Optuna trials in a persistent study; workers may join). 4. Fit a predictor per
   objective, report held-out rank correlation. 5. NSGA-II on the predictors. 6. Measure the
   predicted front for real. 7. The measured Pareto front; the chosen sub-network, quantized.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimformer.errors import StageError
from slimformer.nas.config import SearchConfig
from slimformer.nas.space import SearchSpace, SubNet

Progress = Callable[[str, int, int], None] | None
ROW_KEYS = ("accuracy", "latency", "size", "macs", "params", "latency_form", "notes")


@dataclass
class SearchResult:
    """What a search found.

    Attributes:
        objectives: Objective names, accuracy first.
        front: The measured Pareto front (rows: ``sub``, ``phase``, ``trial`` + objective values).
        measured: Every measured sub-network of the study.
        reference: The full model, uniformly W8A8 with the same method, its embedding tables
            (if any) at 8 bits.
        predictors: Per objective: kind, held-out Spearman / Kendall, held-out rows.
        hypervolume: Of the measured front (see :mod:`slimformer.nas.pareto`), reference costs
            = the full model's float size / latency / MACs.
        chosen: The front row exported (see ``SearchConfig.max_drop``); None for workers.
        model: The chosen sub-network, quantized (simulated form); float_model: before quantizing.
        space_size: Number of distinct sub-networks in the space.
    """

    objectives: list[str]
    front: list[dict] = field(default_factory=list)
    measured: list[dict] = field(default_factory=list)
    reference: dict = field(default_factory=dict)
    predictors: dict[str, dict] = field(default_factory=dict)
    hypervolume: float = 0.0
    chosen: dict | None = None
    model: nn.Module | None = None
    float_model: nn.Module | None = None
    chosen_spec: dict = field(default_factory=dict)
    structure: object = None
    space_size: int = 0
    train: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> list[str]:
        """The front as Markdown table lines (the reference row first)."""
        cols = [o for o in ("accuracy", "latency", "size", "macs") if any(
            r.get(o) is not None for r in [self.reference, *self.front])]
        head = ["sub-network", "phase", *cols]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in [self.reference, *self.front]:
            cells = [r.get("sub", "full W8A8"), r.get("phase", "reference")]
            cells += [_fmt(r.get(c)) for c in cols]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        return lines


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if v < 10 else f"{v:.2f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _subset(ds, n: int | None):
    from slimformer.data.datasets import TensorDictDataset

    if n is None or n >= len(ds):
        return ds
    return TensorDictDataset({k: v[:n] for k, v in ds.inputs.items()}, ds.labels[:n])


def split_holdout(ds, rows: int, seed: int = 0):
    """``(rest, held-out rows)`` of a data set, the held-out rows drawn with a fixed seed."""
    from slimformer.data.datasets import TensorDictDataset
    from slimformer.errors import DataError

    if not 0 < rows < len(ds):
        raise DataError(f"cannot hold out {rows} validation rows of a {len(ds)}-row split")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    part = lambda idx: TensorDictDataset({k: v[idx] for k, v in ds.inputs.items()},  # noqa: E731
                                         ds.labels[idx])
    return part(perm[rows:].sort().values), part(perm[:rows].sort().values)


def _row(t) -> dict:
    r = {k: t.user_attrs.get(k) for k in ROW_KEYS}
    r |= {"sub": t.user_attrs.get("sub"), "phase": t.user_attrs.get("phase"), "trial": t.number,
          "params_choice": dict(t.user_attrs.get("choices") or t.params),
          "anchor": bool(t.user_attrs.get("anchor"))}
    return r


def _prepare(model, config: SearchConfig, eval_data, structure):
    from slimformer.models.structure import discover
    from slimformer.nas.measure import slicing_available
    from slimformer.nas.space import build_space, find_blocks
    from slimformer.nas.supernet import SuperNet
    from slimformer.quantize.api import _batches

    inputs = next(_batches(eval_data, 2, 2))
    if structure is None:
        structure = discover(model, inputs)
    blocks = find_blocks(model, inputs, structure)
    probe_space = build_space(structure, blocks, config.space.model_copy(
        update={"heads": [1.0], "mlp": [1.0], "weight_bits": [8], "act_bits": [8, 4]}))
    heads, mlps = SuperNet(model, structure, probe_space).probe(inputs)
    notes = [f"attention site {i}: heads kept whole (no single output projection of width "
             "heads x head_dim takes a head mask)" for i in range(len(structure.attention))
             if i not in heads]
    notes += [f"MLP {i}: width kept whole (its fc2 input does not take a unit mask)"
              for i in range(len(structure.mlps)) if i not in mlps]
    if slicing_available():
        from slimformer.prune.slicing import head_groups, sliceable

        bad = sliceable(model, structure, inputs)
        groups = head_groups(model, structure)
        for i in sorted(heads):
            if i in bad["heads"] or groups[i] > 1:
                heads.discard(i)
                notes.append(f"attention site {i}: heads kept whole (" + (
                    bad["heads"].get(i) or "grouped-query attention")[:160] + ")")
        for i in sorted(mlps):
            if i in bad["mlp"]:
                mlps.discard(i)
                notes.append(f"MLP {i}: width kept whole ({bad['mlp'][i][:160]})")
    tables = tuple(f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding))
    space = build_space(structure, blocks, config.space, heads, mlps, tables)
    return structure, space, SuperNet(model, structure, space), notes


def _model_id(model: nn.Module, structure) -> str:
    """The model's shape (params, MACs, heads, MLP widths) and the SHA-256 of its weights."""
    from slimformer.store.integrity import module_fingerprint

    return (f"{structure.params}:{structure.macs}:{[a.heads for a in structure.attention]}:"
            f"{[m.hidden for m in structure.mlps]}:{module_fingerprint(model)}")


def fingerprints(model: nn.Module, structure, config: SearchConfig, train_data, eval_data,
                 calib_data=None) -> dict[str, dict[str, str]]:
    """What a study and a super-network belong to: model, data and config fingerprints.

    Returns:
        ``{"study": {...}, "supernet": {...}}``, each ``{"model", "data", "config"}`` hex
        strings: the study's data are the training, evaluation and calibration rows, the
        super-network's the training rows; its config holds only the fields that change the
        fine-tuning (:meth:`SearchConfig.supernet_fingerprint`).
    """
    from slimformer.store.integrity import data_fingerprint

    model_id = _model_id(model, structure)
    train = data_fingerprint(train_data)
    data = ":".join([train, data_fingerprint(eval_data), data_fingerprint(calib_data)])
    return {"study": {"model": model_id, "data": data, "config": config.fingerprint()},
            "supernet": {"model": model_id, "data": train,
                         "config": config.supernet_fingerprint()}}


_PARTS = {"model": "model (other weights or shape)", "data": "data", "config": "config"}


def _refuse_other_study(storage, name: str, parts: dict[str, str]) -> None:
    """A study ``name`` in ``storage`` made from another model, data or config is refused.

    Raises:
        ConfigError: Naming which of model / data / config differs and the way out.
    """
    from slimformer.errors import ConfigError

    try:
        have = storage.get_study_user_attrs(storage.get_study_id_from_name(name))
    except KeyError:  # no such study yet
        return
    recorded = have.get("fingerprint_parts")
    if not isinstance(recorded, dict):
        return  # an older study: open_study compares the whole fingerprint
    diff = [_PARTS[k] for k in _PARTS if recorded.get(k) != parts[k]]
    if diff:
        raise ConfigError([f"study: {name!r} exists in this storage, measured with another "
                           f"{' and another '.join(diff)}; use another study name or storage, "
                           "or delete that study to start afresh"], "search config")


def _supernet(net, config: SearchConfig, train_data, progress, key: dict[str, str]) -> dict:
    """Load the fine-tuned super-network, or rank + fine-tune + save it.

    ``key``: the super-network's ``{"model", "data", "config"}`` fingerprints; a file with
    another key is refused, never overwritten.

    Raises:
        ModelLoadError: The file is unreadable or damaged, or of another model, data or config.
    """
    from slimformer.data.datasets import make_loader
    from slimformer.errors import ModelLoadError
    from slimformer.nas.supernet import task_loss, train_supernet
    from slimformer.store.atomic import atomic_path
    from slimformer.store.integrity import load_keyed

    path = Path(config.supernet_file())
    if path.is_file():
        way = f"delete {path} or set supernet_path to another file"
        ck = load_keyed(path, key, _PARTS, "super-network file", "super-network",
                        "was trained from another", way, ("state_dict", "rank", "train"))
        try:
            net.model.load_state_dict(ck["state_dict"])
            net.load_state(ck["rank"])
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"super-network file {path} does not fit the model "
                                 f"({str(exc)[:300]}); {way}") from None
        return dict(ck["train"], resumed=True)
    if config.importance_batches:
        loader = make_loader(train_data, config.batch_size, shuffle=True, seed=config.seed)
        batches = [b for _, b in zip(range(config.importance_batches), loader, strict=False)]
        net.rank(batches, task_loss)
    for p in net.model.parameters():
        p.requires_grad_(True)
    stats = train_supernet(net, train_data, config.train_steps, config.batch_size, config.lr,
                           config.sandwich, config.distill, config.seed, progress)
    with atomic_path(path) as tmp:
        torch.save({"state_dict": net.model.state_dict(), "rank": net.state(),
                    "key": key, "train": stats}, tmp)
    return stats


def search(model: nn.Module, config: SearchConfig, train_data, eval_data, structure=None,
           progress: Progress = None, calib_data=None, worker: bool = False) -> SearchResult:
    """Multi-objective search over sub-networks and per-layer bit-widths of ``model``.

    Args:
        model: The pretrained float model (not modified; the super-network is a copy).
        config: Space restrictions, budgets, storage.
        train_data: Rows for fine-tuning the super-network (``({name: tensor}, label)`` items).
        eval_data: Rows on which each sub-network is measured (first ``eval_limit``).
        structure: The model's structure map (discovered if None).
        progress: ``progress(step, done, total)`` callback.
        calib_data: Calibration rows for quantizing sub-networks (default: ``train_data``).
        worker: Only measure random sub-networks into the shared study (needs the saved
            super-network), then return.

    Raises:
        StageError: The study's storage failed (unreadable journal file, database gone); the
            message names the file or the server (without its password).
    """
    from slimformer.nas.journal import storage_errors

    with storage_errors(config.storage_url()):
        return _search(model, config, train_data, eval_data, structure, progress, calib_data,
                       worker)


def _search(model, config, train_data, eval_data, structure, progress, calib_data, worker):
    from slimformer.nas import study as st
    from slimformer.nas.measure import measure
    from slimformer.nas.pareto import hypervolume, pareto_front

    t0 = time.perf_counter()
    tick = progress or (lambda *a: None)
    objectives = list(config.objectives)
    opened: list[str] = []  # what repairing a cut journal did
    storage = st.open_storage(config.storage_url(), opened)  # bad storage fails before any work
    original = copy.deepcopy(model).eval()
    structure, space, net, notes = _prepare(copy.deepcopy(model).eval(), config, eval_data,
                                            structure)
    keys = fingerprints(original, structure, config, train_data, eval_data, calib_data)
    _refuse_other_study(storage, config.study, keys["study"])
    fp = config.fingerprint(keys["study"]["model"] + keys["study"]["data"])
    study = st.open_study(storage, config.study, objectives, fp)
    if "fingerprint_parts" not in study.user_attrs:
        study.set_user_attr("fingerprint_parts", keys["study"])
    stale = st.fail_stale(storage, study)
    result = SearchResult(objectives, space_size=space.size(), notes=opened + notes)
    if stale:
        result.notes.append(f"{stale} trial(s) left running by a stopped process marked failed")
    if worker and not Path(config.supernet_file()).is_file():
        raise StageError(f"worker: no super-network at {config.supernet_file()}; run the search "
                         "once without the worker flag (it fine-tunes and saves it) first")
    result.train = _supernet(net, config, train_data, tick, keys["supernet"])
    evald = _subset(eval_data, config.eval_limit)
    calib = calib_data if calib_data is not None else train_data
    lat_in = None
    if "latency" in objectives:
        from slimformer.data.datasets import latency_inputs

        lat_in = latency_inputs(evald, config.latency_batch)

    def evaluate(sub: SubNet, on=net, keep=False, timed=True):
        return measure(on, sub, evald, calib, config.quant, timed and "latency" in objectives,
                       lat_in, config.latency_repeats, keep)

    # 3. reference (original weights, full, W8A8) and the random sample
    if not worker and not st.measured(study, "reference"):
        from slimformer.nas.supernet import SuperNet

        ref_net = SuperNet(original, structure, space)
        full8 = reference_subnet(space)
        trial = st.ask(study, fixed_distributions={})
        st.run_trial(study, trial, "reference", lambda s: evaluate(s, ref_net), objectives, full8,
                     space.to_params(full8), storage)
    if not worker and not study.user_attrs.get("anchors_enqueued"):
        for sub in space.anchors()[:config.samples // 2]:
            params = space.to_params(sub)
            study.enqueue_trial(params, user_attrs={"anchor": True, "choices": params,
                                                    "sub": sub.key()})
        study.set_user_attr("anchors_enqueued", True)
    st.sample_worker(storage, study, space, evaluate, objectives, config.samples, config.seed,
                     tick)
    rows = [_row(t) for t in st.measured(study)]
    result.measured = rows
    if worker:
        result.seconds = time.perf_counter() - t0
        return result
    ref = next(r for r in rows if r["phase"] == "reference")
    result.reference = ref
    sample = [r for r in rows if r["phase"] == "sample"]

    # 4. predictors, 5. NSGA-II on them, 6. measure the predicted front
    from slimformer.nas.predictors import fit_predictors

    subs = [space.from_params(r["params_choice"]) for r in sample]
    x = np.stack([space.encode(s) for s in subs])
    ys = {o: np.asarray([float(r[o]) for r in sample]) for o in objectives}
    preds = fit_predictors(x, ys, config.predictor, config.holdout, config.seed)
    result.predictors = {o: {"kind": p.kind, "spearman": p.spearman, "kendall": p.kendall,
                             "holdout": p.holdout} for o, p in preds.items()}
    todo = _predicted_front(space, preds, objectives, config, {r["sub"] for r in rows},
                            ref["accuracy"])
    done_front = {r["sub"] for r in rows if r["phase"] == "front"}
    todo = [s for s in todo if s.key() not in done_front][:max(0, config.front_max -
                                                                len(done_front))]
    for i, sub in enumerate(todo):
        trial = st.ask(study, fixed_distributions={})
        st.run_trial(study, trial, "front", evaluate, objectives, sub, space.to_params(sub),
                     storage)
        tick("measure predicted front", i + 1, len(todo))

    # 7. the measured front and the chosen sub-network
    rows = [_row(t) for t in st.measured(study)]
    result.measured = rows
    cand = [r for r in rows if r["phase"] in ("sample", "front")]
    result.front = pareto_front(cand, objectives)
    full = _float_costs(original, structure, evald, lat_in, config, objectives, ref)
    result.hypervolume = hypervolume(result.front, objectives, full)
    result.reference = dict(ref, float_costs=full)
    chosen = choose(result.front, ref, objectives, config.max_drop)
    result.chosen = chosen
    sub = space.from_params(chosen["params_choice"])
    _, qmodel, fmodel = evaluate(sub, keep=True, timed=False)  # measured already
    result.model, result.float_model = qmodel, fmodel
    from slimformer.models.structure import discover
    from slimformer.quantize.api import _batches

    result.structure = discover(fmodel, next(_batches(evald, 2, 2)), require_attention=False)
    heads, units = net.kept(sub)
    result.chosen_spec = {"sub": sub.key(), "keep": list(sub.keep),
                          "heads": {str(k): list(v) for k, v in heads.items()},
                          "mlp": {str(k): list(v) for k, v in units.items()},
                          "weight_bits": list(sub.wbits), "act_bits": list(sub.abits),
                          "embedding_bits": sub.ebits,
                          "dropped_blocks": {b.path: b.output_tuple for b, k in
                                             zip(space.blocks, sub.keep, strict=True) if not k}}
    result.seconds = time.perf_counter() - t0
    return result


def reference_subnet(space: SearchSpace) -> SubNet:
    """The uniformly INT8 full model: every block, head and unit; W8A8; embeddings at 8 bits."""
    return dataclasses.replace(space.largest(), wbits=tuple(8 for _ in space.groups),
                               abits=tuple(8 for _ in space.groups),
                               ebits=8 if space.embeddings else "float")


def _float_costs(original, structure, evald, lat_in, config, objectives, ref) -> dict:
    """Cost objectives of the full float model: the hypervolume's reference point."""
    from slimformer.models.evaluate import model_size
    from slimformer.nas.measure import exported_latency

    out = {"size": model_size(original)["bytes"], "macs": structure.macs}
    if "latency" in objectives:
        out["latency"] = exported_latency(original, lat_in, config.latency_repeats)
    out = {k: float(max(v, ref.get(k) or 0)) for k, v in out.items()}
    return out


def choose(front: list[dict], ref: dict, objectives: list[str], max_drop: float) -> dict:
    """Lowest first-cost front row within ``max_drop`` of the reference accuracy.

    Falls back to the most accurate row when none is close enough.
    """
    cost = next(o for o in objectives if o != "accuracy")
    ok = [r for r in front if r["accuracy"] >= ref["accuracy"] - max_drop - 1e-12]
    if ok:
        return min(ok, key=lambda r: (r[cost], -r["accuracy"]))
    return max(front, key=lambda r: r["accuracy"])


def _predicted_front(space: SearchSpace, preds, objectives, config, measured_keys,
                     ref_accuracy: float) -> list:
    """NSGA-II over the predictors; up to ``front_max`` unmeasured front sub-networks.

    Two thirds of them come from the predicted front within ``3 * max_drop`` of the reference
    accuracy (where the choice is made), the rest from the whole front; each part is spread
    evenly along the first cost objective.
    """
    import optuna

    from slimformer.nas.study import DIRECTIONS

    sampler = optuna.samplers.NSGAIISampler(population_size=config.population, seed=config.seed)
    study = optuna.create_study(directions=[DIRECTIONS[o] for o in objectives], sampler=sampler)

    def objective(trial):
        sub = space.suggest(trial)
        x = space.encode(sub)[None]
        trial.set_user_attr("sub", sub)
        return [float(preds[o].predict(x)[0]) for o in objectives]

    study.optimize(objective, n_trials=config.nsga_trials)
    acc = objectives.index("accuracy")
    cost = next(i for i, o in enumerate(objectives) if o != "accuracy")
    seen, front = set(measured_keys), []
    for t in sorted(study.best_trials, key=lambda t: t.values[cost]):
        sub = t.user_attrs["sub"]
        if sub.key() not in seen:
            seen.add(sub.key())
            front.append((sub, t.values[acc]))
    near = [s for s, a in front if a >= ref_accuracy - 3 * config.max_drop]
    rest = [s for s, a in front if a < ref_accuracy - 3 * config.max_drop]
    n_near = min(len(near), -(-2 * config.front_max // 3))
    picked = _spread(near, n_near)
    return picked + _spread(rest, config.front_max - len(picked))


def _spread(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if n <= 0:
        return []
    if len(items) <= n:
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))]
