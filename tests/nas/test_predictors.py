"""Predictors: rank correlation on held-out rows, automatic choice of the kind."""

import numpy as np
import pytest

from slimformer.nas.pareto import hypervolume, pareto_front
from slimformer.nas.predictors import fit_predictors


@pytest.mark.parametrize("kind", ["ridge", "svr", "mlp", "auto"])
def test_predictors_rank_held_out_rows(kind):
    rng = np.random.default_rng(0)
    x = rng.random((60, 8))
    ys = {"size": x @ np.arange(1, 9) + 0.01 * rng.standard_normal(60),
          "accuracy": 0.5 + 0.4 * np.tanh(x[:, :4].sum(1) - 2)}
    preds = fit_predictors(x, ys, kind, 0.25, seed=0)
    for p in preds.values():
        assert p.holdout == 15 and p.spearman > 0.8 and p.kendall > 0.65
        assert p.kind in ("ridge", "svr", "mlp")
    assert abs(preds["size"].predict(x[:3]) - ys["size"][:3]).max() < 0.5


def test_front_and_hypervolume():
    rows = [{"accuracy": 0.9, "size": 10}, {"accuracy": 0.8, "size": 5},
            {"accuracy": 0.7, "size": 6}, {"accuracy": 0.9, "size": 12}]
    front = pareto_front(rows, ["accuracy", "size"])
    assert front == [rows[1], rows[0]]
    # losses (0.2, 0.5) and (0.1, 1.0) against (1, 1) with size reference 10: only (0.2, 0.5)
    # counts (1.0 is on the boundary): 0.8 * 0.5
    assert hypervolume(front, ["accuracy", "size"], {"size": 10}) == pytest.approx(0.4)
    assert hypervolume(front, ["accuracy", "size"], {"size": 20}) > 0.4


def test_front_plot_is_drawn_without_touching_the_callers_backend(tmp_path):
    import matplotlib
    from matplotlib.image import imread

    from slimformer.nas.pareto import plot_front

    before = matplotlib.get_backend()
    rows = [{"accuracy": a, "size": s} for a, s in ((0.8, 10.0), (0.85, 20.0), (0.9, 40.0))]
    plot_front({"measured": rows, "measured front": rows[1:]}, ["accuracy", "size"],
               tmp_path / "f.png", {"accuracy": 0.9, "size": 50.0}, "t")
    img = imread(tmp_path / "f.png")
    assert img.shape[0] > 100 and img[..., :3].std() > 0.05  # drawn, not blank
    assert matplotlib.get_backend() == before
