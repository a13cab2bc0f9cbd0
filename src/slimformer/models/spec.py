"""Typed model specifications: where a model comes from. Pure data: validating one loads nothing."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

HF_TASKS = ("auto", "base", "sequence-classification", "image-classification", "causal-lm",
            "masked-lm", "seq2seq-lm", "sentence-embedding", "image-features")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Spec):
    """One synthetic model input: ``shape`` with the batch axis first, a dtype, an integer range."""

    shape: list[Annotated[int, Field(ge=1)]]
    dtype: Literal["float32", "int64"] = "float32"
    high: Annotated[int, Field(ge=1)] | None = None  # exclusive upper bound of int64 values


class ZooSpec(_Spec):
    """A zoo model (``slimformer zoo list``): trained here, or real pretrained (built on first use)."""

    source: Literal["zoo"] = "zoo"
    name: str

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from slimformer.models.pretrained.catalog import CATALOG
        from slimformer.models.zoo import ZOO

        if v not in ZOO and v not in CATALOG:
            raise ValueError(f"unknown zoo model {v!r}; the zoo has: "
                             f"{', '.join(sorted([*ZOO, *CATALOG]))}")
        return v


class HfDirSpec(_Spec):
    """A Hugging Face model saved in a local directory (``config.json`` + weights)."""

    source: Literal["hf_dir"] = "hf_dir"
    path: str
    task: Literal[HF_TASKS] = "auto"  # type: ignore[valid-type]
    inputs: dict[str, InputSpec] | None = None


class HfConfigSpec(_Spec):
    """A Hugging Face architecture built from an inline config, with random weights."""

    source: Literal["hf_config"] = "hf_config"
    model_type: str
    config: dict = Field(default_factory=dict)
    task: Literal[HF_TASKS] = "base"  # type: ignore[valid-type]
    attn_implementation: Literal["eager", "sdpa"] | None = None
    seed: int = 0
    weights: str | None = None
    inputs: dict[str, InputSpec] | None = None


class TimmSpec(_Spec):
    """A timm model by name, never with pretrained weights (no hub access)."""

    source: Literal["timm"] = "timm"
    name: str
    kwargs: dict = Field(default_factory=dict)
    seed: int = 0
    weights: str | None = None
    inputs: dict[str, InputSpec] | None = None


class FactorySpec(_Spec):
    """``package.module:callable`` called with ``kwargs``, plus optional safetensors weights."""

    source: Literal["factory"] = "factory"
    factory: str
    kwargs: dict = Field(default_factory=dict)
    seed: int = 0
    weights: str | None = None
    inputs: dict[str, InputSpec] | None = None

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, v: str) -> str:
        mod, sep, attr = v.partition(":")
        if not sep or not mod or not attr:
            raise ValueError(f"must look like 'package.module:callable', got {v!r}")
        return v


class ArtifactSpec(_Spec):
    """A folder slimformer wrote (a quantized or pruned model, or a run folder holding one).

    Restored by :func:`slimformer.stages.artifact.restore`, which replays its recorded stages on
    its base model. ``trust_code`` allows a base model spec that names a factory.
    """

    source: Literal["artifact"] = "artifact"
    path: str
    trust_code: bool = False


ModelSpec = Annotated[ZooSpec | HfDirSpec | HfConfigSpec | TimmSpec | FactorySpec | ArtifactSpec,
                      Field(discriminator="source")]
