"""Measuring sub-networks: embedding bit-widths (applied, counted in size), QDQ latency, fallback."""

import dataclasses
import math
import os
import socket

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from slimformer.data.datasets import TensorDictDataset
from slimformer.errors import ConfigError
from slimformer.models.generality import GENERALITY
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.models.structure import discover
from slimformer.nas.api import reference_subnet
from slimformer.nas.config import SpaceConfig
from slimformer.nas.measure import measure
from slimformer.nas.pareto import dominated_volume, hypervolume
from slimformer.nas.space import build_space, find_blocks
from slimformer.nas.study import fail_stale, open_storage
from slimformer.nas.supernet import SuperNet


def _tables(model) -> tuple[str, ...]:
    return tuple(f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding))


def _bert(space_cfg: SpaceConfig):
    lm = load_model(GENERALITY["bert"])
    x = lm.example_inputs(32, seed=3)
    smap = discover(lm.module, x)
    space = build_space(smap, find_blocks(lm.module, x, smap), space_cfg, None, None,
                        _tables(lm.module))
    labels = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(0))
    return lm, x, space, SuperNet(lm.module, smap, space), TensorDictDataset(x, labels)


def test_embedding_bits_are_a_choice_of_models_with_tables():
    cfg = SpaceConfig(heads=[1.0], mlp=[1.0], skip_blocks=False, weight_bits=[8],
                      embedding_bits=[4, 8, "float"])
    lm, _, space, _, _ = _bert(cfg)
    assert space.embeddings == _tables(lm.module) and len(space.embeddings) == 3  # word/pos/type
    assert space.embedding_bits == (4, 8, "float") and space.size() == 3
    assert space.largest().ebits == "float" and space.smallest().ebits == 4
    rng = np.random.default_rng(0)
    drawn = {space.random(rng).ebits for _ in range(40)}
    assert drawn == {4, 8, "float"}
    for e in drawn:
        sub = [s for s in (space.random(rng) for _ in range(60)) if s.ebits == e][0]
        assert space.from_params(space.to_params(sub)) == sub and f"-e{e}" in sub.key()
    assert [a.ebits for a in space.anchors()] == [8, 4]  # W8 -> E8; smallest (W8, E4)
    assert reference_subnet(space).ebits == 8  # the INT8 full model: embeddings at 8 bits too
    # the encoding sees the embedding width
    lo, hi = (space.encode(space.from_params({"emb": b})) for b in ("4", "float"))
    assert (hi - lo).max() > 0
    # a model without embedding tables: the choice is fixed (float), the reference too
    vit = load_model(ZooSpec(name="vit-fmnist"))
    xv = vit.example_inputs(2)
    smap = discover(vit.module, xv)
    vspace = build_space(smap, find_blocks(vit.module, xv, smap), SpaceConfig(),
                         embeddings=_tables(vit.module))
    assert vspace.embedding_bits == ("float",) and reference_subnet(vspace).ebits == "float"


def test_restrictions_to_an_empty_space_give_the_typed_error():
    with pytest.raises(ConfigError, match="space.embedding_bits: empty list"):
        _bert(SpaceConfig(embedding_bits=[]))
    # embedding bits restricted to one choice and nothing else elastic: a single sub-network
    with pytest.raises(ConfigError, match=r"single sub-network.*embedding_bits \[8\].*3 embedding"):
        _bert(SpaceConfig(heads=[1.0], mlp=[1.0], skip_blocks=False, weight_bits=[8],
                          embedding_bits=[8]))


def test_embedding_bits_are_applied_and_counted_in_size():
    _, x, space, net, data = _bert(SpaceConfig(heads=[1.0], mlp=[1.0], skip_blocks=False,
                                               weight_bits=[8], embedding_bits=[4, 8, "float"]))
    full = space.largest()
    got = {}
    for e in ("float", 8, 4):
        sub = space.repair(full.__class__(full.keep, full.heads, full.mlp, full.wbits,
                                          full.abits, e))
        m, qmodel, fmodel = measure(net, sub, data, data, _q("minmax", 16), False,
                                    return_model=True)
        tables = {k: eq.wq.bits for k, eq in qmodel.quant.embeddings.items()}
        assert len(tables) == (0 if e == "float" else 3)
        assert set(tables.values()) <= {e}
        got[e] = m.size
        shapes = [fmodel.get_parameter(w).shape for w in space.embeddings]
    for b in (8, 4):  # float32 rows -> b-bit codes + a float32 scale and zero point per row
        saved = sum(r * d * 4 - (math.ceil(r * d * b / 8) + 8 * r) for r, d in shapes)
        assert got["float"] - got[b] == saved


def test_latency_is_that_of_the_qdq_export_with_a_float_fallback(monkeypatch):
    _, x, space, net, data = _bert(SpaceConfig(embedding_bits=[8, "float"]))
    sub = reference_subnet(space)
    lat_in = {k: v[:1] for k, v in x.items()}
    m = measure(net, sub, data, data, _q("minmax", 16), True, lat_in, 3)
    assert m.latency_form == "qdq" and m.latency > 0 and not m.notes

    from slimformer.export.qdq import QdqModel

    def broken(self, *a, **k):
        raise RuntimeError("no QDQ today")

    monkeypatch.setattr(QdqModel, "forward", broken)
    m = measure(net, sub, data, data, _q("minmax", 16), True, lat_in, 3)
    assert m.latency_form == "float" and m.latency > 0
    assert len(m.notes) == 1 and "QDQ export failed" in m.notes[0] and "no QDQ today" in m.notes[0]


def test_exact_hypervolume_against_hand_computed_values():
    # 2-D: (0.2, 0.5) and (0.5, 0.2) in the unit box: 0.4 + 0.4 - 0.25
    assert dominated_volume(np.array([[0.2, 0.5], [0.5, 0.2]]), np.ones(2)) == pytest.approx(0.55)
    # 3-D: boxes [a, 1]^3 of (0.5, 0.5, 0.5) and (0, 0.75, 0.75): 0.125 + 0.0625 - 0.03125
    pts = np.array([[0.5, 0.5, 0.5], [0.0, 0.75, 0.75]])
    assert dominated_volume(pts, np.ones(3)) == pytest.approx(0.15625)
    # dominated and outside points add nothing; one point is a box
    more = np.vstack([pts, [[0.6, 0.6, 0.6], [0.1, 1.0, 0.1]]])
    assert dominated_volume(more, np.ones(3)) == pytest.approx(0.15625)
    assert dominated_volume(np.array([[0.5, 0.5, 0.5, 0.5]]), np.ones(4)) == pytest.approx(1 / 16)
    rows = [{"accuracy": 0.5, "size": 5, "latency": 1.0}]
    assert hypervolume(rows, ["accuracy", "size", "latency"], {"size": 10, "latency": 2.0}) == \
        pytest.approx(0.125)


def test_trials_of_a_dead_process_are_failed_through_the_public_api(tmp_path):
    storage = open_storage(str(tmp_path / "s.journal"))
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize"])
    dead, alive = study.ask(), study.ask()
    for t, pid in ((dead, 2**22 + 12345), (alive, None)):
        t.set_user_attr("host", socket.gethostname())
        if pid:
            t.set_user_attr("pid", pid)
    assert fail_stale(storage, study) == 1
    states = {t.number: t.state.name for t in study.trials}
    assert states == {dead.number: "FAIL", alive.number: "RUNNING"}


def test_a_trial_killed_before_it_was_owned_takes_no_place_in_the_budget(tmp_path, monkeypatch):
    # killed between ask() and setting its pid: phase "sample" is recorded, no owner
    from slimformer.nas import study as st

    storage = open_storage(str(tmp_path / "s.journal"))
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize"])
    orphan, owned = study.ask(), study.ask()
    for t in (orphan, owned):
        t.set_user_attr("phase", "sample")
    owned.set_user_attr("pid", os.getpid())
    assert st.count(study, "sample", running=True) == 1  # only the owned one is in the budget
    assert fail_stale(storage, study) == 0  # too young to call orphaned: it may be starting
    monkeypatch.setattr(st, "ORPHAN_SECONDS", -1.0)
    assert fail_stale(storage, study) == 1
    states = {t.number: t.state.name for t in study.trials}
    assert states == {orphan.number: "FAIL", owned.number: "RUNNING"}


def test_a_full_budget_still_measures_the_sub_network_of_a_dead_worker(tmp_path):
    """Two live workers took the last place of the budget while a third died mid-trial: the
    budget is full, yet the dead trial's sub-network is measured and nothing is left RUNNING or
    queued (the worker waits for it, fails it and measures it again)."""
    from types import SimpleNamespace

    from slimformer.nas import study as st

    _, _, space, _, _ = _bert(SpaceConfig())
    storage = open_storage(str(tmp_path / "s.journal"))
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize"])

    def evaluate(sub):
        return SimpleNamespace(accuracy=0.5, size=1.0, macs=1.0, latency=1.0, params=1,
                               sliced=True, seconds=0.0, latency_form="qdq", notes=[])

    assert st.sample_worker(storage, study, space, evaluate, ["accuracy"], 2, 0) == 2
    held = {t.user_attrs["sub"] for t in study.trials}
    rng = np.random.default_rng(5)
    sub = next(s for s in (space.draw(rng) for _ in range(100)) if s.key() not in held)
    dead = study.ask()
    for k, v in (("phase", "sample"), ("host", socket.gethostname()), ("pid", 2**22 + 12345),
                 ("sub", sub.key()), ("choices", space.to_params(sub))):
        dead.set_user_attr(k, v)
    assert st.sample_worker(storage, study, space, evaluate, ["accuracy"], 2, 1) == 1
    states = {t.number: t.state.name for t in study.trials}
    assert states[dead.number] == "FAIL"
    assert not [n for n, s in states.items() if s in ("RUNNING", "WAITING")]
    complete = [t.user_attrs["sub"] for t in study.trials if t.state.name == "COMPLETE"]
    assert complete.count(sub.key()) == 1 and len(complete) == 3


def test_embedding_bits_are_restricted_in_the_config_and_the_recipe():
    from pydantic import ValidationError

    from slimformer.nas.config import SearchConfig
    from slimformer.recipe import parse_recipe

    assert SpaceConfig().embedding_bits == [4, 8, "float"]
    cfg = SearchConfig(space={"embedding_bits": [3, "float"]})
    assert cfg.space.embedding_bits == [3, "float"]
    assert cfg.fingerprint() != SearchConfig().fingerprint()  # a study of other choices is refused
    with pytest.raises(ValidationError, match="embedding_bits"):
        SpaceConfig(embedding_bits=[16])
    rec = parse_recipe({"stages": [{"type": "search", "space": {"embedding_bits": [8]}}]})
    assert rec.stages[0].space.embedding_bits == [8]


def test_learned_rounding_settings_reach_the_sub_network_quantizer(monkeypatch):
    """``SearchConfig.clip_steps`` / ``recon_steps`` reach ``QuantConfig`` and the sub-network's
    quantizer: with ``recon_steps`` the rounding of every quantized Linear is learned with that many
    steps (kept or dropped by its held-out error, see tests/quantize/test_holdout.py), without it
    none is.
    """
    import slimformer.quantize.reconstruct as recon
    from slimformer.nas.config import SearchConfig
    from slimformer.nas.measure import extract, quant_config
    from slimformer.recipe import parse_recipe

    cfg = SearchConfig(quant={"method": "repquant", "clip_steps": 0, "recon_steps": 7})
    assert (cfg.quant.clip_steps, cfg.quant.recon_steps) == (0, 7)
    other = cfg.quant.model_copy(update={"recon_steps": 8})
    assert cfg.fingerprint() != cfg.model_copy(update={"quant": other}).fingerprint()
    rec = parse_recipe({"stages": [{"type": "search", "quant": {
        "method": "repquant", "recon_steps": 30, "clip_steps": 0}}]})
    q = rec.stages[0].search_config().quant
    assert (q.method, q.recon_steps, q.clip_steps) == ("repquant", 30, 0)

    _, x, space, net, data = _bert(SpaceConfig(heads=[1.0], mlp=[1.0], skip_blocks=False,
                                               weight_bits=[3, 8], embedding_bits=["float"]))
    full = space.largest()
    sub = dataclasses.replace(full, wbits=tuple(3 for _ in full.wbits), ebits="float")
    qc = quant_config(net, sub, extract(net, sub)[0], _q("repquant", 32, clip_steps=0,
                                                           recon_steps=7))
    assert (qc.method, qc.clip_steps, qc.recon_steps) == ("repquant", 0, 7)
    real, seen = recon.reconstruct_linear, []

    def spy(lq, x_q, x_fp, steps):  # the real reconstruction, its calls recorded
        seen.append((lq.param[0].shape, steps))
        return real(lq, x_q, x_fp, steps)

    monkeypatch.setattr(recon, "reconstruct_linear", spy)  # imported at call time
    calls = {}
    for steps in (0, 40):
        seen.clear()
        _, qmodel, _ = measure(net, sub, data, data,
                               _q("repquant", 32, clip_steps=0, recon_steps=steps), False,
                               return_model=True)
        calls[steps] = list(seen)
    n_linear = len(qmodel.quant.linears)
    assert calls[0] == []
    assert len(calls[40]) == n_linear and {s for _, s in calls[40]} == {40}, calls[40]


def _q(method: str, calib_samples: int, **kw):
    from slimformer.quantize.config import QuantConfig

    return QuantConfig(method=method, calib_samples=calib_samples, **kw)
