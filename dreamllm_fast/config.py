"""Model and engine configuration as dataclasses, with the released constants as presets.

`DreamLLMConfig` describes the model's shapes (LLM, vision tower, diffusion head, dream queries);
`EngineConfig` holds runtime knobs. Presets: ``dreamllm-7b`` (the released SD-2.1 7B model,
the shapes of its released config.json and of SD-2.1-base) and ``tiny`` (random weights, seconds on a CPU).

The released ``config.json`` carries legacy ``bos/eos/pad`` ids of 0/1/-1 from the LLaMA conversion;
they are ignored here. Special-token ids always come from the tokenizer files (`SpecialTokens`).
"""
from __future__ import annotations

import copy
import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

# Released added tokens, in the id order of the HF `added_tokens.json` (ids 32000..32007 for the
# 7B model; base_vocab..base_vocab+7 for the tiny one). Never the order of the source file's list.
ADDED_TOKENS = (
    "[PAD]",
    "<im_start>",
    "<dream_end>",
    "<dream_start>",
    "<im_patch>",
    "<im_end>",
    "<image>",
    "<dream>",
)


class Precision(str, enum.Enum):
    """One precision knob for the whole pipeline."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]

    @classmethod
    def parse(cls, value: "str | torch.dtype | Precision") -> "Precision":
        if isinstance(value, Precision):
            return value
        if isinstance(value, torch.dtype):
            for p in cls:
                if p.dtype == value:
                    return p
            raise ValueError(f"unsupported dtype {value}; use one of float32, float16, bfloat16")
        aliases = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
                   "bfloat16": "bf16"}
        v = aliases.get(str(value).lower(), str(value).lower())
        try:
            return cls(v)
        except ValueError:
            raise ValueError(
                f"unknown precision {value!r}; use one of fp32, fp16, bf16"
            ) from None


class WeightFormat(str, enum.Enum):
    """How the engine stores the LLaMA linears and the LM head (issue 23).

    ``bf16``: unquantized, in the activation dtype (the name is the released checkpoint's
    precision; an fp32 engine keeps fp32). ``int8``: symmetric int8 with one fp32 scale per output
    channel. ``fp8``: float8 e4m3 with one fp32 scale per output channel (GPUs of compute
    capability 8.9 or newer: Ada, Hopper, Blackwell; the CPU runs it through the torch reference).
    The embedding table, norms, dream queries, CLIP tower and projectors always stay unquantized.
    """

    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"

    @property
    def quantized(self) -> bool:
        return self is not WeightFormat.BF16

    @classmethod
    def parse(cls, value: "str | WeightFormat | None") -> "WeightFormat":
        if isinstance(value, WeightFormat):
            return value
        if value is None:
            return cls.BF16
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"unknown weights {value!r}; use one of bf16 (unquantized), int8, fp8") from None


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids read from the tokenizer (never from config.json's legacy bos/eos/pad)."""

    bos: int
    eos: int
    unk: int
    pad: int
    im_start: int
    im_end: int
    im_patch: int
    dream_start: int
    dream_end: int
    image: int
    dream: int

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialTokens":
        def tid(t: str) -> int:
            i = tok.convert_tokens_to_ids(t)
            if i is None or (tok.unk_token_id is not None and i == tok.unk_token_id and t != "<unk>"):
                raise ValueError(
                    f"tokenizer has no token {t!r}: the checkpoint's tokenizer files must carry the "
                    f"8 added tokens {list(ADDED_TOKENS)} (added_tokens.json)"
                )
            return int(i)

        return cls(
            bos=tid("<s>"), eos=tid("</s>"), unk=tid("<unk>"), pad=tid("[PAD]"),
            im_start=tid("<im_start>"), im_end=tid("<im_end>"), im_patch=tid("<im_patch>"),
            dream_start=tid("<dream_start>"), dream_end=tid("<dream_end>"), image=tid("<image>"),
            dream=tid("<dream>"),
        )


@dataclass
class LLMConfig:
    """LLaMA-style decoder (Vicuna-7B v1.1 for the released model)."""

    vocab_size: int = 32008
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    head_dim: int = field(init=False)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        self.head_dim = self.hidden_size // self.num_attention_heads

    def to_hf(self):
        """The equivalent transformers `LlamaConfig` (reference pipeline)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, tie_word_embeddings=False, attention_bias=False,
            mlp_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )

    @classmethod
    def from_released(cls, cfg: dict) -> "LLMConfig":
        """Parse the released DreamLLM ``config.json`` (legacy bos/eos/pad ignored)."""
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None:  # transformers 5 moved it under rope_parameters
            rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        if cfg.get("rope_scaling"):
            raise ValueError(
                f"config.json has rope_scaling={cfg['rope_scaling']!r}; DreamLLM uses plain RoPE "
                "(max 2048 positions) and this engine does not implement scaling"
            )
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads", heads),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        )


# CLIP ViT-L/14 at 224 (openai/clip-vit-large-patch14), transformers CLIPVisionConfig fields.
CLIP_VIT_L14 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    num_channels=3, image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0, projection_dim=768,
)
CLIP_PREPROCESSOR = dict(
    do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
    crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
    do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True,
)


@dataclass
class VisionConfig:
    """CLIP vision tower + linear comprehension projector (bias) into the LLM width."""

    clip: dict = field(default_factory=lambda: dict(CLIP_VIT_L14))
    preprocessor: dict = field(default_factory=lambda: dict(CLIP_PREPROCESSOR))
    select_layer: int = -2  # penultimate encoder layer; CLS dropped
    num_patches: int = field(init=False)

    def __post_init__(self):
        self.num_patches = (self.clip["image_size"] // self.clip["patch_size"]) ** 2

    @property
    def hidden_size(self) -> int:
        return self.clip["hidden_size"]

    @property
    def image_size(self) -> int:
        return self.clip["image_size"]

    def to_hf(self):
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**self.clip)


# Stable Diffusion 2.1-base components (diffusers config dicts).
SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
    upcast_attention=False, dual_cross_attention=False,
)
SD21_VAE = dict(
    in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu",
    latent_channels=4, norm_num_groups=32, sample_size=768, scaling_factor=0.18215,
)
# SD-2.1's PNDM scheduler config loaded into DDPMScheduler, as the original does (MP 379-381).
SD21_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, prediction_type="epsilon", set_alpha_to_one=False, skip_prk_steps=True,
    steps_offset=1, trained_betas=None, timestep_spacing="leading", variance_type="fixed_small",
)


@dataclass
class DiffusionConfig:
    """The Stable Diffusion head: condition projector + U-Net + VAE + DDPM scheduler."""

    unet: dict = field(default_factory=lambda: copy.deepcopy(SD21_UNET))
    vae: dict = field(default_factory=lambda: copy.deepcopy(SD21_VAE))
    scheduler: dict = field(default_factory=lambda: copy.deepcopy(SD21_SCHEDULER))

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet["in_channels"])

    @property
    def default_resolution(self) -> int:
        return int(self.unet["sample_size"]) * self.vae_scale_factor

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.get("scaling_factor", 0.18215))


@dataclass
class DreamLLMConfig:
    """Shapes of the whole model. Widths of the plugins are checked against the LLM's."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    num_dream_queries: int = 64
    name: str = "dreamllm-7b"

    @property
    def image_span_len(self) -> int:
        """`<im_start>` + patches + `<im_end>` (258 for the released model)."""
        return self.vision.num_patches + 2

    @property
    def dream_span_len(self) -> int:
        """`<dream_start>` + queries + `<dream_end>` (66 for the released model)."""
        return self.num_dream_queries + 2

    @classmethod
    def from_name(cls, name: str) -> "DreamLLMConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        return copy.deepcopy(PRESETS[name])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# SentencePiece vocabulary of the tiny tokenizer (byte fallback needs 256 + 3 of it).
TINY_BASE_VOCAB = 384


def _tiny() -> DreamLLMConfig:
    # Tiny but faithful in structure: 224-pixel CLIP input with 14-pixel patches keeps the
    # 256-feature image span; 16 dream queries (not 64) proves nothing hard-codes the count.
    llm = LLMConfig(vocab_size=TINY_BASE_VOCAB + len(ADDED_TOKENS), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048)
    vision = VisionConfig(
        clip=dict(CLIP_VIT_L14, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=2, projection_dim=32),
    )
    diffusion = DiffusionConfig(
        unet=dict(SD21_UNET, sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                  attention_head_dim=[2, 4], cross_attention_dim=48),
        vae=dict(SD21_VAE, block_out_channels=[32, 32, 32, 32], layers_per_block=1,
                 sample_size=64),
    )
    return DreamLLMConfig(llm=llm, vision=vision, diffusion=diffusion, num_dream_queries=16,
                          name="tiny")


PRESETS: dict[str, DreamLLMConfig] = {"dreamllm-7b": DreamLLMConfig(), "tiny": _tiny()}


# Prefill token-count buckets (one captured graph each on CUDA). Fine-grained because a pass costs
# its bucket's FLOPs: one image + 512 text tokens (770) pads to 832 (8% more than the 13.65 ms floor
# measured on an H100), the 65-row dream branch to 96 (weight-read bound: same time as 65), the
# 259-row image feedback pass to 288. The gap (64) sizes the KV cache's scratch slot.
DEFAULT_PREFILL_BUCKETS = (16, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448,
                           480, 512, 576, 640, 704, 768, 832, 896, 960, 1024)


@dataclass
class EngineConfig:
    """Runtime knobs of the fast engine (not the model's shapes)."""

    max_batch: int = 2  # [uncond; cond] guidance pair, or two requests
    max_seq: Optional[int] = None  # default: the model's max_position_embeddings
    precision: Precision = Precision.BF16
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2)
    use_cuda_graphs: bool = True
    # Multi-token passes (prefill, dream branch, condition pair) are padded to the next bucket and,
    # on CUDA with use_cuda_graphs, replayed from a graph captured per bucket. () runs them unpadded
    # and eagerly (the reference of the bucketed path's tests).
    prefill_buckets: tuple[int, ...] = DEFAULT_PREFILL_BUCKETS
    prefill_chunk: Optional[int] = None  # tokens per pass; default: the largest bucket (none: no chunking)
    unet_backend: str = "eager"
    vae_backend: str = "eager"
    # The "logits" decode step (one embedding per row in, logits out: `extend_batch` of single
    # tokens) is captured only when asked for: the decode loop never uses it, benchmarks of a bare
    # decode step and graph-vs-eager parity checks do. The loop's greedy/sample steps always are.
    capture_logits_graphs: bool = False
    weights: WeightFormat = WeightFormat.BF16  # LLaMA linears + LM head: bf16 (as loaded), int8, fp8

    def __post_init__(self):
        self.precision = Precision.parse(self.precision)
        self.weights = WeightFormat.parse(self.weights)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_seq is not None and self.max_seq < 1:
            raise ValueError(f"max_seq must be >= 1, got {self.max_seq}")
        buckets = tuple(self.prefill_buckets or ())
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
            raise ValueError(f"prefill_buckets must be positive integers, got {self.prefill_buckets!r}")
        self.prefill_buckets = tuple(sorted(set(buckets)))
        if self.prefill_chunk is not None:
            if isinstance(self.prefill_chunk, bool) or not isinstance(self.prefill_chunk, int) \
                    or self.prefill_chunk < 1:
                raise ValueError(f"prefill_chunk must be a positive integer, got {self.prefill_chunk!r}")
            if buckets and self.prefill_chunk > max(buckets):
                raise ValueError(
                    f"prefill_chunk {self.prefill_chunk} exceeds the largest prefill bucket "
                    f"{max(buckets)}: add a bucket >= the chunk or lower the chunk")
