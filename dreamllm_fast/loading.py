"""Build a backend from a checkpoint directory: the device and precision, the weight format
(bf16, or int8/fp8 quantized), the backend (engine or reference), and how its U-Net and VAE run
(`diffusion_backends`). `DreamLLMPipeline.from_pretrained` (dreamllm_fast/pipeline.py) documents the
arguments."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch

from .checkpoint import load_checkpoint
from .config import EngineConfig, Precision, SpecialTokens, WeightFormat
from .errors import InvalidInputError


BACKENDS = ("reference", "engine")


def resolve_device_dtype(device=None, dtype=None) -> tuple[torch.device, Precision]:
    """The defaults of `DreamLLMPipeline.from_pretrained`: cuda when available, else the CPU;
    bf16 on CUDA, fp32 on the CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, Precision.parse(dtype or ("bf16" if device.type == "cuda" else "fp32"))


def load_model(path: Union[str, Path], device: Union[str, torch.device, None] = None,
               dtype: Union[str, torch.dtype, None] = None, backend: Optional[str] = None,
               engine_config: Optional[EngineConfig] = None, weights: Optional[str] = None):
    """(the backend's model, the checkpoint's tokenizer), offline."""
    device, precision = resolve_device_dtype(device, dtype)
    dtype = precision.dtype
    ckpt = load_checkpoint(path)
    stored = WeightFormat.parse(ckpt.llm_weights)  # int8/fp8: written by `convert --weights`
    try:
        fmt = WeightFormat.parse(weights if weights is not None else
                                 (engine_config.weights if engine_config is not None else None))
    except ValueError as e:
        raise InvalidInputError(str(e)) from None
    if weights is None and not fmt.quantized:  # nothing asked: the checkpoint's own format
        fmt = stored
    if stored.quantized and fmt is not stored:
        raise InvalidInputError(
            f"{path} holds {stored.value}-quantized LLM weights (`convert --weights "
            f"{stored.value}`); load it with weights={stored.value!r}, or load the bf16 checkpoint")
    backend = backend or ("engine" if device.type == "cuda" or fmt.quantized else "reference")
    if backend not in BACKENDS:
        raise InvalidInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if fmt.quantized and backend != "engine":
        raise InvalidInputError(
            f"weights={fmt.value!r} is an engine option (the reference backend is the unquantized "
            f"oracle): use backend='engine', or weights='bf16'")
    if engine_config is not None and engine_config.weights is not fmt:
        engine_config = dataclasses.replace(engine_config, weights=fmt)
    elif engine_config is None and fmt.quantized:
        engine_config = EngineConfig(precision=precision, weights=fmt)
    tok = ckpt.tokenizer()
    special = SpecialTokens.from_tokenizer(tok)
    if backend == "reference":
        from .reference import ReferenceModel

        model = ReferenceModel(ckpt, special, device=device, dtype=dtype)
    else:
        try:
            from .engine import EngineModel
        except ImportError as e:
            raise InvalidInputError(
                f"the fast engine is not available in this build ({e}); use backend='reference'"
            ) from None
        model = EngineModel(ckpt, special, device=device, dtype=dtype, engine_config=engine_config)
    return model, tok


def diffusion_backends(model, unet: str = "eager", vae: str = "eager", **opts):
    """How the U-Net and the VAE of `model` run: "eager" | "compiled" | "onnxruntime" | "tensorrt" |
    "graphs" (export/backends.py). Returns (unet eps function, VAE decode function, the whole-step
    runner of the "graphs" U-Net or None)."""
    unet_fn, vae_fn, stepper = model.unet_eps, model.vae_decode, None
    if unet != "eager":
        from .export.backends import make_unet_backend

        unet_fn = make_unet_backend(model.unet, unet, precision=model.dtype, **opts)
        stepper = unet_fn.step_runner
    if vae != "eager":
        from .export.backends import make_vae_backend

        vae_fn = make_vae_backend(model.vae, vae, precision=model.dtype, **opts)
    return unet_fn, vae_fn, stepper
