"""ONNX export of the (quantized) denoiser: graph passes, low-bit initializers, parity, the FP16 export."""
