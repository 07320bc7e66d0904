"""Offline loading of DreamLLM checkpoints in the official release layout, and conversion.

A released checkpoint directory (`RunpeiDong/dreamllm-7b-chat-v1.0`, `...-aesthetic-v1.0`) holds
four bf16 pickles:

    pytorch_model.bin            LLM: model.embed_tokens, model.layers.*, model.norm, lm_head
    clip_vision_embedding.bin    clip_vision_model.vision_model.* + projector.projector.{weight,bias}
    dream_embedding.bin          dream_queries [1, Q, H]
    stable_diffusion_head.bin    unet.*, vae.* (diffusers names) + projector.projector.weight

plus ``config.json`` and the slow-tokenizer files. Pickles load with
``torch.load(weights_only=True, mmap=True)``: no arbitrary object is ever unpickled.
``dreamllm-fast convert`` writes safetensors beside them, which this loader then prefers
(``convert --weights int8|fp8`` writes the LLM's linears and LM head quantized, each
``<name>.weight`` in int8/float8_e4m3fn beside ``<name>.weight_scale`` [N] fp32; `Checkpoint.llm_weights`
then names the format and the engine uses them as stored). A sharded
LLM (``*.index.json``) is accepted too. Optional component configs (``vision_config.json``,
``preprocessor_config.json``, ``unet/config.json``, ``vae/config.json``,
``scheduler/scheduler_config.json``) override the built-in SD-2.1 / CLIP ViT-L/14 constants.

Every tensor is checked against the config before any module is built; an error names the file,
the key, and the expected and found shapes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .config import (CLIP_PREPROCESSOR, CLIP_VIT_L14, SD21_SCHEDULER, SD21_UNET, SD21_VAE,
                     DiffusionConfig, DreamLLMConfig, LLMConfig, VisionConfig, WeightFormat)
from .errors import CheckpointError
from .quant import SCALE_SUFFIX, storage_dtype

LLM_FILE = "pytorch_model.bin"
VISION_FILE = "clip_vision_embedding.bin"
DREAM_FILE = "dream_embedding.bin"
HEAD_FILE = "stable_diffusion_head.bin"
WEIGHT_FILES = (LLM_FILE, VISION_FILE, DREAM_FILE, HEAD_FILE)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
COMPONENT_CONFIGS = ("vision_config.json", "preprocessor_config.json", "unet/config.json",
                     "vae/config.json", "scheduler/scheduler_config.json")
# safetensors twin written by `convert`: HF's name for the LLM, the stem for the plugins.
SAFETENSORS_NAME = {LLM_FILE: "model.safetensors", VISION_FILE: "clip_vision_embedding.safetensors",
                    DREAM_FILE: "dream_embedding.safetensors",
                    HEAD_FILE: "stable_diffusion_head.safetensors"}
LEGACY_NAMES = {DREAM_FILE: ("dream_queries.pt",)}
SHARD_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

RELEASED_CLIP_PREFIX = "clip_vision_model.vision_model."
# the LLM weights `convert --weights int8|fp8` quantizes (with lm_head.weight)
QUANTIZABLE_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                        "gate_proj.weight", "up_proj.weight", "down_proj.weight", "lm_head.weight")
LAYOUT_HINT = (
    "a DreamLLM checkpoint directory holds config.json, pytorch_model.bin, "
    "clip_vision_embedding.bin, dream_embedding.bin, stable_diffusion_head.bin and the tokenizer "
    "files (tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json), "
    "as in RunpeiDong/dreamllm-7b-chat-v1.0; `dreamllm-fast make-tiny DIR` writes a small one"
)


# ----------------------------------------------------------------------------------------------
# reading files
# ----------------------------------------------------------------------------------------------
def _load_pickle(path: Path) -> dict:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) torch.save files cannot be mmapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: holds Python objects other than tensors and will not be unpickled "
                f"(weights_only=True); convert it to a plain state dict of tensors"
            ) from None
        raise CheckpointError(
            f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:160]}); the file "
            f"is truncated or corrupt: download it again"
        ) from None
    if isinstance(obj, torch.Tensor):  # legacy dream_queries.pt holds the bare parameter
        obj = {"dream_queries": obj}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    return obj


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot be read as safetensors ({str(e).splitlines()[0][:160]}); the file is "
            f"truncated or corrupt: run `dreamllm-fast convert` again or delete it to fall back to "
            f"the .bin"
        ) from None


def _load_sharded(index: Path) -> dict:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except Exception as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
    out: dict = {}
    for shard in sorted(set(weight_map.values())):
        p = index.parent / shard
        if not p.is_file():
            raise CheckpointError(f"{index}: lists shard {shard}, which is missing from {index.parent}")
        out.update(_load_safetensors(p) if p.suffix == ".safetensors" else _load_pickle(p))
    missing = set(weight_map) - set(out)
    if missing:
        raise CheckpointError(f"{index}: keys {sorted(missing)[:3]} are listed but in no shard")
    return out


def read_weight_file(ckpt_dir: "str | Path", name: str) -> tuple[dict, Path]:
    """Raw state dict of one released weight file, preferring converted safetensors.

    Returns (state dict with the file's own key names, the path read).
    """
    d = Path(ckpt_dir)
    st = d / SAFETENSORS_NAME[name]
    if st.is_file():
        return _load_safetensors(st), st
    if name == LLM_FILE:
        for idx in SHARD_INDEX:
            if (d / idx).is_file():
                return _load_sharded(d / idx), d / idx
    for cand in (name,) + LEGACY_NAMES.get(name, ()):
        if (d / cand).is_file():
            return _load_pickle(d / cand), d / cand
    raise CheckpointError(f"{d}: missing {name}; {LAYOUT_HINT}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except Exception as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); download it again") from None


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def load_config(ckpt_dir: "str | Path", num_dream_queries: Optional[int] = None) -> DreamLLMConfig:
    """The model config of a checkpoint directory (component configs override built-ins)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory; {LAYOUT_HINT}")
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d}: missing config.json; {LAYOUT_HINT}")
    raw = _read_json(d / "config.json")
    try:
        llm = LLMConfig.from_released(raw)
    except KeyError as e:
        raise CheckpointError(f"{d / 'config.json'}: missing field {e}") from None
    comp = {n: (_read_json(d / n) if (d / n).is_file() else None) for n in COMPONENT_CONFIGS}
    vision = VisionConfig(clip=comp["vision_config.json"] or dict(CLIP_VIT_L14),
                          preprocessor=comp["preprocessor_config.json"] or dict(CLIP_PREPROCESSOR))
    diffusion = DiffusionConfig(unet=comp["unet/config.json"] or dict(SD21_UNET),
                                vae=comp["vae/config.json"] or dict(SD21_VAE),
                                scheduler=comp["scheduler/scheduler_config.json"] or dict(SD21_SCHEDULER))
    q = num_dream_queries or int(raw.get("num_dream_queries") or 64)
    return DreamLLMConfig(llm=llm, vision=vision, diffusion=diffusion, num_dream_queries=q,
                          name=raw.get("_name_or_path") or d.name)


# ----------------------------------------------------------------------------------------------
# key mapping and shape checks
# ----------------------------------------------------------------------------------------------
def _clip_has_vision_model_level() -> bool:
    """transformers 4.x's CLIPVisionModel nests everything under `vision_model.`; 5.x does not."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=1, image_size=14, patch_size=14)
    with torch.device("meta"):
        keys = CLIPVisionModel(cfg).state_dict().keys()
    return any(k.startswith("vision_model.") for k in keys)


def clip_keys_to_installed(state: dict) -> dict:
    """Released `clip_vision_model.vision_model.X` -> the installed CLIPVisionModel's names."""
    nested = _clip_has_vision_model_level()
    out = {}
    for k, v in state.items():
        if not k.startswith(RELEASED_CLIP_PREFIX):
            raise KeyError(k)
        rest = k[len(RELEASED_CLIP_PREFIX):]
        out[("vision_model." + rest) if nested else rest] = v
    return out


def clip_keys_to_released(state: dict) -> dict:
    """The installed CLIPVisionModel's names -> released `clip_vision_model.vision_model.X`."""
    out = {}
    for k, v in state.items():
        rest = k[len("vision_model."):] if k.startswith("vision_model.") else k
        out[RELEASED_CLIP_PREFIX + rest] = v
    return out


def _meta_shapes(module_fn) -> dict:
    with torch.device("meta"):
        m = module_fn()
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def llm_expected_shapes(c: LLMConfig) -> dict:
    H, F, D = c.hidden_size, c.intermediate_size, c.head_dim
    kv = c.num_key_value_heads * D
    s = {"model.embed_tokens.weight": (c.vocab_size, H), "model.norm.weight": (H,),
         "lm_head.weight": (c.vocab_size, H)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        s.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (kv, H),
                  p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, H),
                  p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                  p + "mlp.down_proj.weight": (H, F), p + "input_layernorm.weight": (H,),
                  p + "post_attention_layernorm.weight": (H,)})
    return s


def _llm_ignorable(k: str) -> bool:
    # inv_freq is a persistent buffer in the original class (recomputed here); an FSDP full dump
    # may also carry the plugins' weights, which live in their own files.
    return (k.endswith("rotary_emb.inv_freq") or k.startswith("model.clip_vision_embedding.")
            or k.startswith("model.dream_embedding.") or k.startswith("stable_diffusion_head."))


def check_shapes(path: Path, state: dict, expected: dict, ignorable=lambda k: False) -> None:
    """Key-by-key correspondence: no missing, no unexpected, every shape equal."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: missing {len(missing)} tensor(s), first {missing[0]!r} (expected shape "
            f"{list(expected[missing[0]])}); the file does not match this model's config"
        )
    unexpected = [k for k in state if k not in expected and not ignorable(k)]
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected tensor {unexpected[0]!r} (and {len(unexpected) - 1} more); "
            f"the file does not belong to a DreamLLM checkpoint of this config"
        )
    for k, shape in expected.items():
        found = tuple(state[k].shape)
        if found != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor {k!r} has shape {list(found)}, expected {list(shape)} from the "
                f"config; the weights and config.json disagree"
            )


# ----------------------------------------------------------------------------------------------
# the loaded checkpoint
# ----------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """All weights of a checkpoint, checked against its config, on the CPU (mmapped where possible).

    Tensors keep the file's dtype (bf16 for released checkpoints); callers cast.
    """

    path: Path
    config: DreamLLMConfig
    llm: dict  # HF LLaMA names: model.*, lm_head.weight (inv_freq dropped)
    clip: dict  # the installed transformers CLIPVisionModel's names
    clip_proj_weight: torch.Tensor  # [H_llm, H_clip]
    clip_proj_bias: torch.Tensor  # [H_llm]
    dream_queries: torch.Tensor  # [Q, H_llm]
    cond_proj_weight: torch.Tensor  # [C_cross, H_llm], no bias
    unet: dict  # diffusers UNet2DConditionModel names
    vae: dict  # diffusers AutoencoderKL names
    llm_weights: str = "bf16"  # "int8"/"fp8": written by `convert --weights` (scales beside them)

    def tokenizer(self):
        return load_tokenizer(self.path)


def load_tokenizer(ckpt_dir: "str | Path"):
    """The slow-tokenizer files as released (no tokenizer.json), through transformers."""
    d = Path(ckpt_dir)
    missing = [f for f in TOKENIZER_FILES if not (d / f).is_file()]
    if missing:
        raise CheckpointError(f"{d}: missing tokenizer file(s) {missing}; {LAYOUT_HINT}")
    from transformers import LlamaTokenizer

    try:
        return LlamaTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{d / 'tokenizer.model'}: cannot be loaded as a SentencePiece LLaMA tokenizer "
            f"({str(e).splitlines()[0][:160]}); download the tokenizer files again"
        ) from None


def load_checkpoint(ckpt_dir: "str | Path") -> Checkpoint:
    """Read, map and check every weight of a released-layout checkpoint directory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModel

    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory; {LAYOUT_HINT}")
    dream_state, dream_path = read_weight_file(d, DREAM_FILE)
    if "dream_queries" not in dream_state:
        raise CheckpointError(f"{dream_path}: has no 'dream_queries' tensor (found {sorted(dream_state)[:3]})")
    dq = dream_state["dream_queries"]
    if dq.dim() != 3 or dq.shape[0] != 1:
        raise CheckpointError(f"{dream_path}: 'dream_queries' has shape {list(dq.shape)}, expected [1, Q, hidden]")
    cfg = load_config(d, num_dream_queries=dq.shape[1])
    H = cfg.llm.hidden_size
    if dq.shape[2] != H:
        raise CheckpointError(f"{dream_path}: 'dream_queries' has shape {list(dq.shape)}, expected "
                              f"[1, {dq.shape[1]}, {H}] (hidden_size from config.json)")

    llm, llm_path = read_weight_file(d, LLM_FILE)
    llm_exp = llm_expected_shapes(cfg.llm)
    llm_weights = _quantized_format(llm_path, llm, llm_exp)
    check_shapes(llm_path, llm, llm_exp, lambda k: _llm_ignorable(k) or k.endswith(".weight" + SCALE_SUFFIX))
    llm = {k: v for k, v in llm.items() if not _llm_ignorable(k)}

    vis, vis_path = read_weight_file(d, VISION_FILE)
    clip_exp = {RELEASED_CLIP_PREFIX + k.removeprefix("vision_model."): s for k, s in
                _meta_shapes(lambda: CLIPVisionModel(cfg.vision.to_hf())).items()
                if not k.endswith("position_ids")}
    clip_exp["projector.projector.weight"] = (H, cfg.vision.hidden_size)
    clip_exp["projector.projector.bias"] = (H,)
    check_shapes(vis_path, vis, clip_exp, lambda k: k.endswith("position_ids"))
    clip = clip_keys_to_installed({k: v for k, v in vis.items()
                                   if k.startswith(RELEASED_CLIP_PREFIX) and not k.endswith("position_ids")})

    head, head_path = read_weight_file(d, HEAD_FILE)
    C = cfg.diffusion.cross_attention_dim
    head_exp = {"unet." + k: s for k, s in
                _meta_shapes(lambda: UNet2DConditionModel.from_config(cfg.diffusion.unet)).items()}
    head_exp.update({"vae." + k: s for k, s in
                     _meta_shapes(lambda: AutoencoderKL.from_config(cfg.diffusion.vae)).items()})
    head_exp["projector.projector.weight"] = (C, H)
    check_shapes(head_path, head, head_exp)
    return Checkpoint(
        path=d, config=cfg, llm=llm, clip=clip,
        clip_proj_weight=vis["projector.projector.weight"],
        clip_proj_bias=vis["projector.projector.bias"], dream_queries=dq[0],
        cond_proj_weight=head["projector.projector.weight"],
        unet={k[5:]: v for k, v in head.items() if k.startswith("unet.")},
        vae={k[4:]: v for k, v in head.items() if k.startswith("vae.")}, llm_weights=llm_weights,
    )


def _quantized_format(path: Path, state: dict, expected: dict) -> str:
    """"bf16", or the format of an LLM state written by `convert --weights` (checked: every scale
    belongs to a quantizable weight of one storage dtype and has its row count)."""
    scales = sorted(k for k in state if k.endswith(".weight" + SCALE_SUFFIX))
    if not scales:
        return "bf16"
    dtypes = set()
    for k in scales:
        w = k[:-len(SCALE_SUFFIX)]
        if w not in expected or not w.endswith(QUANTIZABLE_SUFFIXES):
            raise CheckpointError(f"{path}: scale {k!r} belongs to no quantizable LLM weight")
        if tuple(state[k].shape) != (expected[w][0],):
            raise CheckpointError(f"{path}: scale {k!r} has shape {list(state[k].shape)}, expected "
                                  f"[{expected[w][0]}] (one per output channel)")
        dtypes.add(state[w].dtype)
    fmts = {f.value for f in (WeightFormat.INT8, WeightFormat.FP8) if storage_dtype(f) in dtypes}
    missing = [k for k in expected if k.endswith(QUANTIZABLE_SUFFIXES) and k + SCALE_SUFFIX not in state]
    if len(fmts) != 1 or len(dtypes) != 1 or missing:
        raise CheckpointError(f"{path}: a partly quantized LLM ({sorted(map(str, dtypes))}, "
                              f"{len(missing)} linear(s) without scales); convert the bf16 checkpoint again")
    return fmts.pop()
