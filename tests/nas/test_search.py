"""search(): end to end on a zoo model, resume after a kill, two worker processes, bad storage."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from slimformer.errors import ConfigError, StageError
from slimformer.models.loading import load_model
from slimformer.models.spec import ZooSpec
from slimformer.nas.api import search
from slimformer.nas.config import SearchConfig
from slimformer.nas.study import open_storage
from tests.nas.worker_main import digits

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, **kw) -> SearchConfig:
    base = dict(objectives=["accuracy", "size"], train_steps=10, batch_size=32, lr=1e-3,
                samples=8, nsga_trials=120, population=12, front_max=2, eval_limit=200,
                quant={"method": "minmax", "calib_samples": 32}, latency_repeats=3,
                storage=str(tmp_path / "{study}.journal"),
                supernet_path=str(tmp_path / "{study}.pt"))
    return SearchConfig(**(base | kw))


def _study(cfg):
    return optuna.load_study(study_name=cfg.study, storage=open_storage(cfg.storage_url()))


def _states(cfg) -> dict:
    out: dict = {}
    for t in _study(cfg).trials:
        key = (t.user_attrs.get("phase"), t.state.name)
        out[key] = out.get(key, 0) + 1
    return out


@pytest.mark.slow
def test_search_end_to_end(tmp_path):
    train, val, calib = digits()
    model = load_model(ZooSpec(name="vit-digits-seq")).module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(tmp_path, objectives=["accuracy", "latency", "size"],
               quant={"method": "repq", "calib_samples": 32},
               space={"weight_bits": [4, 8, "float"], "act_bits": [6, 8]})
    res = search(model, cfg, train, val, calib_data=calib)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _states(cfg) == {("reference", "COMPLETE"): 1, ("sample", "COMPLETE"): 8,
                            ("front", "COMPLETE"): 2}
    assert res.front and all(r["phase"] in ("sample", "front") for r in res.front)
    assert set(res.predictors) == {"accuracy", "latency", "size"}
    assert all(-1 <= p["spearman"] <= 1 for p in res.predictors.values())
    assert 0 < res.hypervolume < 1
    assert res.reference["accuracy"] > 0.9 and res.reference["latency"] > 0
    # the chosen sub-network is a real smaller model that gives its measured accuracy
    assert res.chosen in res.front
    from slimformer.data.datasets import make_loader
    from slimformer.models.evaluate import predict

    p, y = predict(res.model, make_loader(val, 256))
    assert float((p == y).float().mean()) == pytest.approx(res.chosen["accuracy"], abs=1e-6)
    assert sum(q.numel() for q in res.float_model.parameters()) == res.chosen["params"]
    # a second call resumes the finished study: nothing is trained or measured again
    again = search(model, cfg, train, val, calib_data=calib)
    assert again.train.get("resumed") and len(again.measured) == len(res.measured)


def _spawn(cfg_path, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + str(ROOT),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "tests.nas.worker_main", str(cfg_path),
                             *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_killed_search_resumes_without_losing_trials(tmp_path):
    cfg = _cfg(tmp_path, samples=10)
    path = tmp_path / "cfg.json"
    path.write_text(cfg.model_dump_json())
    proc = _spawn(path)
    deadline = time.time() + 240
    done = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            done = _states(cfg).get(("sample", "COMPLETE"), 0)
        except KeyError:  # the study is not created yet
            continue
        if done >= 3:
            break
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = {t.number: t.values for t in _study(cfg).trials if t.state.name == "COMPLETE"}
    assert len(killed) >= 4  # the reference and >= 3 samples survived the kill
    train, val, calib = digits()
    res = search(load_model(ZooSpec(name="vit-digits-seq")).module, cfg, train, val,
                 calib_data=calib)
    assert res.train.get("resumed")  # the super-network was not trained again
    states = _states(cfg)
    assert states[("sample", "COMPLETE")] == 10 and states[("reference", "COMPLETE")] == 1
    after = {t.number: t.values for t in _study(cfg).trials if t.state.name == "COMPLETE"}
    assert all(after[n] == v for n, v in killed.items())  # measured trials kept as they were
    # at most the one trial that was running when killed is marked failed
    assert states.get(("sample", "FAIL"), 0) + states.get(("sample", "RUNNING"), 0) <= 1


@pytest.mark.slow
def test_two_worker_processes_share_one_study(tmp_path):
    train, val, calib = digits()
    cfg = _cfg(tmp_path, samples=4)
    search(load_model(ZooSpec(name="vit-digits-seq")).module, cfg, train, val, calib_data=calib)
    more = cfg.model_copy(update={"samples": 12})  # same study: budgets are not settings
    path = tmp_path / "cfg.json"
    path.write_text(more.model_dump_json())
    procs = [_spawn(path, "worker") for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    trials = [t for t in _study(cfg).trials if t.user_attrs.get("phase") == "sample"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    # shared, not duplicated: unshared workers would measure 8 more each (20 in all)
    assert 12 <= len(complete) <= 13  # two workers may both start the last one
    # the first run + at least one worker (a worker that starts late may find nothing left to do:
    # both still report the shared total below)
    assert len({t.user_attrs["pid"] for t in complete}) >= 2
    assert not [t for t in trials if t.state.name != "COMPLETE"]
    assert sum(json.loads(o[0].strip().splitlines()[-1])["measured"] >= 12 for o in outs) == 2


def test_bad_storage_and_worker_without_supernet(tmp_path):
    with pytest.raises(ConfigError, match="cannot open database 'postgresql://nobody@"):
        open_storage("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(ConfigError, match="cannot open database 'sqlite:////no/such/dir/x.db'"):
        open_storage("sqlite:////no/such/dir/x.db")
    (tmp_path / "dir.journal").mkdir()
    with pytest.raises(ConfigError, match="cannot open journal file"):
        open_storage(str(tmp_path / "dir.journal"))
    train, val, calib = digits()
    model = load_model(ZooSpec(name="vit-digits-seq")).module
    with pytest.raises(StageError, match="no super-network"):
        search(model, _cfg(tmp_path), train, val, calib_data=calib, worker=True)
    with pytest.raises(ConfigError, match="single sub-network"):
        search(model, _cfg(tmp_path, space={"heads": [1.0], "mlp": [1.0], "skip_blocks": False,
                                            "weight_bits": [8]}), train, val)


def test_cli_search_help_and_errors(tmp_path):
    from typer.testing import CliRunner

    from slimformer.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["search", "--help"])
    assert res.exit_code == 0 and "--worker" in res.output
    res = runner.invoke(app, ["search", "vit-digits-seq", "--out", str(tmp_path / "o"),
                              "--objectives", "accuracy,speed"])
    assert res.exit_code == 2 and "unknown objective(s) 'speed'" in res.output
    res = runner.invoke(app, ["search", "vit-digits-seq", "--out", str(tmp_path / "o"),
                              "--storage", "postgresql://nobody@127.0.0.1:1/none"])
    assert res.exit_code == 2 and "cannot open database" in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_recipe_stage_search_then_evaluate(tmp_path):
    from slimformer.pipeline import run
    from slimformer.recipe import parse_recipe

    recipe = parse_recipe({
        "name": "nas-stage", "model": {"source": "zoo", "name": "vit-digits-seq"},
        "data": {"dataset": "digits-seq"},
        "stages": [{"type": "search", "val_rows": 200, "train_steps": 5, "samples": 6,
                    "front_max": 2, "nsga_trials": 60, "population": 10, "eval_limit": 200,
                    "quant": {"method": "minmax", "calib_samples": 32},
                    "storage": str(tmp_path / "{study}.journal"),
                    "supernet_path": str(tmp_path / "{study}.pt")},
                   {"type": "evaluate", "latency_batch_sizes": [1], "latency_repeats": 3}]})
    res = run(recipe, out_dir=tmp_path / "out")
    search_rec, eval_rec = res.report.stages
    # the reference, the 6 samples and up to front_max (2) predicted-front members not measured
    # yet. The predicted front follows the measured accuracies, which move with the thread count
    # of the fine-tuning, so it can hold one new member or none (CI: 7); test_search_end_to_end
    # checks that new front members are measured
    phases = [r["phase"] for r in json.loads(
        (tmp_path / "out" / "search" / "front.json").read_text())["measured"]]
    assert phases.count("reference") == 1 and phases.count("sample") == 6
    assert phases.count("front") <= 2 and search_rec.metrics["measured"] == len(phases)
    assert search_rec.metrics["front"] >= 1
    assert any("predictor accuracy" in n for n in search_rec.notes)
    assert (tmp_path / "nas-stage.journal").is_file()  # the study is named after the recipe
    # the evaluated model is the chosen sub-network, quantized: smaller than the float model
    assert eval_rec.size["bytes"] < res.report.model["bytes"]
    assert eval_rec.metrics["accuracy"] > 0.5
    for f in ("front.json", "front.md", "front.png", "chosen.json", "chosen.safetensors"):
        assert (tmp_path / "out" / "search" / f).is_file()
    # the chosen float sub-network rebuilds from the base model and the saved files
    from slimformer.models.structure import discover
    from slimformer.nas.output import load_chosen

    lm = load_model(ZooSpec(name="vit-digits-seq"))
    x = lm.example_inputs(4, seed=3)
    sub = load_chosen(lm.module, discover(lm.module, x), tmp_path / "out" / "search")
    chosen = json.loads((tmp_path / "out" / "search" / "front.json").read_text())["chosen"]
    assert sum(p.numel() for p in sub.parameters()) == chosen["params"]
    with torch.no_grad():
        assert sub(**x).shape == lm.module(**x).shape
