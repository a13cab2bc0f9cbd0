"""ONNX (float, QDQ) and TensorRT export: filled by the export issue."""
