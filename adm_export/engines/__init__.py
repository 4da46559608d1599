"""Inference engines built from the exported ONNX denoiser: TensorRT, TensorRT-RTX, ONNX Runtime."""
