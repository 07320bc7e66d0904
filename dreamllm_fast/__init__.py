"""dreamllm-fast: fast, faithful inference for DreamLLM (chat with images, text-to-image,
interleaved documents). `DreamLLMPipeline` is the public entry point."""
__version__ = "0.1.0"

__all__ = ["DreamLLMPipeline", "__version__"]


def __getattr__(name):  # lazy: `import dreamllm_fast.kernels` stays light (torch only)
    if name == "DreamLLMPipeline":
        from .pipeline import DreamLLMPipeline

        return DreamLLMPipeline
    raise AttributeError(f"module 'dreamllm_fast' has no attribute {name!r}")
