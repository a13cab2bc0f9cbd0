"""Load a model from a :mod:`~slimformer.models.spec` and build example inputs for it.

One interface for the built-in zoo, Hugging Face (local directory or inline config), timm by
name and ``package.module:factory``. Nothing is ever fetched from a hub: Hugging Face runs with
``HF_HUB_OFFLINE=1`` and ``local_files_only``; timm models are created with ``pretrained=False``.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import TypeAdapter, ValidationError

from slimformer.data.rng import keeps_rng
from slimformer.errors import ConfigError, ModelLoadError
from slimformer.models import spec as S
from slimformer.models.hf import hf_class, load_hf_folder, resolve_task
from slimformer.models.pretrained.catalog import CATALOG

__all__ = ["LoadedModel", "load_hf_folder", "load_model", "parse_model_arg"]


@dataclass
class LoadedModel:
    """A model in eval mode plus what we know about feeding it."""

    module: torch.nn.Module
    spec: object
    input_specs: dict[str, S.InputSpec]
    dataset: str | None = None  # built-in evaluation data set (zoo models)
    task: str = "auto"  # Hugging Face task it is judged by (models.hf); "auto": by its outputs
    folder: Path | None = None  # the Hugging Face folder it was loaded from (tokenizer, processor)

    def example_inputs(self, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
        """Synthetic inputs ``{name: (batch, ...)}`` matching :attr:`input_specs`."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for name, s in self.input_specs.items():
            shape = (batch, *s.shape[1:])
            if s.dtype == "int64":
                if name.endswith("mask"):
                    out[name] = torch.ones(shape, dtype=torch.long)
                else:
                    out[name] = torch.randint(0, s.high or 2, shape, generator=gen)
            else:
                out[name] = torch.randn(shape, generator=gen)
        return out


def parse_model_arg(text: str, config_json: str | None = None, task: str | None = None):
    """Turn a CLI model argument into a spec.

    Accepted: a zoo name; ``zoo:NAME``; ``timm:NAME``; ``hf:MODEL_TYPE`` (inline config from
    ``config_json``); a local Hugging Face directory; ``package.module:factory``; or a YAML/JSON
    file holding a model spec mapping. ``task`` (CLI ``--task``, see :mod:`.hf`) sets the task
    of a Hugging Face model (folder, ``hf:`` or a spec file naming one).

    Raises:
        ConfigError: ``task`` is not a task, or is given for a model that is not Hugging Face.
    """
    spec = _parse_model_arg(text, config_json)
    if task is None:
        return spec
    if task not in S.HF_TASKS:
        raise ConfigError([f"--task: {task!r} is not a task; allowed: {', '.join(S.HF_TASKS)}"],
                          "options")
    if not isinstance(spec, S.HfDirSpec | S.HfConfigSpec):
        what = "a saved slimformer folder (its task is recorded in it)" \
            if isinstance(spec, S.ArtifactSpec) else f"a {spec.source} model"
        raise ConfigError([f"--task: {text!r} is {what}; --task applies to a Hugging Face "
                           "folder or hf:MODEL_TYPE only"], "options")
    return spec.model_copy(update={"task": task})


def _parse_model_arg(text: str, config_json: str | None = None):
    import json

    from slimformer.models.zoo import ZOO

    try:
        cfg = json.loads(config_json) if config_json else {}
    except json.JSONDecodeError as exc:
        raise ConfigError([f"--config: not valid JSON ({exc.msg} at line {exc.lineno} column "
                           f"{exc.colno}); give an object such as '{{\"hidden_size\": 64}}'"],
                          "options") from None
    if not isinstance(cfg, dict):
        raise ConfigError([f"--config: must be a JSON object, got {type(cfg).__name__}"],
                          "options")
    try:
        if text in ZOO or text in CATALOG or text.startswith("zoo:"):
            return S.ZooSpec(name=text.removeprefix("zoo:"))
        if text.startswith("timm:"):
            return S.TimmSpec(name=text[5:], kwargs=cfg)
        if text.startswith("hf:"):
            return S.HfConfigSpec(model_type=text[3:], config=cfg)
    except ValidationError as exc:
        from slimformer.validation import format_errors

        raise ConfigError(format_errors(exc), f"model {text!r}") from None
    from slimformer.store.manifest import candidates

    path = Path(text)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        return spec_from_mapping(_read_mapping(path), str(path))
    if candidates(path):
        return S.ArtifactSpec(path=str(path))  # a folder slimformer wrote (older ones: refused)
    if path.is_dir():
        return S.HfDirSpec(path=str(path))
    if ":" in text and not path.exists():
        return S.FactorySpec(factory=text, kwargs=cfg)
    raise ModelLoadError(
        f"model {text!r} is not a zoo model, an existing directory or spec file, nor of the form "
        f"timm:NAME, hf:MODEL_TYPE or package.module:factory. Zoo models: {', '.join([*ZOO, *CATALOG])}"
    )


def _read_mapping(path: Path) -> dict:
    from slimformer.validation import safe_load_bounded

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or exc}"], str(path)) from None
    if len(raw) > 1_000_000:
        raise ConfigError([f"file is {len(raw):,} bytes; a model spec may be at most 1,000,000"],
                          str(path))
    data = safe_load_bounded(raw, str(path))
    if not isinstance(data, dict):
        raise ConfigError([f"top level: must be a mapping, got {type(data).__name__}"], str(path))
    return data.get("model", data)


def spec_from_mapping(data: dict, source: str = "model spec"):
    """Validate a plain mapping as a model spec (errors listed with their paths)."""
    from slimformer.validation import format_errors

    try:
        return TypeAdapter(S.ModelSpec).validate_python(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc), source) from None


def refuse_untrusted(spec, source: str, trust_code: bool = False) -> None:
    """Refuse a :class:`~slimformer.models.spec.FactorySpec` read from a file unless trusted.

    Loading a factory imports a module and calls it: code runs. Zoo, ``timm:``, ``hf:`` and
    local Hugging Face directories run none of the folder's code and always pass.

    Raises:
        ModelLoadError: ``spec`` names a factory and ``trust_code`` is False.
    """
    if isinstance(spec, S.FactorySpec) and not trust_code:
        mod, _, attr = spec.factory.partition(":")
        raise ModelLoadError(
            f"{source} names the model factory {spec.factory!r}: loading it would import module "
            f"{mod!r} and call {attr!r}, which runs code. Load it only if you trust whoever wrote "
            "it: pass --trust-code (CLI) or trust_code=True (API)")


def saved_model_spec(data, source: str, trust_code: bool = False):
    """Validate a model spec read from a saved folder; a factory needs ``trust_code``.

    Raises:
        ModelLoadError: The spec is invalid, or names a factory and ``trust_code`` is False.
    """
    try:
        spec = TypeAdapter(S.ModelSpec).validate_python(data)
    except ValidationError as exc:
        raise ModelLoadError(f"{source}: model_spec is invalid ({exc.error_count()} problem(s), "
                             f"first: {exc.errors()[0]['msg'][:200]})") from None
    refuse_untrusted(spec, source, trust_code)
    return _located(spec, Path(source).parent)


def _located(spec, folder: Path):
    """``spec`` with relative paths found: from the working directory, else from ``folder``.

    New manifests record absolute paths; older ones the path as typed (relative to the working
    directory of the run that saved them). Those are tried as they are first, then relative to
    the saved folder.
    """
    update = {}
    for k in ("path", "weights"):
        v = getattr(spec, k, None)
        if isinstance(v, str) and v and not Path(v).is_absolute() and not Path(v).exists() \
                and (folder / v).exists():
            update[k] = str(folder / v)
    return spec.model_copy(update=update) if update else spec


@keeps_rng
def load_model(spec) -> LoadedModel:
    """Load the model a spec describes; every failure is a :class:`ModelLoadError`.

    A model built from a seed (``spec.seed``) is seeded on a forked RNG (the caller's is kept);
    files are read locally only (``local_files_only``), never from the hub.
    """
    if isinstance(spec, S.ArtifactSpec):
        raise ModelLoadError(f"{spec.path} is a saved slimformer folder: restore it with "
                             "slimformer.stages.artifact.restore (the CLI and recipes do)")
    if isinstance(spec, S.ZooSpec) and spec.name in CATALOG:  # real pretrained: an HF folder
        from slimformer.models.pretrained.install import resolve

        folder, task = resolve(spec.name)  # built into the cache on first use
        model = load_hf_folder(folder, task).eval()
        shapes = CATALOG[spec.name].inputs
        inputs = {k: S.InputSpec(shape=list(shape), dtype=dtype, high=high)
                  for k, (shape, dtype, high) in shapes.items()} if shapes else infer_inputs(model)
        return LoadedModel(model, spec, inputs, task=task, folder=Path(folder))
    if isinstance(spec, S.ZooSpec):
        from slimformer.models.zoo import get_entry, load_zoo_model

        entry = get_entry(spec.name)
        model = load_zoo_model(spec.name)
        inputs = {k: S.InputSpec(shape=list(shape), dtype=dtype, high=high)
                  for k, (shape, dtype, high) in entry.inputs.items()}
        return LoadedModel(model, spec, inputs, entry.dataset)
    if isinstance(spec, S.HfDirSpec):
        model = load_hf_folder(spec.path, spec.task)
    elif isinstance(spec, S.HfConfigSpec):
        model = _hf_from_config(spec)
    else:
        torch.manual_seed(spec.seed)
        if isinstance(spec, S.TimmSpec):
            kwargs = {**spec.kwargs, "pretrained": False}
            model = _call_factory("timm:create_model", {"model_name": spec.name, **kwargs})
        else:
            model = _call_factory(spec.factory, spec.kwargs)
    if getattr(spec, "weights", None):
        load_weights(model, spec.weights)
    model.eval()
    if getattr(spec, "inputs", None):
        inputs = spec.inputs
    elif isinstance(spec, S.TimmSpec):
        inputs = _timm_inputs(model, spec)
    else:
        inputs = infer_inputs(model)
    task = resolve_task(spec.task, model) if isinstance(spec, S.HfDirSpec | S.HfConfigSpec) \
        else "auto"
    folder = Path(spec.path) if isinstance(spec, S.HfDirSpec) else None
    return LoadedModel(model, spec, dict(inputs), task=task, folder=folder)


def _timm_inputs(model: torch.nn.Module, spec: S.TimmSpec) -> dict[str, S.InputSpec]:
    """Image input of a timm model: the size given in its kwargs, else its pretrained config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans, h, w = cfg.get("input_size", (3, 224, 224))
    size = spec.kwargs.get("img_size")
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
    return {"x": S.InputSpec(shape=[1, spec.kwargs.get("in_chans", chans), h, w])}


def _call_factory(target: str, kwargs: dict) -> torch.nn.Module:
    mod_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelLoadError(f"factory {target!r}: cannot import module {mod_name!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"factory {target!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"factory {target!r} is not callable")
    try:
        model = obj(**kwargs)
    except Exception as exc:  # the user's factory failed: report it as a load error
        raise ModelLoadError(f"factory {target!r}({kwargs}) raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(f"factory {target!r} returned {type(model).__name__}, not nn.Module")
    return model


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load a safetensors (or ``weights_only`` torch) state dict strictly into ``model``."""
    from slimformer.models.zoo import _load_state

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"weights file {path} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read weights {path}: {exc}") from exc
    _load_state(model, state, str(p))


def _hf_from_config(spec: S.HfConfigSpec) -> torch.nn.Module:
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(spec.model_type, **spec.config)
    except Exception as exc:
        raise ModelLoadError(f"bad Hugging Face config for model_type {spec.model_type!r}: {exc}"
                             ) from exc
    kwargs = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    torch.manual_seed(spec.seed)
    try:
        return hf_class(spec.task, config).from_config(config, trust_remote_code=False, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot build {spec.model_type!r} ({spec.task}): {exc}") from exc


def _cfg(config, *names, default=None):
    for sub in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        for n in names:
            if sub is not None and getattr(sub, n, None) is not None:
                return getattr(sub, n)
    return default


def max_positions(model: torch.nn.Module) -> int | None:
    """Longest token sequence ``model``'s own config allows (its position table), or None.

    Read from a Hugging Face config (``max_position_embeddings``, ``n_positions``,
    ``max_seq_len``, ``n_ctx``, also of its ``text_config``); None for models without one.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    n = _cfg(config, "max_position_embeddings", "n_positions", "max_seq_len", "n_ctx")
    return n if isinstance(n, int) and n > 0 else None


def infer_inputs(model: torch.nn.Module) -> dict[str, S.InputSpec]:
    """Guess inputs from the forward signature and the model's own config (HF, timm)."""
    params = inspect.signature(model.forward).parameters
    config = getattr(model, "config", None)
    out: dict[str, S.InputSpec] = {}
    if config is not None and hasattr(config, "to_dict"):
        text_cfg = getattr(config, "text_config", None) or config
        vocab = getattr(text_cfg, "vocab_size", None)
        seq = min(16, getattr(text_cfg, "max_position_embeddings", None) or 16)
        if "input_ids" in params and vocab:
            out["input_ids"] = S.InputSpec(shape=[1, seq], dtype="int64", high=vocab)
            if "attention_mask" in params:
                out["attention_mask"] = S.InputSpec(shape=[1, seq], dtype="int64", high=2)
        if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False):
            out["decoder_input_ids"] = S.InputSpec(shape=[1, seq], dtype="int64", high=vocab)
        size = _cfg(config, "image_size")
        if "pixel_values" in params and size:
            size = size if isinstance(size, int) else size[0]
            chans = _cfg(config, "num_channels", default=3)
            out["pixel_values"] = S.InputSpec(shape=[1, chans, size, size])
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not out and isinstance(cfg, dict) and "input_size" in cfg:
        first = next(iter(params))
        out[first] = S.InputSpec(shape=[1, *cfg["input_size"]])
    if not out:
        raise ModelLoadError(
            f"cannot infer the inputs of {type(model).__name__}.forward{inspect.signature(model.forward)}; "
            "give them in the model spec, e.g. inputs: {src: {shape: [1, 16, 64]}}"
        )
    return out
