"""Training pieces shared by the search and the fine-tuning: batches, the loss, the optimizer.

The loss is ``(1 - distill) * CE(labels) + distill * T^2 KL(teacher_T || student_T)`` on the
model's class scores (a tensor, ``.logits`` or the first output). Models whose output is not class
scores for the labels (e.g. a base encoder) are trained by distillation alone.
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


def scores(output) -> torch.Tensor:
    """Class scores (or the first floating output) of a model output."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    flat = output.to_tuple() if hasattr(output, "to_tuple") else output
    if isinstance(flat, (tuple, list)):
        for t in flat:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return t
    raise ConfigError([f"cannot find class scores in a model output of type "
                       f"{type(output).__name__}"], "prune")


def make_loss(distill: float, temperature: float,
              teacher: nn.Module | None) -> Callable[[nn.Module, dict, torch.Tensor], torch.Tensor]:
    """``loss(model, inputs, labels)`` of the module docstring."""

    def loss(model: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        s = scores(model(**inputs))
        is_cls = s.dim() == 2 and s.shape[0] == labels.shape[0] and not labels.is_floating_point()
        total = s.new_zeros(())
        w_kd = distill if is_cls else 1.0
        if is_cls and distill < 1.0:
            total = total + (1.0 - distill) * nn.functional.cross_entropy(s, labels)
        if w_kd > 0 and teacher is not None:
            with torch.no_grad():
                t = scores(teacher(**inputs))
            tt = temperature
            kd = nn.functional.kl_div(nn.functional.log_softmax(s / tt, -1),
                                      nn.functional.log_softmax(t / tt, -1),
                                      log_target=True, reduction="batchmean") * tt * tt
            total = total + w_kd * kd
        elif not is_cls:
            raise ConfigError(["distill: the model's output is not class scores for the labels, "
                               "so it can only be trained by distillation (distill > 0)"],
                              "prune")
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
