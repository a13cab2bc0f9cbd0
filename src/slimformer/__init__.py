"""slimformer: compress any transformer and deploy it to ONNX Runtime, TensorRT and FPGAs.

Importing the package is cheap: heavy modules (torch, transformers) load only when a function
that needs them is called.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
