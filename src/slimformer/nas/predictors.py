"""Light predictors of each objective from the architecture encoding (scikit-learn).

``fit_predictors`` fits ridge, SVR or a small MLP per objective on part of the measured sample
and reports Spearman and Kendall rank correlation on the held-out rest; ``auto`` keeps, per
objective, the kind with the best held-out Spearman, then refits it on the whole sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _make(kind: str, seed: int):
    from sklearn.linear_model import RidgeCV
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVR

    if kind == "ridge":
        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    if kind == "svr":
        return make_pipeline(StandardScaler(), SVR(C=10.0, epsilon=0.01))
    return make_pipeline(StandardScaler(), MLPRegressor(
        hidden_layer_sizes=(32, 32), alpha=1e-3, max_iter=3000, random_state=seed))


@dataclass
class Predictor:
    """One fitted objective predictor and its held-out quality."""

    objective: str
    kind: str
    spearman: float
    kendall: float
    holdout: int
    model: object
    mean: float
    scale: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted objective values for encodings ``x (N, F)``."""
        return self.model.predict(np.atleast_2d(x)) * self.scale + self.mean


def _rank_corr(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    from scipy.stats import kendalltau, spearmanr

    if len(y) < 3 or np.ptp(y) == 0 or np.ptp(p) == 0:
        return float("nan"), float("nan")
    return float(spearmanr(y, p).statistic), float(kendalltau(y, p).statistic)


def fit_predictors(x: np.ndarray, ys: dict[str, np.ndarray], kind: str, holdout: float,
                   seed: int) -> dict[str, Predictor]:
    """Fit one predictor per objective.

    Args:
        x: Encodings ``(N, F)`` of the measured sub-networks.
        ys: Objective name -> measured values ``(N,)``.
        kind: ``ridge`` | ``svr`` | ``mlp`` | ``auto``.
        holdout: Fraction of the rows held out for the rank correlation.
        seed: Split and MLP seed.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = max(3, int(round(holdout * len(x))))
    test, train = order[:n_test], order[n_test:]
    kinds = ("ridge", "svr", "mlp") if kind == "auto" else (kind,)
    out = {}
    for name, y in ys.items():
        mean, scale = float(np.mean(y)), float(np.std(y)) or 1.0
        z = (y - mean) / scale
        best = None
        if np.ptp(z[train]) == 0:  # a constant objective: nothing to learn
            from sklearn.dummy import DummyRegressor

            out[name] = Predictor(name, "constant", float("nan"), float("nan"), len(test),
                                  DummyRegressor().fit(x, z), mean, scale)
            continue
        for k in kinds:
            m = _make(k, seed).fit(x[train], z[train])
            rho, tau = _rank_corr(z[test], m.predict(x[test]))
            score = -1.0 if np.isnan(rho) else rho
            if best is None or score > best[0]:
                best = (score, k, rho, tau)
        _, k, rho, tau = best
        out[name] = Predictor(name, k, rho, tau, len(test), _make(k, seed).fit(x, z), mean, scale)
    return out
