"""The fast engine: a LLaMA runner over dreamllm_fast.kernels with a static KV cache, CUDA-graph
decode, a truncated CLIP tower, and the diffusers U-Net/VAE; same interface as the reference."""
from .cuda_graph import CudaGraphRunner
from .llm import KVCache, LlamaRunner, LlamaWeights
from .model import EngineModel, EngineSession

__all__ = ["EngineModel", "EngineSession", "CudaGraphRunner", "KVCache", "LlamaRunner", "LlamaWeights"]
