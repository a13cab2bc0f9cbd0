"""Training pieces shared by the search and the fine-tuning: batches, the loss, the optimizer.

The loss is ``(1 - distill) * CE(labels) + distill * T^2 KL(teacher_T || student_T)`` on the
model's class scores (:func:`slimformer.models.outputs.class_scores`). Models without class scores
for the labels (e.g. a base encoder) are trained by distillation alone: KL on their class scores
when they have some, else the normalized MSE of all outputs
(:func:`~slimformer.models.outputs.normalized_mse`; outputs whose shape pruning changed, such as
attention maps of cut heads, are left out).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from slimformer.errors import ConfigError

Progress = Callable[[str, int, int], None] | None


def batches(data, batch_size: int, seed: int) -> Iterator[tuple[dict, torch.Tensor]]:
    """Endless shuffled batches ``({name: (B, ...)}, labels (B,))`` of a TensorDictDataset."""
    from slimformer.data.datasets import make_loader

    epoch = 0
    while True:
        empty = True
        for inputs, labels in make_loader(data, batch_size, shuffle=True, seed=seed + epoch):
            empty = False
            yield inputs, labels
        if empty:
            raise ConfigError(["train_data: is empty"], "prune")
        epoch += 1


def _distill_outputs(got: dict, want: dict) -> tuple[dict, dict]:
    """The outputs of student and teacher with the same name and shape (pruning may change some)."""
    keep = [k for k, t in want.items() if k in got and got[k].shape == t.shape
            and t.is_floating_point()]
    if not keep:
        raise ConfigError([f"distill: the pruned model's outputs ({', '.join(got)}) share none of "
                           f"the teacher's ({', '.join(want)}) in name and shape"], "prune")
    return {k: got[k] for k in keep}, {k: want[k] for k in keep}


def make_loss(distill: float, temperature: float,
              teacher: nn.Module | None) -> Callable[[nn.Module, dict, torch.Tensor], torch.Tensor]:
    """``loss(model, inputs, labels)`` of the module docstring."""
    from slimformer.models.outputs import class_scores, fits_labels, leaves, normalized_mse

    def loss(model: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        out = model(**inputs)
        s = class_scores(out)
        is_cls = fits_labels(s, labels)
        w_kd = distill if is_cls else 1.0
        total = None
        if is_cls and distill < 1.0:
            ce = nn.functional.cross_entropy(s.flatten(0, -2), labels.flatten())
            total = (1.0 - distill) * ce
        if w_kd > 0 and teacher is not None:
            with torch.no_grad():
                t_out = teacher(**inputs)
            t = class_scores(t_out)
            if s is not None and t is not None and s.shape == t.shape:
                tt = temperature
                kd = nn.functional.kl_div(nn.functional.log_softmax(s / tt, -1),
                                          nn.functional.log_softmax(t / tt, -1),
                                          log_target=True, reduction="batchmean") * tt * tt
            else:  # no class scores (a base model): match every output the teacher has
                kd = normalized_mse(*_distill_outputs(leaves(out), leaves(t_out)))
            total = w_kd * kd if total is None else total + w_kd * kd
        elif not is_cls:
            raise ConfigError(["distill: the model's output is not class scores for the labels, "
                               "so it can only be trained by distillation (distill > 0)"],
                              "prune")
        if total is None:  # distill == 1 with no teacher
            raise ConfigError(["distill: 1.0 needs a teacher"], "prune")
        return total

    return loss


def optimizer(model: nn.Module, lr: float, weight_decay: float, steps: int, warmup: float):
    """AdamW over the trainable floating parameters, linear warm-up then cosine decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    w = max(1, int(warmup * steps))

    def f(s: int) -> float:
        return min(1.0, (s + 1) / w) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, f)


def trainable(model: nn.Module) -> nn.Module:
    """Make every floating parameter trainable (zoo models may come with frozen towers)."""
    for p in model.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return model


def finetune(model: nn.Module, data, cfg, loss_fn, steps: int, progress: Progress = None,
             checkpoint: Callable[[int, dict], None] | None = None,
             resume: dict | None = None) -> int:
    """Train ``model`` for ``steps`` steps; returns the steps taken.

    ``checkpoint(step, state)`` is called every ``cfg.checkpoint_every`` steps with the model,
    optimizer and scheduler states; ``resume`` is such a state to continue from.
    """
    trainable(model)
    opt, sched = optimizer(model, cfg.lr, cfg.weight_decay, steps, cfg.warmup)
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        start = int(resume["step"])
    it = batches(data, cfg.batch_size, cfg.seed + 7 + start)
    model.train()
    for step in range(start + 1, steps + 1):
        inputs, labels = next(it)
        loss = loss_fn(model, inputs, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress("fine-tune", step, steps)
        if checkpoint and (step % cfg.checkpoint_every == 0) and step < steps:
            checkpoint(step, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                              "scheduler": sched.state_dict(), "step": step})
    model.eval()
    return steps - start
