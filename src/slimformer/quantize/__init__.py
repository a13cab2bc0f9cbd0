"""Post-training quantization (RepQuant style): filled by the quantize issue."""
