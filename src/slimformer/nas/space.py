"""The search space of a model: blocks, heads and MLP widths per layer, bits per layer/embeddings.

Everything comes from the structure map and one recorded forward pass, never from module names:
a *residual block* is the outermost module that (a) returns a tensor of its input's shape,
(b) adds its input to something inside itself (``x + f(x)``, pre- or post-norm) and (c) holds
exactly one attention site. Its MLPs and Linears are those whose weights it owns.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from slimformer.errors import ConfigError
from slimformer.nas.config import SpaceConfig

FLOAT_BITS = 16  # how "float" is encoded for the predictors


@dataclass(frozen=True)
class Block:
    """A residual block: module path, attention/MLP site indices inside, its Linear weights."""

    path: str
    attention: tuple[int, ...]
    mlps: tuple[int, ...]
    linears: tuple[str, ...]
    output_tuple: int  # 0: returns a tensor; n: returns a tuple of n items (hidden state first)
    droppable: bool = True  # False when it returns more tensors than its hidden state


@dataclass(frozen=True)
class SubNet:
    """One sub-network: kept blocks, heads / MLP units kept per site, bits per block.

    ``ebits``: bits of the model's embedding tables (per-row, weight only; ``float``: kept).
    """

    keep: tuple[bool, ...]
    heads: tuple[int, ...]
    mlp: tuple[int, ...]
    wbits: tuple[int | str, ...]
    abits: tuple[int | str, ...]
    ebits: int | str = "float"

    def key(self) -> str:
        """A compact unique string."""
        return (f"k{''.join('1' if k else '0' for k in self.keep)}-h{'.'.join(map(str, self.heads))}"
                f"-m{'.'.join(map(str, self.mlp))}-w{'.'.join(map(str, self.wbits))}"
                f"-a{'.'.join(map(str, self.abits))}-e{self.ebits}")


@dataclass(frozen=True)
class SearchSpace:
    """Per-layer choices of one model.

    Attributes:
        blocks: Residual blocks in execution order (empty: depth is not elastic).
        head_choices / mlp_choices: Allowed kept counts per attention / MLP site (structure order).
        full_heads / full_mlp: Counts of the unpruned model.
        head_dim: Head width per attention site.
        skippable: Block indices that may be dropped.
        min_blocks: Fewest blocks kept.
        weight_bits / act_bits: Per-block bit choices (``float`` = not quantized).
        groups: Linear weight names per bit group (one group per block; one global group when no
            block was found).
        embedding_bits: Bit choices of the embedding tables, one choice per model (``float``
            only when the model has no ``nn.Embedding``).
        embeddings: Weight names of the model's embedding tables.
    """

    blocks: tuple[Block, ...]
    head_choices: tuple[tuple[int, ...], ...]
    mlp_choices: tuple[tuple[int, ...], ...]
    full_heads: tuple[int, ...]
    full_mlp: tuple[int, ...]
    head_dim: tuple[int, ...]
    skippable: tuple[int, ...]
    min_blocks: int
    weight_bits: tuple[int | str, ...]
    act_bits: tuple[int | str, ...]
    groups: tuple[tuple[str, ...], ...]
    embedding_bits: tuple[int | str, ...] = ("float",)
    embeddings: tuple[str, ...] = ()

    # --- sampling -------------------------------------------------------------------------
    def suggest(self, trial) -> SubNet:
        """Draw a sub-network through an Optuna trial (categorical parameters) and repair it."""
        keep = [trial.suggest_categorical(f"keep{i}", [1, 0]) if i in self.skippable else 1
                for i in range(len(self.blocks))]
        heads = [trial.suggest_categorical(f"heads{i}", list(c)) if len(c) > 1 else c[0]
                 for i, c in enumerate(self.head_choices)]
        mlp = [trial.suggest_categorical(f"mlp{i}", list(c)) if len(c) > 1 else c[0]
               for i, c in enumerate(self.mlp_choices)]
        wb = [self._bits(trial, f"w{g}", self.weight_bits) for g in range(len(self.groups))]
        ab = [self._bits(trial, f"a{g}", self.act_bits) for g in range(len(self.groups))]
        eb = self._bits(trial, "emb", self.embedding_bits)
        return self.repair(SubNet(tuple(bool(k) for k in keep), tuple(heads), tuple(mlp),
                                  tuple(wb), tuple(ab), eb))

    @staticmethod
    def _bits(trial, name: str, choices: tuple) -> int | str:
        if len(choices) == 1:
            return choices[0]
        return trial.suggest_categorical(name, [str(c) for c in choices]) if any(
            c == "float" for c in choices) else trial.suggest_categorical(name, list(choices))

    def repair(self, sub: SubNet) -> SubNet:
        """Keep at least ``min_blocks`` blocks (dropped ones are restored from the first)."""
        keep = list(sub.keep)
        for i in range(len(keep)):
            if sum(keep) >= self.min_blocks:
                break
            keep[i] = True
        wb = tuple(int(b) if str(b).isdigit() else "float" for b in sub.wbits)
        ab = tuple(int(b) if str(b).isdigit() else "float" for b in sub.abits)
        eb = int(sub.ebits) if str(sub.ebits).isdigit() else "float"
        return SubNet(tuple(keep), sub.heads, sub.mlp, wb, ab, eb)

    def random(self, rng: np.random.Generator) -> SubNet:
        """A uniformly drawn sub-network (repaired)."""
        pick = lambda c: c[int(rng.integers(len(c)))]  # noqa: E731
        keep = tuple(bool(rng.integers(2)) if i in self.skippable else True
                     for i in range(len(self.blocks)))
        return self.repair(SubNet(
            keep, tuple(pick(c) for c in self.head_choices),
            tuple(pick(c) for c in self.mlp_choices),
            tuple(pick(self.weight_bits) for _ in self.groups),
            tuple(pick(self.act_bits) for _ in self.groups), pick(self.embedding_bits)))

    def draw(self, rng: np.random.Generator) -> SubNet:
        """A random sub-network at a random compression level (the measured sample).

        A level ``u ~ U(0, 1)`` is drawn first; each block is dropped with probability ``u / 2``
        and each width choice steps down from the full one ``Binomial(choices - 1, u)`` times,
        so the sample covers mildly compressed sub-networks as well as small ones (uniform
        draws are almost all small). Bit-widths are drawn uniformly.
        """
        u = float(rng.random())
        step = lambda c: c[len(c) - 1 - int(rng.binomial(len(c) - 1, u))]  # noqa: E731
        pick = lambda c: c[int(rng.integers(len(c)))]  # noqa: E731
        keep = tuple(not (i in self.skippable and rng.random() < u / 2)
                     for i in range(len(self.blocks)))
        return self.repair(SubNet(
            keep, tuple(step(c) for c in self.head_choices),
            tuple(step(c) for c in self.mlp_choices),
            tuple(pick(self.weight_bits) for _ in self.groups),
            tuple(pick(self.act_bits) for _ in self.groups), pick(self.embedding_bits)))

    def largest(self) -> SubNet:
        """Every block, head and unit; the widest bits."""
        best = lambda c: max(c, key=_bits_value)  # noqa: E731
        return SubNet(tuple(True for _ in self.blocks), tuple(c[-1] for c in self.head_choices),
                      tuple(c[-1] for c in self.mlp_choices),
                      tuple(best(self.weight_bits) for _ in self.groups),
                      tuple(best(self.act_bits) for _ in self.groups), best(self.embedding_bits))

    def anchors(self) -> list[SubNet]:
        """The full model at each uniform weight bit-width (widest activations) and the smallest.

        Each anchor's embedding tables get the embedding choice nearest its weight bits (the
        wider one on a tie). Measured first, so the predictors see the corners of the space that
        random draws miss.
        """
        full, act = self.largest(), max(self.act_bits, key=_bits_value)
        near = lambda b: min(self.embedding_bits, key=lambda e: (  # noqa: E731
            abs(_bits_value(e) - _bits_value(b)), -_bits_value(e)))
        out = [dataclasses.replace(full, wbits=tuple(b for _ in self.groups),
                                   abits=tuple(act for _ in self.groups), ebits=near(b))
               for b in sorted(self.weight_bits, key=_bits_value, reverse=True)]
        out.append(self.smallest())
        return list({a.key(): a for a in out}.values())

    def smallest(self) -> SubNet:
        """Fewest blocks (later ones dropped first), heads and units; the narrowest bits."""
        keep = [True] * len(self.blocks)
        for i in reversed(self.skippable):
            if sum(keep) <= self.min_blocks:
                break
            keep[i] = False
        low = lambda c: min(c, key=_bits_value)  # noqa: E731
        return SubNet(tuple(keep), tuple(c[0] for c in self.head_choices),
                      tuple(c[0] for c in self.mlp_choices),
                      tuple(low(self.weight_bits) for _ in self.groups),
                      tuple(low(self.act_bits) for _ in self.groups), low(self.embedding_bits))

    def from_params(self, params: dict) -> SubNet:
        """Rebuild a sub-network from Optuna trial parameters."""
        class _Fixed:
            def suggest_categorical(self, name, choices):
                return params[name]

        return self.suggest(_Fixed())

    def to_params(self, sub: SubNet) -> dict:
        """Optuna parameters that :meth:`from_params` turns back into ``sub``."""
        p: dict = {}
        for i in self.skippable:
            p[f"keep{i}"] = int(sub.keep[i])
        for i, c in enumerate(self.head_choices):
            if len(c) > 1:
                p[f"heads{i}"] = sub.heads[i]
        for i, c in enumerate(self.mlp_choices):
            if len(c) > 1:
                p[f"mlp{i}"] = sub.mlp[i]
        for pre, vals, choices in (("w", sub.wbits, self.weight_bits),
                                   ("a", sub.abits, self.act_bits)):
            if len(choices) > 1:
                as_str = any(c == "float" for c in choices)
                for g, b in enumerate(vals):
                    p[f"{pre}{g}"] = str(b) if as_str else b
        if len(self.embedding_bits) > 1:
            as_str = any(c == "float" for c in self.embedding_bits)
            p["emb"] = str(sub.ebits) if as_str else sub.ebits
        return p

    # --- encoding -------------------------------------------------------------------------
    def site_kept(self, sub: SubNet) -> tuple[list[bool], list[bool]]:
        """Whether each attention / MLP site survives (its block is kept)."""
        attn, mlp = [True] * len(self.head_choices), [True] * len(self.mlp_choices)
        for b, blk in enumerate(self.blocks):
            for i in blk.attention:
                attn[i] = attn[i] and sub.keep[b]
            for i in blk.mlps:
                mlp[i] = mlp[i] and sub.keep[b]
        return attn, mlp

    def encode(self, sub: SubNet) -> np.ndarray:
        """Feature vector for the predictors: per block kept, per site kept fractions, bits."""
        attn, mlp = self.site_kept(sub)
        f = [float(k) for k in sub.keep]
        f += [h / n * a for h, n, a in zip(sub.heads, self.full_heads, attn, strict=True)]
        f += [m / n * a for m, n, a in zip(sub.mlp, self.full_mlp, mlp, strict=True)]
        f += [_bits_value(b) / FLOAT_BITS for b in (*sub.wbits, *sub.abits, sub.ebits)]
        # aggregates help the linear predictors: kept share of blocks, heads, units; mean bits
        f += [float(np.mean(sub.keep)) if sub.keep else 1.0,
              sum(h * a for h, a in zip(sub.heads, attn, strict=True)) / max(1, sum(
                  self.full_heads)),
              sum(m * a for m, a in zip(sub.mlp, mlp, strict=True)) / max(1, sum(self.full_mlp)),
              float(np.mean([_bits_value(b) for b in sub.wbits])) / FLOAT_BITS]
        return np.asarray(f, dtype=np.float64)

    def size(self) -> int:
        """Number of distinct sub-networks."""
        n = 2 ** len(self.skippable)
        for c in (*self.head_choices, *self.mlp_choices):
            n *= len(c)
        n *= len(self.embedding_bits)
        return n * (len(self.weight_bits) * len(self.act_bits)) ** len(self.groups)


def _bits_value(b) -> int:
    return FLOAT_BITS if b == "float" else int(b)


def _counts(fracs: list[float], full: int) -> tuple[int, ...]:
    return tuple(sorted({max(1, min(full, math.ceil(f * full - 1e-9))) for f in fracs}))


def _first_tensor(obj):
    return next((t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)), None)


def find_blocks(model: torch.nn.Module, inputs: dict, structure) -> list[Block]:
    """Residual blocks of ``model`` (see the module docstring), in execution order."""
    from slimformer.models.structure import PASS_THROUGH
    from slimformer.models.trace import record

    graph, _ = record(model, inputs)
    shapes: dict[str, tuple] = {}
    handles, paths = [], {m: n for n, m in model.named_modules()}

    def post(mod, args, kwargs, output):
        x, y = _first_tensor((args, kwargs)), _first_tensor(output)
        if paths[mod] not in shapes:
            n = len(output) if isinstance(output, tuple) else 0
            extra = sum(isinstance(t, torch.Tensor) for t in tree_flatten(output)[0]) - 1
            shapes[paths[mod]] = (None if x is None else x.shape, None if y is None else y.shape,
                                  n, isinstance(output, (torch.Tensor, tuple)), extra == 0)
        else:
            shapes[paths[mod]] = (None, None, 0, False, False)  # called twice: not a block

    for m in paths:
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    cons = graph.consumers()
    inside = lambda mod, path: mod == path or mod.startswith(path + ".")  # noqa: E731
    owner = lambda w: w.rpartition(".")[0]  # noqa: E731
    cands = []
    for call in graph.calls:
        sh = shapes.get(call.path)
        if not call.path or sh is None or not sh[3] or sh[0] is None or sh[0] != sh[1]:
            continue
        if call.input_node is None:
            continue
        attn = [i for i, s in enumerate(structure.attention) if inside(s.module, call.path)]
        if len(attn) != 1 or not _adds_input(graph, cons, call, inside, PASS_THROUGH):
            continue
        mlps = tuple(i for i, m in enumerate(structure.mlps) if inside(owner(m.fc2), call.path))
        lins = tuple(r.weight for r in structure.linears if inside(r.module, call.path))
        cands.append(Block(call.path, tuple(attn), mlps, lins, sh[2], sh[4]))
    cands = list({b.path: b for b in cands}.values())
    outer = [b for b in cands if not any(o is not b and inside(b.path, o.path) for o in cands)]
    order = {c.path: i for i, c in enumerate(graph.calls)}
    return sorted(outer, key=lambda b: order[b.path])


def _adds_input(graph, cons, call, inside, passes) -> bool:
    """True when the module's input reaches an ``add`` inside the module (a residual)."""
    todo, seen = [call.input_node], set()
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        for c in cons.get(i, []) if i >= 0 else [n.idx for n in graph.nodes if i in n.inputs]:
            n = graph.nodes[c]
            if not inside(n.module, call.path):
                continue
            if n.op == "add":
                return True
            if n.op in passes:
                todo.append(c)
    return False


def build_space(structure, blocks: list[Block], config: SpaceConfig,
                elastic_heads: set[int] | None = None,
                elastic_mlps: set[int] | None = None,
                embeddings: tuple[str, ...] = ()) -> SearchSpace:
    """The search space after the user's restrictions; :class:`ConfigError` when it is empty.

    Args:
        structure: The model's structure map.
        blocks: From :func:`find_blocks`.
        config: The user's restrictions.
        elastic_heads: Attention sites whose head count can change (None: all).
        elastic_mlps: MLP sites whose width can change (None: all).
        embeddings: Weight names of the model's ``nn.Embedding`` tables; without any, the
            embedding bit choice is fixed at ``float``.
    """
    problems = []
    for name in ("heads", "mlp", "weight_bits", "act_bits", "embedding_bits"):
        if not getattr(config, name):
            problems.append(f"space.{name}: empty list; give at least one choice")
    bad = [i for i in config.fixed_blocks if i >= len(blocks)]
    if bad:
        problems.append(f"space.fixed_blocks: {bad} out of range; the model has {len(blocks)} "
                        "residual block(s)")
    if blocks and config.min_blocks > len(blocks):
        problems.append(f"space.min_blocks: {config.min_blocks} but the model has only "
                        f"{len(blocks)} residual block(s)")
    if problems:
        raise ConfigError(problems, "search space")
    full_h = tuple(s.heads for s in structure.attention)
    full_m = tuple(m.hidden for m in structure.mlps)
    hc = tuple(_counts(config.heads, h) if elastic_heads is None or i in elastic_heads else (h,)
               for i, h in enumerate(full_h))
    mc = tuple(_counts(config.mlp, m) if elastic_mlps is None or i in elastic_mlps else (m,)
               for i, m in enumerate(full_m))
    skippable = tuple(i for i, b in enumerate(blocks) if config.skip_blocks and b.droppable
                      and i not in config.fixed_blocks)
    groups = tuple(b.linears for b in blocks) or (tuple(r.weight for r in structure.linears),)
    space = SearchSpace(tuple(blocks), hc, mc, full_h, full_m,
                        tuple(s.head_dim for s in structure.attention), skippable,
                        min(config.min_blocks, len(blocks)) if blocks else 0,
                        tuple(dict.fromkeys(config.weight_bits)),
                        tuple(dict.fromkeys(config.act_bits)), groups,
                        tuple(dict.fromkeys(config.embedding_bits)) if embeddings else ("float",),
                        tuple(embeddings))
    if space.size() <= 1:
        raise ConfigError([
            "the search space holds a single sub-network after the restrictions (heads "
            f"{list(config.heads)}, mlp {list(config.mlp)}, skip_blocks {config.skip_blocks}, "
            f"min_blocks {config.min_blocks}, fixed_blocks {list(config.fixed_blocks)}, "
            f"weight_bits {list(config.weight_bits)}, act_bits {list(config.act_bits)}, "
            f"embedding_bits {list(config.embedding_bits)}; {len(blocks)} residual block(s), "
            f"{len(full_h)} attention site(s), {len(full_m)} MLP(s), {len(embeddings)} embedding "
            "table(s)): allow more head or MLP fractions, block skipping or bit choices"],
            "search space")
    return space
