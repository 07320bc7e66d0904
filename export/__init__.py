"""Export of the diffusion decoder: ONNX, TensorRT, compiled backends (installed as dreamllm_fast.export)."""
