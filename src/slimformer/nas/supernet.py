"""Weight-sharing super-network (InstaTune): masks for heads, MLP units and whole blocks.

A sub-network is applied with hooks, never by editing the model: the input of each attention
site's output Linear is multiplied by a head mask (head-major layout, ``(.., heads*head_dim)``),
the input of each MLP's fc2 by a unit mask, and a dropped residual block returns its input.
Heads and units are ranked once by importance (first-order Taylor: ``|dL/dmask|`` summed over a
few batches), so a sub-network keeping ``n`` heads keeps the ``n`` most important ones, and
fine-tuning follows the sandwich rule: each step trains the largest, the smallest and random
sub-networks, the smaller ones distilled from the largest.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from slimformer.data.rng import keeps_rng
from slimformer.nas.space import SearchSpace, SubNet, _first_tensor


def _owner(model: nn.Module, weight: str) -> nn.Module:
    return model.get_submodule(weight.rpartition(".")[0])


class SuperNet:
    """Masks over one model (see the module docstring).

    Attributes:
        model: The shared-weight model (trained in place).
        head_order / unit_order: Per site, indices from most to least important.
    """

    def __init__(self, model: nn.Module, structure, space: SearchSpace):
        self.model, self.structure, self.space = model, structure, space
        self.head_order = [list(range(h)) for h in space.full_heads]
        self.unit_order = [list(range(m)) for m in space.full_mlp]
        self._masks: dict[tuple[str, int], torch.Tensor | None] = {}
        self._skip: set[int] = set()

    # --- which sites the hooks reach ----------------------------------------------------------
    def probe(self, inputs: dict) -> tuple[set[int], set[int]]:
        """Attention / MLP site indices whose width masks take effect (found by one forward)."""
        fired: set[tuple[str, int]] = set()
        with self._hooks(record=fired), torch.no_grad():
            self.model(**inputs)
        return ({i for k, i in fired if k == "attn"}, {i for k, i in fired if k == "mlp"})

    @contextlib.contextmanager
    def _hooks(self, record: set | None = None):
        handles = []
        s = self.structure
        widths = {("attn", i): (a.out[0], a.heads * a.head_dim) for i, a in enumerate(s.attention)
                  if len(a.out) == 1}
        widths |= {("mlp", i): (m.fc2, m.hidden) for i, m in enumerate(s.mlps)}
        for key, (weight, width) in widths.items():
            def pre(mod, args, key=key, width=width):
                if not args or not isinstance(args[0], torch.Tensor) or args[0].shape[-1] != width:
                    return None
                if record is not None:
                    record.add(key)
                mask = self._masks.get(key)
                if mask is None:
                    return None
                return (args[0] * mask.to(args[0].dtype), *args[1:])

            handles.append(_owner(self.model, weight).register_forward_pre_hook(pre))
        for b, blk in enumerate(self.space.blocks):
            def post(mod, args, kwargs, output, b=b):
                if b not in self._skip:
                    return None
                x = _first_tensor((args, kwargs))
                return x if isinstance(output, torch.Tensor) else (x, *output[1:])

            handles.append(self.model.get_submodule(blk.path).register_forward_hook(
                post, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # --- applying a sub-network ---------------------------------------------------------------
    def kept(self, sub: SubNet) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[int, ...]]]:
        """Kept head / unit indices (sorted) per site for ``sub``."""
        heads = {i: tuple(sorted(self.head_order[i][:n])) for i, n in enumerate(sub.heads)}
        units = {i: tuple(sorted(self.unit_order[i][:n])) for i, n in enumerate(sub.mlp)}
        return heads, units

    def _set(self, sub: SubNet | None) -> None:
        self._masks, self._skip = {}, set()
        if sub is None:
            return
        heads, units = self.kept(sub)
        for i, kept in heads.items():
            if len(kept) < self.space.full_heads[i]:
                m = torch.zeros(self.space.full_heads[i])
                m[list(kept)] = 1.0
                self._masks[("attn", i)] = m.repeat_interleave(self.space.head_dim[i])
        for i, kept in units.items():
            if len(kept) < self.space.full_mlp[i]:
                m = torch.zeros(self.space.full_mlp[i])
                m[list(kept)] = 1.0
                self._masks[("mlp", i)] = m
        self._skip = {b for b, k in enumerate(sub.keep) if not k}

    @contextlib.contextmanager
    def applied(self, sub: SubNet | None):
        """Run the model as sub-network ``sub`` inside the block (None: the full model)."""
        self._set(sub)
        try:
            with self._hooks():
                yield self.model
        finally:
            self._set(None)

    # --- importance ranking ---------------------------------------------------------------------
    def rank(self, batches, loss_fn: Callable) -> None:
        """Order heads and units by ``|dL/dmask|`` accumulated over ``batches``."""
        s = self.space
        gh = [torch.zeros(h) for h in s.full_heads]
        gm = [torch.zeros(m) for m in s.full_mlp]
        hm = [torch.ones(h, requires_grad=True) for h in s.full_heads]
        mm = [torch.ones(m, requires_grad=True) for m in s.full_mlp]
        self.model.eval()
        seen = 0
        with self._hooks():
            for inputs, labels in batches:
                self._masks = {("attn", i): m.repeat_interleave(s.head_dim[i])
                               for i, m in enumerate(hm)}
                self._masks |= {("mlp", i): m for i, m in enumerate(mm)}
                loss = loss_fn(self.model(**inputs), labels)
                grads = torch.autograd.grad(loss, hm + mm, allow_unused=True)
                for acc, g in zip(gh + gm, grads, strict=True):
                    if g is not None:
                        acc += g.detach().abs()
                self.model.zero_grad(set_to_none=True)
                seen += 1
        self._masks = {}
        if seen:
            self.head_order = [torch.argsort(g, descending=True, stable=True).tolist() for g in gh]
            self.unit_order = [torch.argsort(g, descending=True, stable=True).tolist() for g in gm]

    def state(self) -> dict:
        """Rankings (JSON-ready), saved beside the weights."""
        return {"head_order": self.head_order, "unit_order": self.unit_order}

    def load_state(self, state: dict) -> None:
        """Restore rankings from :meth:`state`."""
        self.head_order, self.unit_order = state["head_order"], state["unit_order"]


def task_loss(output, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the class scores of a model output (:class:`DataError` without them)."""
    from slimformer.models.outputs import require_class_scores

    return F.cross_entropy(require_class_scores(output, labels).float(), labels)


@keeps_rng
def train_supernet(net: SuperNet, train_data, steps: int, batch_size: int, lr: float,
                   sandwich: int, distill: float, seed: int,
                   progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Sandwich-rule fine-tuning in place; returns loss statistics.

    Each step: the largest sub-network on the labels; the smallest and ``sandwich - 2`` random
    ones on ``(1 - distill) * CE + distill * KL(largest)``; one AdamW step on the summed gradient.
    """
    from slimformer.data.datasets import make_loader
    from slimformer.models.outputs import require_class_scores

    if steps <= 0:
        return {"steps": 0}
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = net.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10))
                                              * max(0.0, 1 - s / steps))
    loader = make_loader(train_data, batch_size, shuffle=True, seed=seed)
    it, done, t0, losses = iter(loader), 0, time.perf_counter(), []
    model.train()
    try:
        while done < steps:
            try:
                inputs, labels = next(it)
            except StopIteration:
                it = iter(loader)
                inputs, labels = next(it)
            opt.zero_grad(set_to_none=True)
            with net.applied(None):
                big = require_class_scores(model(**inputs), labels).float()
            loss = F.cross_entropy(big, labels)
            loss.backward()
            soft = F.softmax(big.detach(), -1)
            subs = [net.space.smallest()] + [net.space.random(rng) for _ in range(sandwich - 2)]
            for sub in subs[:max(0, sandwich - 1)]:
                with net.applied(sub):
                    out = require_class_scores(model(**inputs), labels).float()
                kd = F.kl_div(F.log_softmax(out, -1), soft, reduction="batchmean")
                sub_loss = (1 - distill) * F.cross_entropy(out, labels) + distill * kd
                sub_loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            done += 1
            losses.append(float(loss.detach()))
            if progress:
                progress("fine-tune super-network", done, steps)
    finally:
        model.eval()
    return {"steps": done, "seconds": round(time.perf_counter() - t0, 1),
            "first_loss": round(float(np.mean(losses[:10])), 4),
            "last_loss": round(float(np.mean(losses[-10:])), 4)}
