"""The fast engine: a LLaMA runner over dreamllm_fast.kernels with a static KV cache, CUDA graphs
for decode steps and bucketed prefill passes, a truncated CLIP tower, and the diffusers U-Net/VAE;
same interface as the reference."""
from .cuda_graph import CudaGraphRunner
from .graphs import CudaGraphs, StandInGraphs
from .llm import KVCache, LlamaRunner, LlamaWeights
from .model import EngineModel, EngineSession
from .prefill import PrefillRunner

__all__ = ["EngineModel", "EngineSession", "CudaGraphRunner", "CudaGraphs", "StandInGraphs", "KVCache",
           "LlamaRunner", "LlamaWeights", "PrefillRunner"]
