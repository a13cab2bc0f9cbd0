"""Quantization-aware fine-tuning on Brevitas's quantized layers, started from a PTQ result.

:func:`~slimformer.qat.convert.to_brevitas` turns a post-training quantized model into one whose
Linears are Brevitas ``QuantLinear`` layers with learned (LSQ-style) scales and zero points,
initialized so that step 0 reproduces the PTQ model. Importing this package is cheap: Brevitas
is imported by the modules that use it.
"""
