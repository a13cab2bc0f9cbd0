"""Importing slimformer stays cheap: no torch or transformers at import time."""

import subprocess
import sys


def test_import_is_light():
    code = ("import slimformer, slimformer.errors, slimformer.recipe, slimformer.cli; import sys; "
            "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'hls4ml') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_stage_folders_exist():
    import importlib

    for stage in ("quantize", "prune", "nas", "export", "hardware", "models", "data", "report"):
        assert importlib.import_module(f"slimformer.{stage}").__doc__
