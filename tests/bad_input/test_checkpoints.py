"""Checkpoints of another run: prune checkpoints, search super-networks and studies.

A checkpoint is keyed by fingerprints of the model's weights, the data and the config; one
of another model of the same shape, other data or another config is refused by name, and a
damaged one is a typed error, never a traceback or a silent restart.
"""

import copy

import pytest
import torch

from slimformer.data.datasets import TensorDictDataset, get_dataset
from slimformer.errors import ConfigError, ModelLoadError, StageError
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.nas.config import SearchConfig
from slimformer.prune import PruneConfig, prune


@pytest.fixture(scope="module")
def task():
    lm = load_model(ZooSpec(name="vit-digits-seq"))
    return lm.module, get_dataset("digits-seq", "calib")


def _other_weights(model):
    """The same architecture and shapes, other weights (another training run)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    return other


FAST = PruneConfig(method="magnitude", ratio=0.5, finetune_steps=0)


def test_prune_checkpoint_of_another_model_data_or_config_is_refused(task, tmp_path):
    model, data = task
    first = prune(model, FAST, data, checkpoint=tmp_path)
    assert (tmp_path / "search.pt").is_file() and not first.notes
    again = prune(model, FAST, data, checkpoint=tmp_path)
    assert "search resumed from checkpoint" in again.notes  # the same run resumes
    ckpt = str(tmp_path / "search.pt")
    with pytest.raises(ModelLoadError, match=rf"checkpoint {ckpt} was made with another model"):
        prune(_other_weights(model), FAST, data, checkpoint=tmp_path)
    shuffled = TensorDictDataset({"x": data.inputs["x"].flip(0)}, data.labels.flip(0))
    with pytest.raises(ModelLoadError, match="another training data"):
        prune(model, FAST, shuffled, checkpoint=tmp_path)
    with pytest.raises(ModelLoadError, match="another prune config") as e:
        prune(model, FAST.model_copy(update={"ratio": 0.25}), data, checkpoint=tmp_path)
    assert "delete" in str(e.value) and "another checkpoint folder" in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_corrupt_prune_checkpoint_is_a_typed_error(task, tmp_path, damage):
    model, data = task
    prune(model, FAST, data, checkpoint=tmp_path)
    f = tmp_path / "search.pt"
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "garbage":
        f.write_bytes(b"not a checkpoint\n" * 50)
    else:  # a valid torch file that no slimformer run wrote
        torch.save({"state": {}}, f)
    match = "has no model/data/config fingerprint" if damage == "foreign" else "cannot be read"
    with pytest.raises(ModelLoadError, match=match):
        prune(model, FAST, data, checkpoint=tmp_path)


def _search_cfg(tmp_path, **kw):
    return SearchConfig(**{"train_steps": 2, "batch_size": 16, "importance_batches": 1,
                           "samples": 4, "eval_limit": 32,
                           "quant": {"method": "minmax", "calib_samples": 16},
                           "storage": str(tmp_path / "{study}.journal"),
                           "supernet_path": str(tmp_path / "{study}.pt")} | kw)


def _supernet_file(model, cfg, train, val):
    """Train and save the super-network of ``model`` the way search() does (2 steps)."""
    from slimformer.nas import api

    structure, _, net, _ = api._prepare(copy.deepcopy(model).eval(), cfg, val, None)
    keys = api.fingerprints(model, structure, cfg, train, val)
    return api._supernet(net, cfg, train, None, keys["supernet"])


def test_supernet_of_another_model_or_damaged_is_refused(task, tmp_path):
    from slimformer.nas.api import search

    model, data = task
    train, val = data, get_dataset("digits-seq", "test", limit=32)
    cfg = _search_cfg(tmp_path, supernet_path=str(tmp_path / "shared.pt"))
    assert not _supernet_file(model, cfg, train, val).get("resumed")
    assert _supernet_file(model, cfg, train, val).get("resumed")  # same model: reused
    path = tmp_path / "shared.pt"
    before = path.read_bytes()

    def run(m, data=train, **kw):  # a fresh study each time: the super-network file is shared
        search(m, cfg.model_copy(update={"study": f"s{len(kw)}{id(data)}{id(m)}", **kw}),
               data, val)

    with pytest.raises(ModelLoadError, match=rf"super-network file {path} was trained from "
                                             r"another model .*delete"):
        run(_other_weights(model))
    with pytest.raises(ModelLoadError, match="trained from another data"):
        run(model, TensorDictDataset({"x": train.inputs["x"] + 0.01}, train.labels))
    with pytest.raises(ModelLoadError, match="trained from another config"):
        run(model, lr=1e-3)
    assert path.read_bytes() == before  # refused, not overwritten
    path.write_bytes(before[:1000])
    with pytest.raises(ModelLoadError, match=rf"super-network file {path} cannot be read"):
        run(model)


def test_study_of_another_model_is_refused(task, tmp_path):
    from slimformer.nas.api import search

    model, data = task
    val = get_dataset("digits-seq", "test", limit=32)
    cfg = _search_cfg(tmp_path)
    with pytest.raises(StageError, match="no super-network"):  # creates the study, then stops
        search(model, cfg, data, val, worker=True)
    with pytest.raises(ConfigError, match="'search' exists in this storage, measured with "
                                          r"another model \(other weights"):
        search(_other_weights(model), cfg, data, val, worker=True)
    with pytest.raises(ConfigError, match="measured with another data"):
        search(model, cfg, data, get_dataset("digits-seq", "test", limit=33), worker=True)
