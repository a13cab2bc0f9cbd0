"""A stage that loses more than the budget with --fail-on-loss, and bad --max-loss values."""

import pytest

from .conftest import no_traceback


def test_fail_on_loss_is_a_typed_error_and_writes_nothing(tmp_path, cli):
    out = tmp_path / "p"
    res = cli("prune", "vit-digits-seq", "--method", "magnitude", "--finetune-steps", "0",
              "--limit", "200", "--out", out, "--fail-on-loss")
    assert res.exit_code == 2, res.output
    assert "error: StageError: stages[1] (prune): accuracy" in res.output
    assert "past the budget of 5" in res.output and "no report or model was written" in res.output
    no_traceback(res)
    # only what any failed run keeps: the output marker and resumable state (the prune search's
    # checkpoint); no report, no pruned model
    assert {f.name for f in out.iterdir()} <= {".slimformer-output", "state"}
    assert not list(tmp_path.glob(".p.*"))


@pytest.mark.parametrize("value, what", [
    ("-3", "--max-loss: accuracy_points: Input should be greater than or equal to 0"),
    ("{points: 2}", "--max-loss: points: unknown key"),
    ("lots", "--max-loss"),
])
def test_bad_max_loss_is_refused_before_the_model_loads(tmp_path, cli, value, what):
    res = cli("quantize", "vit-digits-seq", "--out", tmp_path / "q", f"--max-loss={value}")
    assert res.exit_code == 2 and "error: ConfigError" in res.output and what in res.output, \
        res.output
    no_traceback(res)
    assert not (tmp_path / "q").exists()
