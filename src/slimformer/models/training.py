"""Training recipes of the zoo models; each returns the trained model and the steps it took.

All are seeded and run on the CPU; ``slimformer zoo train NAME`` calls them through the zoo table.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from slimformer.data.datasets import get_dataset, make_loader

ProgressFn = Callable[[int, int, float], None] | None


def _cosine(opt, total: int, warmup: int):
    def f(s: int) -> float:
        return min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * s / total))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _supervised(model: nn.Module, loss_fn, data: str, settings, progress: ProgressFn,
                max_steps: int | None, flip: bool = False) -> int:
    """Mini-batch AdamW with warm-up + cosine schedule; returns the number of steps taken."""
    params = [p for p in model.parameters() if p.requires_grad]
    loader = make_loader(get_dataset(data, "train"), settings.batch_size, shuffle=True,
                         seed=settings.seed)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    total = settings.epochs * len(loader) if max_steps is None else max_steps
    sched = _cosine(opt, total, settings.warmup_steps)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    step = 0
    model.train()
    while step < total:
        for inputs, labels in loader:
            if flip:  # horizontal flip augmentation of images
                x = inputs["pixel_values"]
                f = torch.rand(x.shape[0], generator=gen) < 0.5
                inputs = {"pixel_values": torch.where(f[:, None, None, None], x.flip(-1), x)}
            loss = loss_fn(model, inputs, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress:
                progress(step, total, loss.item())
            if step >= total:
                break
    model.eval()
    return step


def _ce(model, inputs, labels):
    return nn.functional.cross_entropy(model(**inputs), labels, label_smoothing=0.1)


def train_vit(model: nn.Module, entry, settings, progress: ProgressFn = None,
              max_steps: int | None = None) -> int:
    """Supervised training of an image classifier with flip augmentation."""
    return _supervised(model, _ce, entry.dataset, settings, progress, max_steps, flip=True)


def train_seq(model: nn.Module, entry, settings, progress: ProgressFn = None,
              max_steps: int | None = None) -> int:
    """Supervised training of the digits sequence transformer."""
    return _supervised(model, _ce, entry.dataset, settings, progress, max_steps)


@torch.no_grad()
def _embed_all(model, dataset, batch: int = 128, progress: ProgressFn = None) -> torch.Tensor:
    order = torch.argsort(dataset.inputs["attention_mask"].sum(1), stable=True)
    out = torch.empty(len(order), model.encoder.config.hidden_size)
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        mask = dataset.inputs["attention_mask"][idx]
        keep = int(mask.sum(1).max())
        out[idx] = model.embed(dataset.inputs["input_ids"][idx, :keep], mask[:, :keep])
        if progress:
            progress(min(i + batch, len(order)), len(order), 0.0)
    return out


def train_text_head(model: nn.Module, entry, settings, progress: ProgressFn = None,
                    max_steps: int | None = None) -> dict:
    """Logistic-regression head on frozen, normalized mean-pooled encoder embeddings.

    The inverse regularization ``C`` is chosen by 5-fold cross-validation on the train split.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    train = get_dataset(entry.dataset, "train", max_steps and max_steps * 32)
    x = _embed_all(model, train, progress=progress).numpy()
    y = train.labels.numpy()
    search = GridSearchCV(LogisticRegression(max_iter=5000), {"C": [0.5, 2.0, 8.0, 32.0]}, cv=5)
    search.fit(x, y)
    clf = search.best_estimator_
    w, b = torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()
    if w.shape[0] == 1:  # binary: sklearn keeps one row; logits (-z/2, z/2) give the same argmax
        w, b = torch.cat([-w / 2, w / 2]), torch.cat([-b / 2, b / 2])
    with torch.no_grad():
        model.head.weight.copy_(w)
        model.head.bias.copy_(b)
    return {"steps": 1, "method": "logistic regression on frozen normalized mean-pooled "
            "embeddings, C by 5-fold CV", "C": float(search.best_params_["C"]),
            "train_rows": len(y)}


def train_clip(model: nn.Module, entry, settings, progress: ProgressFn = None,
               max_steps: int | None = None) -> int:
    """Contrastive image-caption training with the MiniLM text encoder frozen.

    Each step draws one training template per class; the loss is the cross-entropy of the
    scaled image-caption cosine similarities (CLIP's image-to-text loss over the class captions).
    """
    from slimformer.data.text import tokenize
    from slimformer.models.clip import CLASS_NAMES, PROMPT_LEN, TRAIN_TEMPLATES, prompts
    from slimformer.models.text import mean_pool

    for p in model.text_encoder.parameters():
        p.requires_grad_(False)
    enc = tokenize(prompts(TRAIN_TEMPLATES), PROMPT_LEN)
    with torch.no_grad():
        h = model.text_encoder(**enc).last_hidden_state
        pooled = mean_pool(h, enc["attention_mask"]).reshape(len(CLASS_NAMES),
                                                             len(TRAIN_TEMPLATES), -1)
    gen = torch.Generator().manual_seed(settings.seed + 2)

    def loss_fn(m, inputs, labels):
        k = torch.randint(0, pooled.shape[1], (pooled.shape[0],), generator=gen)
        text = nn.functional.normalize(m.text_proj(pooled[torch.arange(len(k)), k]), dim=-1)
        img = m.encode_image(inputs["pixel_values"])
        scale = m.logit_scale.clamp(max=math.log(100.0)).exp()
        return nn.functional.cross_entropy(scale * img @ text.T, labels)

    return _supervised(model, loss_fn, entry.dataset, settings, progress, max_steps, flip=True)
