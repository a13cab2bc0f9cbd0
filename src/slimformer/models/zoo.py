"""The built-in zoo: small real models trained here on real data, with committed weights.

One explicit table, :data:`ZOO`, maps a name to a :class:`ZooEntry`. Weights live beside this
file as ``weights/<name>.safetensors`` with ``weights/<name>.json`` holding their SHA-256, the
recorded FP32 metric, the seed and the training time. ``slimformer zoo train NAME`` reproduces them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from slimformer.errors import ModelLoadError

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser settings of a zoo model's training run."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 300
    seed: int = 0


@dataclass(frozen=True)
class ZooEntry:
    """A built-in model: how to build it, which data set it is evaluated on, how it is trained."""

    build: Callable[[], object]
    dataset: str
    task: str
    metric: str
    description: str
    train: TrainSettings = field(default_factory=TrainSettings)


def _build_vit_fmnist():
    from slimformer.models.vit import TinyViT, ViTConfig

    return TinyViT(ViTConfig(patch_size=7, dim=128, depth=6, heads=4, mlp_dim=384))


ZOO: dict[str, ZooEntry] = {
    "vit-fmnist": ZooEntry(
        build=_build_vit_fmnist,
        dataset="fashion-mnist",
        task="image-classification",
        metric="accuracy",
        description="pre-norm ViT, 6 blocks, dim 128, 4 heads, MLP 384, patch 7 (16 tokens + CLS), "
        "~1.0M params",
        train=TrainSettings(epochs=5),
    ),
}

DEFAULT_MODEL = "vit-fmnist"


def get_entry(name: str) -> ZooEntry:
    """Return the zoo entry ``name`` or raise :class:`ModelLoadError` listing the known ones."""
    if name not in ZOO:
        raise ModelLoadError(f"unknown zoo model {name!r}; the zoo has: {', '.join(sorted(ZOO))}")
    return ZOO[name]


def weights_path(name: str) -> Path:
    """Path of the committed safetensors weights of zoo model ``name``."""
    return WEIGHTS_DIR / f"{name}.safetensors"


def card(name: str) -> dict:
    """The JSON record beside the weights (hash, metric, seed, train time), or ``{}`` if absent."""
    path = WEIGHTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_zoo_model(name: str):
    """Build zoo model ``name`` and load its committed weights after checking their hash."""
    from safetensors.torch import load_file

    entry = get_entry(name)
    path = weights_path(name)
    if not path.is_file():
        raise ModelLoadError(
            f"weights of zoo model {name!r} not found at {path}; "
            f"create them with `slimformer zoo train {name}`"
        )
    expected = card(name).get("sha256")
    if expected and sha256(path) != expected:
        raise ModelLoadError(
            f"weights {path} do not match the recorded SHA-256 {expected}; "
            f"re-run `slimformer zoo train {name}` or restore the committed file"
        )
    model = entry.build()
    _load_state(model, load_file(str(path)), str(path))
    return model.eval()


def _load_state(model, state: dict, source: str) -> None:
    """Load ``state`` strictly, turning key/shape mismatches into a :class:`ModelLoadError`."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if bad:
            parts.append(
                "shape mismatch "
                + ", ".join(f"{k}: model {tuple(own[k].shape)} vs file {tuple(state[k].shape)}"
                            for k in bad[:5])
            )
        raise ModelLoadError(f"state dict {source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def train_zoo_model(name: str, out_dir: Path | None = None, epochs: int | None = None,
                    progress: Callable[[int, int, float], None] | None = None,
                    max_steps: int | None = None, eval_limit: int | None = None) -> dict:
    """Train zoo model ``name`` from its seed and write weights + card atomically.

    Args:
        name: Zoo model name.
        out_dir: Where to write ``<name>.safetensors`` / ``<name>.json`` (default: the package).
        epochs: Override the recorded number of epochs (for quick trials).
        progress: Called as ``progress(step, total_steps, loss)``.
        max_steps: Stop after this many optimizer steps (quick reproducibility checks).
        eval_limit: Evaluate on the first N test rows only.

    Returns:
        The card written beside the weights.
    """
    import torch
    from safetensors.torch import save_file

    from slimformer.data.datasets import get_dataset, make_loader
    from slimformer.models.evaluate import evaluate_accuracy
    from slimformer.report.io import atomic_path

    entry = get_entry(name)
    cfg = entry.train if epochs is None else TrainSettings(**{**entry.train.__dict__,
                                                              "epochs": epochs})
    torch.manual_seed(cfg.seed)
    model = entry.build()
    train = get_dataset(entry.dataset, "train")
    loader = make_loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(loader) if max_steps is None else max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps)
        * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / total)).item())
    )
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, t0 = 0, time.perf_counter()
    model.train()
    for _ in range(cfg.epochs):
        for inputs, labels in loader:
            x = inputs["pixel_values"]
            flip = torch.rand(x.shape[0], generator=gen) < 0.5  # horizontal flip augmentation
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = torch.nn.functional.cross_entropy(model(x), labels, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress:
                progress(step, total, loss.item())
            if step >= total:
                break
        if step >= total:
            break
    train_s = time.perf_counter() - t0
    model.eval()
    test = get_dataset(entry.dataset, "test", eval_limit)
    acc = evaluate_accuracy(model, make_loader(test, 500))
    out_dir = Path(out_dir) if out_dir else WEIGHTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    wpath = out_dir / f"{name}.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(wpath) as tmp:
        save_file(state, str(tmp))
    record = {
        "name": name,
        "sha256": sha256(wpath),
        "params": sum(p.numel() for p in model.parameters()),
        "dataset": entry.dataset,
        "metric": entry.metric,
        "fp32_metric": round(acc, 4),
        "train": {**cfg.__dict__, "steps": step},
        "train_seconds": round(train_s, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    with atomic_path(out_dir / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return record
