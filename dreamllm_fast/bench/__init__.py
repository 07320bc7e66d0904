"""`dreamllm-fast bench`: stage-by-stage measurement against baselines and the hardware limit.

The stage names live here (no torch import) so the command line can offer them cheaply.
"""
STAGES = ("vision", "prefill", "decode", "dream", "projection", "unet", "vae", "t2i", "interleaved",
          "host", "decode_loop")
# Stages where the engine's graph path and its eager path run different code.
GRAPH_STAGES = ("prefill", "decode", "dream")
# Stages that need the LLM (and CLIP); the others need only the diffusion modules or shapes.
LLM_STAGES = ("vision", "prefill", "decode", "dream", "t2i", "interleaved", "decode_loop")
# Model backends a run can compare: engine_eager is the engine with EngineConfig(use_cuda_graphs=False).
BACKENDS = ("engine", "engine_eager", "reference")
# Weight-only quantized engines (`--weights int8 fp8`): providers "engine-int8", "engine-fp8" (CUDA
# graphs as "engine"), measured beside the bf16 engine on these stages, each with its own floor.
QUANT_WEIGHTS = ("int8", "fp8")
QUANT_STAGES = ("prefill", "decode", "dream")
