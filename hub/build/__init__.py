"""The build pipeline: torch model -> ONNX -> fused -> quantized per target, gated by measurement."""
