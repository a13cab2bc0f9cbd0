"""Hugging Face models by task: which class loads a folder or config, and what a task measures.

A *task* says which transformers class is built and how the model is judged:

- ``base``: the bare model (``AutoModel``), judged on all its outputs against the float model;
- ``sequence-classification``, ``image-classification``: a classifier head (accuracy);
- ``causal-lm``: next-token logits (perplexity on held-out text, next-token agreement);
- ``masked-lm``, ``seq2seq-lm``: their heads (outputs against the float model);
- ``sentence-embedding``: the base model, its last hidden state mean-pooled over the attention
  mask and L2-normalized (embedding cosine, nearest-neighbour agreement, a probe);
- ``image-features``: the base model, its pooled output (else the first token) as image features
  (feature cosine, k-NN accuracy).

``auto`` takes the class from the config's ``architectures`` (a ``*ForCausalLM`` there is task
``causal-lm``, and so on; see :func:`resolve_task`). A head whose weights the folder does not hold
is refused (:class:`~slimformer.errors.ModelLoadError` naming the missing keys) rather than
silently built with random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimformer.errors import ModelLoadError

EMBEDDING_TASKS = ("sentence-embedding", "image-features")
BASE_TASKS = ("base", *EMBEDDING_TASKS)

_AUTO_CLASS = {
    "base": "AutoModel",
    "sentence-embedding": "AutoModel",
    "image-features": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}
_SUFFIX_TASK = (("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"),
                ("ForMaskedLM", "masked-lm"), ("ForSequenceClassification", "sequence-classification"),
                ("ForImageClassification", "image-classification"),
                ("ForConditionalGeneration", "seq2seq-lm"))


def resolve_task(task: str, module: torch.nn.Module | None = None) -> str:
    """The task a model is judged by: ``task`` itself, or for ``auto`` one read from its class.

    A class name ending ``ForCausalLM`` / ``LMHeadModel`` is ``causal-lm``, ``ForMaskedLM``
    ``masked-lm``, ``For{Sequence,Image}Classification`` the classifier tasks; anything else
    ``base``.
    """
    if task != "auto" or module is None:
        return "base" if task == "auto" else task
    name = type(module).__name__
    for suffix, found in _SUFFIX_TASK:
        if name.endswith(suffix):
            return found
    return "base"


def hf_class(task: str, config):
    """The transformers class that builds ``task`` (``auto``: the config's ``architectures``)."""
    import transformers as tf

    if task == "auto":
        arch = (getattr(config, "architectures", None) or [None])[0]
        if arch and hasattr(tf, arch):
            return getattr(tf, arch)
        return tf.AutoModel
    return getattr(tf, _AUTO_CLASS[task])


def load_hf_folder(path: str | Path, task: str = "auto") -> torch.nn.Module:
    """Load a local Hugging Face folder as ``task``, in eval mode, never touching a hub.

    Args:
        path: A folder with ``config.json`` and weights (``save_pretrained`` output).
        task: One of ``auto`` and the tasks of the module doc.

    Returns:
        The model (for ``sentence-embedding`` / ``image-features``: the base model; pooling is
        part of the evaluation, :mod:`slimformer.models.taskeval`).

    Raises:
        ModelLoadError: Not a model folder, custom code, or weights of the task's head (or of
            the model) missing from the folder: the message names them and suggests ``--task
            base``.
    """
    from transformers import AutoConfig

    if task not in ("auto", *_AUTO_CLASS):
        raise ModelLoadError(f"unknown task {task!r}; allowed: auto, {', '.join(_AUTO_CLASS)}")
    path = Path(path)
    refuse_custom_code(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True,
                                            trust_remote_code=False)
        cls = hf_class(task, config)
        model, info = cls.from_pretrained(str(path), local_files_only=True,
                                          trust_remote_code=False, output_loading_info=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load Hugging Face model from {path}: {exc}") from exc
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4
                                          else "")
        hint = ("; load it as the bare model with --task base (recipe model.task: base), or "
                "sentence-embedding / image-features" if task not in BASE_TASKS else
                "; the folder's weights do not match its config")
        raise ModelLoadError(
            f"{path}: loading it as {task} ({type(model).__name__}) leaves {len(missing)} "
            f"weight(s) missing from the folder ({shown}): they would be random{hint}")
    return model.eval()


def refuse_custom_code(path: Path) -> None:
    """A directory whose ``config.json`` maps classes to its own Python files is refused."""
    import json

    from slimformer.store.integrity import read_manifest

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
    cfg = read_manifest(path / "config.json", redo="fix or replace the file")
    if "auto_map" in cfg:
        from transformers import CONFIG_MAPPING

        kind = cfg.get("model_type")
        way = (f"delete the auto_map entry from its config.json to load it with transformers' "
               f"own {kind!r} code" if kind in CONFIG_MAPPING else
               "convert it to an architecture transformers ships")
        raise ModelLoadError(
            f"{path}: config.json has an auto_map naming the directory's own Python code "
            f"({json.dumps(cfg['auto_map'])[:200]}); slimformer does not run a model directory's "
            f"own Python files; {way}")
