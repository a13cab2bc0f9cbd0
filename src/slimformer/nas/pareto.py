"""Pareto fronts, hypervolume and the front plot of measured sub-networks.

Rows are dicts with the objective values (``accuracy`` maximized; ``latency``, ``size``, ``macs``
minimized). Hypervolume is computed exactly (:func:`dominated_volume`, slicing along the last
objective down to a 2-D sweep) on losses ``1 - accuracy`` and ``cost / reference cost``, against
the reference point (1, 1, ...): the dominated share of the box between a perfect, free model
and a useless one as costly as the reference.
"""

from __future__ import annotations

import numpy as np


def losses(rows: list[dict], objectives: list[str], ref: dict[str, float]) -> np.ndarray:
    """``(N, k)`` losses: ``1 - accuracy`` and each cost divided by its reference value."""
    cols = [[1.0 - r["accuracy"] if o == "accuracy" else float(r[o]) / ref[o] for o in objectives]
            for r in rows]
    return np.asarray(cols, dtype=np.float64).reshape(len(rows), len(objectives))


def pareto_front(rows: list[dict], objectives: list[str]) -> list[dict]:
    """The non-dominated rows, sorted by their first cost objective."""
    ref = {o: 1.0 for o in objectives}
    lv = losses(rows, objectives, ref)
    keep = []
    for i in range(len(rows)):
        dominated = np.any(np.all(lv <= lv[i], axis=1) & np.any(lv < lv[i], axis=1))
        if not dominated:
            keep.append(i)
    cost = next(o for o in objectives if o != "accuracy")
    uniq = {id(rows[i]): rows[i] for i in keep}
    return sorted(uniq.values(), key=lambda r: (r[cost], -r["accuracy"]))


def dominated_volume(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact volume dominated by ``points`` ``(N, k)`` (minimized) inside the box up to ``ref``.

    Points not strictly below ``ref`` in every objective add nothing. ``k = 1, 2`` directly
    (a sweep); higher ``k`` by slices along the last objective, each a ``(k-1)``-D volume:
    ``O(N^(k-1) log N)``, fine for the few dozen measured points of a search.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, len(ref))
    ref = np.asarray(ref, dtype=np.float64)
    pts = pts[np.all(pts < ref, axis=1)]
    if not len(pts):
        return 0.0
    if len(ref) == 1:
        return float(ref[0] - pts[:, 0].min())
    if len(ref) == 2:
        vol, best = 0.0, ref[1]
        for x, y in pts[np.lexsort((pts[:, 1], pts[:, 0]))]:  # by x, then y
            if y < best:
                vol += (ref[0] - x) * (best - y)
                best = y
        return float(vol)
    pts = pts[np.argsort(pts[:, -1], kind="stable")]
    vol = 0.0
    for i in range(len(pts)):
        top = pts[i + 1, -1] if i + 1 < len(pts) else ref[-1]
        if top > pts[i, -1]:  # the slab [z_i, z_{i+1}) is dominated by the first i+1 points
            vol += (top - pts[i, -1]) * dominated_volume(pts[:i + 1, :-1], ref[:-1])
    return float(vol)


def hypervolume(rows: list[dict], objectives: list[str], ref: dict[str, float]) -> float:
    """Hypervolume of ``rows`` against reference costs ``ref`` (see the module docstring)."""
    lv = losses(rows, objectives, ref)
    return dominated_volume(lv, np.ones(len(objectives)))


def plot_front(groups: dict[str, list[dict]], objectives: list[str], path,
               reference: dict | None = None, title: str = "") -> None:
    """Scatter accuracy against each cost objective; one series per group; PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    costs = [o for o in objectives if o != "accuracy"]
    fig = Figure(figsize=(5 * len(costs), 3.8))  # no pyplot: the caller's backend is untouched
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(costs), squeeze=False)
    unit = {"latency": "latency (ms)", "size": "size (bytes)", "macs": "MACs per sample"}
    for ax, c in zip(axes[0], costs, strict=True):
        for (label, rows), style in zip(groups.items(), ("o", "s", "^", "x", "d"), strict=False):
            if rows:
                pts = sorted(rows, key=lambda r: r[c])
                ax.plot([r[c] for r in pts], [r["accuracy"] for r in pts], style,
                        linestyle="none", label=label, alpha=0.7,
                        ms=9 if "front" in label else 6, fillstyle="none" if "front" in label
                        else "full")
        if reference:
            ax.plot([reference[c]], [reference["accuracy"]], "*", ms=14, label="INT8 full model")
        ax.set_xlabel(unit[c])
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
