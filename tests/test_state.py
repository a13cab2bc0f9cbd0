"""Resumable state lives under the output (state/) and is carried into each new output there."""

import json

from typer.testing import CliRunner

from slimformer.cli import app
from slimformer.store.outdir import MARKER, check_output

runner = CliRunner()
PRUNE = ["prune", "vit-digits-seq", "--method", "magnitude", "--finetune-steps", "0",
         "--structures", "mlp"]


def test_prune_checkpoints_live_under_out_and_resume(tmp_path):
    out = tmp_path / "p"
    res = runner.invoke(app, [*PRUNE, "--out", str(out)])
    assert res.exit_code == 0, res.output
    ckpts = list((out / "state" / "prune").glob("*/search.pt"))
    assert len(ckpts) == 1
    res = runner.invoke(app, [*PRUNE, "--out", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert "search resumed from checkpoint" in res.output  # the state was carried over
    assert list((out / "state" / "prune").glob("*/search.pt")) == ckpts
    res = runner.invoke(app, [*PRUNE, "--out", str(out), "--overwrite", "--ratio", "0.3"])
    assert res.exit_code == 0 and "resumed" not in res.output  # other settings: afresh
    assert len(list((out / "state" / "prune").glob("*/search.pt"))) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_an_output_holding_only_state_is_continued_without_overwrite(tmp_path):
    from slimformer.store.outdir import state_dir

    out = tmp_path / "unfinished"
    (state_dir(out) / "search").mkdir()  # what a killed search leaves
    assert json.loads((out / MARKER).read_text())["state"] == "state"
    assert check_output(out) == out  # no --overwrite needed to continue it
