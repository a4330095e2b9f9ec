"""Export an artifact's network to ONNX and TensorRT, verified against PyTorch before it is trusted."""
