"""Restoring a saved folder: the base model built once, then the recorded stages replayed."""

import json
from typing import get_args

import pytest
import torch

import slimformer.models.loading as loading
from slimformer.data.datasets import get_dataset
from slimformer.errors import ModelLoadError
from slimformer.models.spec import ZooSpec
from slimformer.models.structure import discover
from slimformer.prune.serialize import save_pruned
from slimformer.prune.slicing import SliceSpec, slice_model
from slimformer.quantize.api import quantize
from slimformer.quantize.config import QuantConfig
from slimformer.quantize.inference import to_inference
from slimformer.quantize.serialize import save_quantized
from slimformer.stages import HANDLERS
from slimformer.stages.artifact import restore
from slimformer.store.integrity import seal

ZOO = ZooSpec(name="vit-digits-seq")
SLICES = SliceSpec(heads={0: (0,)}, mlp={1: tuple(range(0, 32, 2))}, dims={})


def _x(n=4):
    return {"x": get_dataset("digits-seq", "test").inputs["x"][:n]}


def _sliced():
    """The base model sliced by :data:`SLICES`, float."""
    lm = loading.load_model(ZOO)
    return slice_model(lm.module, discover(lm.module, _x(2)), SLICES, check_inputs=_x(2))


def _counting(monkeypatch) -> list:
    """Record every base model built (the real loader runs)."""
    built, real = [], loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda spec: built.append(spec) or real(spec))
    return built


def test_one_table_holds_every_recipe_stage():
    from slimformer.recipe import Stage

    assert {h.schema for h in HANDLERS.values()} == set(get_args(get_args(Stage)[0]))
    for name, h in HANDLERS.items():
        assert h.schema.model_fields["type"].default == name
        assert (h.restore is None) == (h.saves is None)  # what writes a model replays it
        assert h.after_quantized is None or not h.after_quantized.startswith("stages[")
    # qat writes the same quantized folder as quantize (its stage recorded after it)
    assert sorted(h.saves for h in HANDLERS.values() if h.saves) == ["pruned", "quantized",
                                                                     "quantized", "search"]


def test_pruned_then_quantized_folder_replays_on_one_base_model(tmp_path, monkeypatch):
    small = _sliced()
    res = quantize(small, QuantConfig(method="minmax", weight_bits=4, act_bits=8),
                   get_dataset("digits-seq", "calib", limit=64))
    qmodel = to_inference(res.model)
    save_quantized(qmodel, tmp_path / "q", ZOO, SLICES)
    float_ref = _sliced()
    built = _counting(monkeypatch)
    r = restore(tmp_path / "q")
    assert len(built) == 1  # the base model is built once (it was built twice before)
    assert r.applied == ["prune", "quantize"] and r.slice_spec == SLICES
    with torch.no_grad():
        assert torch.equal(r.module(**_x()), qmodel(**_x()))
        # the float reference is the sliced base, untouched by the quantizers wrapped round a copy
        assert torch.equal(r.loaded.module(**_x()), float_ref(**_x()))
        assert not torch.equal(r.loaded.module(**_x()), r.module(**_x()))


def test_pruned_folder_replays_its_slices_and_loads_its_weights(tmp_path, monkeypatch):
    small = _sliced()
    with torch.no_grad():
        for p in small.parameters():  # fine-tuned weights: not the base model's
            p.mul_(0.5)
    save_pruned(small, tmp_path / "p", ZOO, SLICES, config={"ratio": 0.5})
    built = _counting(monkeypatch)
    r = restore(tmp_path / "p")
    assert len(built) == 1 and r.applied == ["prune"] and r.module is r.loaded.module
    with torch.no_grad():
        assert torch.equal(r.module(**_x()), small(**_x()))


def _edit_stages(folder, weights, stages):
    """Rewrite the recorded stages and seal the manifest again (a consistent, wrong writer)."""
    meta = json.loads((folder / "slimformer.json").read_text())
    meta["stages"] = stages(meta["stages"])
    (folder / "slimformer.json").write_text(json.dumps(seal(meta, folder, [weights])))


def test_stages_that_cannot_be_replayed_are_refused(tmp_path, monkeypatch):
    save_pruned(_sliced(), tmp_path / "p", ZOO, SLICES)
    built = _counting(monkeypatch)
    _edit_stages(tmp_path / "p", "pruned.safetensors", lambda s: [{"stage": "evaluate"}, *s])
    with pytest.raises(ModelLoadError, match=r"stages\[0\] is 'evaluate', not a stage that "
                                             r"changes the model \(quantize, prune, qat, search\)"):
        restore(tmp_path / "p")
    _edit_stages(tmp_path / "p", "pruned.safetensors", lambda s: [s[-1], {"stage": "quantize"}])
    with pytest.raises(ModelLoadError, match=r"last recorded stage \(quantize\) did not write "
                                             "this pruned folder"):
        restore(tmp_path / "p")
    assert built == []  # refused before any model was built
    _edit_stages(tmp_path / "p", "pruned.safetensors", lambda s: [s[0], s[0]])
    with pytest.raises(ModelLoadError, match="records two prune stages but one slice spec"):
        restore(tmp_path / "p")
