"""UPop's unified progressive search, and the magnitude baseline's selection.

UPop (Shi et al., 2023): learnable masks on every head and MLP unit; loss = task loss + L1 on the
masks; every ``interval`` steps the accumulated mask gradients are standardized per kind
(heads, head dims, MLP units), all units of all layers and towers are ranked together, and the units with
the largest gradients (those the loss pushes down hardest) whose cost adds up to the current
target ``pi(t) = p sqrt((1 - cos(pi t / T)) / 2)`` get mask ``1 - pi(t)/p`` while the rest go
back to 1. At ``t = T`` the chosen units have mask 0: they are what slicing removes.
``score="taylor"`` ranks by summed squared mask gradients per unit of cost instead (Molchanov et
al., 2019; Kwon et al., 2022: a Fisher estimate of the loss a unit's removal costs).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimformer.prune.train import Progress, batches, optimizer, trainable
from slimformer.prune.units import Masks, UnitGroup, magnitude_scores


def schedule(step: int, total: int, p: float) -> float:
    """UPop's cosine-shaped target ratio ``pi(t)``."""
    return p * math.sqrt((1 - math.cos(math.pi * min(step, total) / total)) / 2)


def choose(score: list[torch.Tensor], groups: list[UnitGroup], fraction: float) -> list[torch.Tensor]:
    """Pruned units: highest ``score`` first until their cost reaches ``fraction`` of the total.

    Every site keeps at least its lowest-scored unit. Returns one boolean ``(n,)`` per group.
    """
    flat = torch.cat(score).clone().float()
    cost = torch.cat([torch.full((g.n,), float(g.cost)) for g in groups])
    offsets = [0]
    for g in groups:
        offsets.append(offsets[-1] + g.n)
    for j in range(len(groups)):  # the best unit of each site is never pruned
        flat[offsets[j] + int(score[j].argmin())] = -math.inf
    order = torch.argsort(flat, descending=True, stable=True)
    cum = torch.cumsum(cost[order], 0)
    goal = fraction * float(cost.sum())
    k = int(torch.argmin((cum - goal).abs())) + 1 if goal > 0 else 0
    k = min(k, int(torch.isfinite(flat).sum()))
    pruned = torch.zeros(len(flat), dtype=torch.bool)
    pruned[order[:k]] = True
    return [pruned[offsets[j]:offsets[j + 1]] for j in range(len(groups))]


def kept_cost(groups: list[UnitGroup], keep: list[torch.Tensor]) -> float:
    """Cost of the kept units; where a site loses heads and head dims, they multiply.

    A head's cost counts all its dims and a dim's cost all heads, so at such a site the kept
    attention cost is ``(heads + dims) cost x kept heads / heads x kept dims / dims``.
    """
    by_site: dict[int, dict[str, tuple[UnitGroup, int]]] = {}
    total = 0.0
    for g, k in zip(groups, keep, strict=True):
        if g.kind == "mlp":
            total += int(k.sum()) * g.cost
        else:
            by_site.setdefault(g.site, {})[g.kind] = (g, int(k.sum()))
    for kinds in by_site.values():
        h = kinds.pop("heads", None)
        fh = h[1] / h[0].n if h else 1.0
        if not kinds:  # heads only
            total += h[1] * h[0].cost
            continue
        for g, k in kinds.values():  # dims, or dims_qk and dims_v
            total += g.n * g.cost * fh * k / g.n
    return total


def choose_exact(score: list[torch.Tensor], groups: list[UnitGroup],
                 fraction: float) -> list[torch.Tensor]:
    """:func:`choose`, with the fraction raised until the removed :func:`kept_cost` reaches it."""
    pruned = choose(score, groups, fraction)
    if not any(g.kind == "heads" for g in groups) or all(g.kind in ("heads", "mlp")
                                                          for g in groups):
        return pruned
    full = kept_cost(groups, [torch.ones(g.n, dtype=torch.bool) for g in groups])
    goal = fraction * full
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        trial = choose(score, groups, mid)
        if full - kept_cost(groups, [~p for p in trial]) < goal:
            lo = mid
        else:
            hi, pruned = mid, trial
    return pruned


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-12) if x.numel() > 1 else x * 0


def _scores(grads: list[torch.Tensor], groups: list[UnitGroup], taylor: bool) -> list[torch.Tensor]:
    """Per group, the score :func:`choose` cuts first at the top ``(n,)``.

    ``gradient``: mask gradients standardized per kind (UPop). ``taylor``: minus the summed
    squared gradients per unit of cost (the least loss per parameter is cut first).
    """
    if taylor:
        return [-g / grp.cost for g, grp in zip(grads, groups, strict=True)]
    std: dict[int, torch.Tensor] = {}
    for kind in dict.fromkeys(g.kind for g in groups):
        idx = [j for j, g in enumerate(groups) if g.kind == kind]
        z = _standardize(torch.cat([grads[j] for j in idx]))
        for j, part in zip(idx, z.split([groups[j].n for j in idx]), strict=True):
            std[j] = part
    return [std[j] for j in range(len(groups))]


def upop_search(model: nn.Module, groups: list[UnitGroup], cfg, data, loss_fn,
                progress: Progress = None) -> list[torch.Tensor]:
    """Run the search on ``model`` (trained in place); returns the kept units per group."""
    trainable(model)
    opt, sched = optimizer(model, cfg.search_lr, cfg.weight_decay, cfg.search_steps, cfg.warmup)
    it = batches(data, cfg.batch_size, cfg.seed)
    total_steps, p = cfg.search_steps, cfg.ratio
    taylor = cfg.score == "taylor"
    pruned = [torch.zeros(g.n, dtype=torch.bool) for g in groups]
    acc = [torch.zeros(g.n) for g in groups]  # summed over the interval
    ema = None
    model.train()
    with Masks(model, groups) as masks:
        for step in range(1, total_steps + 1):
            inputs, labels = next(it)
            loss = loss_fn(model, inputs, labels)
            sparsity = sum(m.abs().sum() for m in masks.values)
            opt.zero_grad(set_to_none=True)
            (loss + cfg.sparsity_weight * sparsity).backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for a, m in zip(acc, masks.values, strict=True):
                    if m.grad is not None:
                        if taylor:  # the task loss's own gradient (minus the L1 term), squared
                            a += (m.grad - cfg.sparsity_weight * m.sign()).float().pow(2)
                        else:
                            a += m.grad
                    m.grad = None
            if step % cfg.interval == 0 or step == total_steps:
                pi = schedule(step, total_steps, p)
                grads = acc
                if cfg.score_momentum > 0:  # running sum over intervals: less batch noise
                    ema = grads if ema is None else [cfg.score_momentum * e + g
                                                     for e, g in zip(ema, grads, strict=True)]
                    grads = ema
                pruned = choose_exact(_scores(grads, groups, taylor), groups, pi)
                alpha = 1.0 - pi / p
                with torch.no_grad():
                    for m, pr in zip(masks.values, pruned, strict=True):
                        m.copy_(torch.where(pr, torch.full_like(m, alpha), torch.ones_like(m)))
                acc = [torch.zeros(g.n) for g in groups]
            if progress:
                progress("search", step, total_steps)
    model.eval()
    return [~pr for pr in pruned]


def magnitude_keep(model: nn.Module, groups: list[UnitGroup], ratio: float) -> list[torch.Tensor]:
    """Baseline: cut every site by ``ratio`` (rounded, >= 1 unit kept), smallest norms first.

    Where an attention site loses both heads and head dims, each keeps ``sqrt(1 - ratio)``.
    """
    factors: dict[int, set[str]] = {}
    for g in groups:
        if g.kind != "mlp":
            factors.setdefault(g.site, set()).add("heads" if g.kind == "heads" else "dims")
    keep = []
    for g, s in zip(groups, magnitude_scores(model, groups), strict=True):
        f = 1 if g.kind == "mlp" else len(factors[g.site])
        n_keep = max(1, min(g.n, round(g.n * (1 - ratio) ** (1 / f))))
        k = torch.zeros(g.n, dtype=torch.bool)
        k[torch.argsort(s, descending=True)[:n_keep]] = True
        keep.append(k)
    return keep
