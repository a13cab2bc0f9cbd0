"""Weight-only calibration one block at a time (GPTQ-style sequential), memory bounded by a block.

The model's blocks are found from its structure, not its names: a module whose children (two or
more) are all of one class and each hold quantized Linears (the layers of a transformer; for
several towers, each tower's). A forward pre-hook captures the first block's arguments (keyword
arguments too: attention masks, rotary position embeddings) per calibration batch and stops the
forward there; each block is then called directly on what it needs, in order:

1. its Linears in float, every Linear's inputs accumulated into its Hessian ``2 X^T X / rows``
   (Linears reading one tensor share it) and ``mean |x|`` per channel;
2. ``awq``: activation-aware scales per norm that feeds the block's Linears, folded
   (:mod:`~slimformer.quantize.awq`);
3. every Linear quantized (GPTQ from its Hessian, or round to nearest);
4. the block run again with its quantized Linears: those outputs feed the next block, so later
   blocks see (and GPTQ compensates) earlier blocks' error.

Only one block's inputs and outputs are held. Chaining a block's output into the next block with
the first block's other arguments is checked on two rows first (each block called once, its
input the previous one's output, the same other arguments); where it does not hold, each block's
inputs are captured by a forward that stops at it. Linears outside every block (a language
model's head) are calibrated last from one forward that stops after them.
"""

from __future__ import annotations

import inspect

import torch

from slimformer.errors import CalibrationError
from slimformer.quantize.gptq import Hessian, gptq
from slimformer.quantize.groupwise import round_to_nearest, set_codes
from slimformer.quantize.state import shared_params


class _Stop(Exception):
    """Ends a forward pass once what was to be captured has run."""


def quantize_weights(run) -> list[str]:
    """Weight-only quantization of ``run.qmodel`` (a :class:`~.phases.Calibration`); notes."""
    qmodel, config = run.qmodel, run.config
    linears = list(qmodel.quant.linears.values())
    for lq in linears:
        lq.mode, lq._cache = "float", None
    if config.method == "minmax" and not config.awq:
        for lq in linears:
            round_to_nearest(lq)
            lq.mode = "quant"
        return ["weight-only: rounded to nearest on min/max ranges (no calibration data used)"]
    from slimformer.quantize.spill import Spill, budget_of

    with torch.no_grad(), Spill(budget_of(qmodel.model, config.max_memory),
                                "block-wise GPTQ") as spill:
        bw = Blockwise(run)
        bw.spill = spill
        notes = bw.calibrate()
        return notes + ([spill.note()] if spill.note() else [])


class Blockwise:
    """One block-wise calibration run (see module doc); blocks of the activation methods too.

    :mod:`~slimformer.quantize.blockacts` finds and feeds its blocks with this class.

    ``batches``: the input dicts to run (default: ``run.data`` in calibration batches).
    """

    def __init__(self, run, batches=None):
        self.run, self.qmodel, self.config = run, run.qmodel, run.config
        self.model = self.qmodel.model
        self.batches = self.no_cache(run.batches(run.data) if batches is None else batches)
        self.spill = None  # a Spill (max_memory): where held block inputs/outputs go
        self.linears = {lq.name.rpartition(".")[0]: lq for lq in self.qmodel.quant.linears.values()}
        self.notes: list[str] = []
        self.block_db: list[tuple[str, float]] = []

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` kept for a later block: in memory, or on disk past ``max_memory``."""
        return t if self.spill is None else self.spill.keep(t)

    def no_cache(self, batches) -> list[dict]:
        """``batches`` as a list, with ``use_cache=False`` where the model takes it (no KV cache)."""
        if "use_cache" in inspect.signature(self.model.forward).parameters:
            return [{**b, "use_cache": False} for b in batches]
        return list(batches)

    # ----------------------------------------------------------------------------- blocks

    def containers(self) -> list[list[str]]:
        """Module paths of the blocks, one list per container (children of one class)."""
        return containers(self.model, set(self.linears))

    def _call(self, inputs: dict) -> None:
        try:
            self.qmodel(**inputs)
        except _Stop:
            pass

    def capture(self, block: str, inputs: dict) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of ``block``'s first call in a forward on ``inputs`` (stopped there)."""
        got = []

        def hook(mod, args, kwargs):
            got.append((args, kwargs))
            raise _Stop

        handle = self.model.get_submodule(block).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self._call(inputs)
        finally:
            handle.remove()
        if not got:
            raise CalibrationError(f"block {block} did not run on the calibration rows")
        args, kwargs = got[0]
        return (self.keep(args[0]), *args[1:]) if args else args, kwargs

    def chains(self, blocks: list[str]) -> bool:
        """Whether each block's input is the previous block's output, other arguments equal."""
        calls: dict[str, list] = {b: [] for b in blocks}
        handles = []
        for b in blocks:
            def pre(mod, args, kwargs, b=b):
                calls[b].append([args, kwargs, None])

            def post(mod, args, kwargs, out, b=b):
                calls[b][-1][2] = _first(out)

            mod = self.model.get_submodule(b)
            handles += [mod.register_forward_pre_hook(pre, with_kwargs=True),
                        mod.register_forward_hook(post, with_kwargs=True)]
        probe = {k: v[:2] if isinstance(v, torch.Tensor) and v.dim() else v
                 for k, v in self.batches[0].items()}
        try:
            self.qmodel(**probe)
        finally:
            for h in handles:
                h.remove()
        if any(len(c) != 1 for c in calls.values()):
            return False
        (a0, k0, _), prev = calls[blocks[0]][0], None
        for b in blocks:
            args, kwargs, out = calls[b][0]
            if not args or (prev is not None and not _same(args[0], prev)):
                return False
            if not _same(args[1:], a0[1:]) or not _same(kwargs, k0):
                return False
            prev = out
        return True

    # ---------------------------------------------------------------------------- calibrate

    def calibrate(self) -> list[str]:
        """Weight-only: every block in order, then the Linears outside them; notes."""
        containers = self.containers()
        done: set[str] = set()
        total = sum(len(c) for c in containers)
        self.run.tick("calibrate", 0, total + 1)
        for blocks in containers:
            chained = self.chains(blocks)
            if not chained:
                self.notes.append(f"blocks {blocks[0]}..: each block's inputs captured by a "
                                  "forward (its output does not feed the next block directly)")
            held = [self.capture(blocks[0], b) for b in self.batches] if chained else None
            for block in blocks:
                if held is None:
                    cur = [self.capture(block, b) for b in self.batches]
                else:
                    cur = held
                lqs = [lq for m, lq in self.linears.items() if m.startswith(block + ".")]
                outs = self.block(block, lqs, cur, keep=held is not None)
                if held is not None:
                    held = [((o, *a[1:]), k) for o, (a, k) in zip(outs, held, strict=True)]
                done.update(lq.name for lq in lqs)
                self.run.tick("calibrate", len(self.block_db), total + 1)
        rest = [lq for lq in self.linears.values() if lq.name not in done]
        if rest:
            self.tail(rest)
        self.run.tick("calibrate", total + 1, total + 1)
        n = len(self.block_db)
        if n:
            worst = min(self.block_db, key=lambda kv: kv[1])
            self.notes.insert(0, f"weight-only {self.config.method}"
                              f"{' + awq' if self.config.awq else ''}: {n} blocks calibrated one "
                              f"at a time on {sum(_rows(b) for b in self.batches)} rows, each "
                              "fed the quantized outputs of the one before; lowest block output "
                              f"SQNR vs its float output {worst[1]:.1f} dB ({worst[0]})")
        return self.notes

    def block(self, block: str, lqs: list, inputs: list, keep: bool) -> list | None:
        """Calibrate and quantize one block on its ``(args, kwargs)`` per batch; its outputs."""
        mod = self.model.get_submodule(block)
        hess = self.observe(lqs, lambda a, k: mod(*a, **k), inputs)
        with self.qmodel._mode:
            ref = _first(mod(*inputs[0][0], **inputs[0][1]))
        self.quantize(lqs, hess, block)
        outs = []
        with self.qmodel._mode:
            for a, k in inputs:
                outs.append(self.keep(_first(mod(*a, **k))))
        self.block_db.append((block, _sqnr(ref, outs[0])))
        return outs if keep else None

    def observe(self, lqs: list, call, inputs: list, after=None) -> dict[str, Hessian]:
        """Every Linear's Hessian (shared by Linears reading one tensor) over ``call`` on inputs.

        ``after(lq)`` runs after each Linear's input is taken (it may stop the forward).
        """
        hess: dict[str, Hessian] = {}
        seen: dict[int, tuple] = {}  # id of an input -> (the tensor, its Hessian), per forward
        for lq in lqs:
            lq.mode, lq._cache = "float", None

            def grab(x, lq=lq):
                _observe(x, lq, hess, seen)
                if after is not None:
                    after(lq)
                return lq.act(x)

            lq.act_in = grab
        try:
            with self.qmodel._mode:
                for a, k in inputs:
                    seen.clear()
                    try:
                        call(a, k)
                    except _Stop:
                        pass
        finally:
            seen.clear()
            for lq in lqs:
                del lq.act_in
        return hess

    def quantize(self, lqs: list, hess: dict[str, Hessian], where: str) -> None:
        """AWQ (if asked) then GPTQ or round-to-nearest on each Linear; all to quant mode."""
        from slimformer.quantize.awq import fold, search_scale

        for lq in lqs:
            if lq.name not in hess:
                self.notes.append(f"{lq.name}: no calibration inputs reached it in "
                                  f"{where or 'the model'}: rounded to nearest")
        if self.config.awq:
            # a weight used elsewhere too (a head tied to the embedding table) cannot take the
            # fold: the other use would change with it
            tied = shared_params(self.model)
            by_name = {lq.name: lq for lq in lqs if lq.name in hess and id(lq.param[0]) not in tied}
            for norm in self.run.structure.norms:
                users = [by_name.get(n) for n in norm.linears]
                if not norm.foldable or not users or None in users or \
                        len({id(hess[u.name]) for u in users}) != 1:
                    continue
                h = hess[users[0].name]
                s, alpha, err, plain = search_scale(users, h.h, h.absmean)
                if alpha and fold(self.model, norm, users, s):
                    h.scale_inputs(s)
                    self.notes.append(f"awq {norm.module}: alpha {alpha:.2f}, output error of "
                                      f"{len(users)} Linear(s) {err / plain:.3f}x "
                                      "round-to-nearest's")
        step = f"{self.config.method}: Linears of {'the block' if where else 'the model'}"
        for i, lq in enumerate(lqs):
            self.run.tick(step, i, len(lqs))
            if self.config.method == "gptq" and lq.name in hess:
                codes, s, z = gptq(lq.full_matrix().detach(), hess[lq.name].h, lq.wq.bits,
                                   lq.wq._params, lq.group, self.config.act_order is not False,
                                   lq.name, self.config.clip_search is not False)
                set_codes(lq, codes, s, z)
            else:
                round_to_nearest(lq)
            lq.mode = "quant"
        self.run.tick(step, len(lqs), len(lqs))

    def tail(self, lqs: list) -> None:
        """Linears outside the blocks: observed in one forward per batch stopped after them."""
        runs = {lq.name: 0 for lq in lqs}
        expected = {r.weight: r.calls for r in self.run.structure.linears}

        def call(a, k):
            for n in runs:
                runs[n] = 0
            self.model(**k)  # inside observe's quant mode

        def after(lq):
            runs[lq.name] += 1
            if all(runs[n] >= expected.get(n, 1) for n in runs):
                raise _Stop

        hess = self.observe(lqs, call, [((), b) for b in self.batches], after)
        self.quantize(lqs, hess, "")


def _observe(x: torch.Tensor, lq, hess: dict[str, Hessian], seen: dict) -> None:
    """Add ``x`` to ``lq``'s Hessian unless another Linear already added this very tensor."""
    got = seen.get(id(x))
    if got is not None and got[0] is x:
        hess.setdefault(lq.name, got[1])
        return
    h = hess.get(lq.name)
    if h is None:
        h = hess[lq.name] = Hessian(x.shape[-1])
    h.add(x)
    seen[id(x)] = (x, h)


def containers(model, owners: set[str]) -> list[list[str]]:
    """Module paths of ``model``'s blocks, one list per container (see the module doc).

    ``owners``: the module paths of the quantized Linears.
    """
    found = []
    for path, mod in model.named_modules():
        kids = [(f"{path}.{n}" if path else n, k) for n, k in mod.named_children()]
        if len(kids) < 2 or len({type(k) for _, k in kids}) != 1:
            continue
        names = [n for n, _ in kids]
        if any(n in owners for n in names) or not all(
                any(o.startswith(n + ".") for o in owners) for n in names):
            continue
        found.append((path, names))
    out = []
    for path, names in found:  # outermost only
        if not any(path.startswith(n + ".") or path == n for _, ns in found for n in ns):
            out.append(names)
    return out


def _first(out):
    """A block's hidden-state output (the first element of a tuple output)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _same(a, b) -> bool:
    """Equal tensors / structures (objects by identity or ``==``)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
            a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return a is b or bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a boolean ==
        return False


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    import math

    err = float((got.double() - ref.double()).pow(2).sum())
    return math.inf if err == 0 else 10 * math.log10(float(ref.double().pow(2).sum()) / err)


def _rows(batch: dict) -> int:
    return next((len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim()), 1)
