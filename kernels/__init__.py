"""Triton kernels for the DreamLLM hot path (installed as dreamllm_fast.kernels)."""
