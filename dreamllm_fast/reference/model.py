"""The reference backend: transformers + diffusers modules, composed as the original DreamLLM.

- LLM: transformers' `LlamaForCausalLM` on the checkpoint's weights (the original's modeling file is a
  renamed copy of transformers-4.35 LLaMA); eager cache (`DynamicCache`), sequential positions.
- Vision: `CLIPVisionModel`, hidden_states[-2] (penultimate layer), CLS dropped, then the linear
  projector with bias.
- Dream conditioning: the final-RMSNorm'd hidden states at the query positions, times the
  bias-free condition projector.
- Diffusion: diffusers `UNet2DConditionModel`, `AutoencoderKL`, `DDPMScheduler`.

This is the oracle of every parity test; it favours plainness over speed.
"""
from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import Checkpoint, build_diffusion_modules, load_clip_on_device, no_meta_left
from ..config import SpecialTokens
from ..diffusion import EagerDiffusionHead


class ReferenceModel(EagerDiffusionHead):
    """All modules of the model on one device and dtype."""

    name = "reference"

    def __init__(self, ckpt: Checkpoint, special: SpecialTokens, device="cpu",
                 dtype=torch.float32):
        from transformers import CLIPVisionModel, LlamaForCausalLM

        self.config = cfg = ckpt.config
        self.special = special
        self.device = torch.device(device)
        self.dtype = dtype
        to = dict(device=self.device, dtype=dtype)

        hf_cfg = cfg.llm.to_hf()
        with torch.device("meta"):
            llm = LlamaForCausalLM(hf_cfg)
        llm.load_state_dict(ckpt.llm, strict=True, assign=True)
        # inv_freq is a non-persistent buffer: rebuild it for real instead of from meta.
        with torch.device("cpu"):  # (the constructor's signature differs across transformers 5.x)
            llm.model.rotary_emb = type(llm.model.rotary_emb)(config=llm.config)
        no_meta_left(llm, "LLM")
        self.llm = llm.to(**to).eval()

        with torch.device("meta"):  # no random init of 303 M parameters on the host
            clip = CLIPVisionModel(cfg.vision.to_hf())
        self.clip = load_clip_on_device(clip, ckpt.clip, self.device, dtype)
        self.clip_proj = nn.Linear(cfg.vision.hidden_size, cfg.llm.hidden_size, bias=True)
        self.clip_proj.load_state_dict({"weight": ckpt.clip_proj_weight, "bias": ckpt.clip_proj_bias})
        self.clip_proj.to(**to)
        self.dream_queries = ckpt.dream_queries.to(**to)  # [Q, H]
        self.cond_proj = nn.Linear(cfg.llm.hidden_size, cfg.diffusion.cross_attention_dim, bias=False)
        self.cond_proj.load_state_dict({"weight": ckpt.cond_proj_weight})
        self.cond_proj.to(**to)

        self.unet, self.vae = build_diffusion_modules(cfg, ckpt.unet, ckpt.vae, self.device, dtype)

    # -- embeddings ---------------------------------------------------------------------------
    @torch.no_grad()
    def embed_tokens(self, ids) -> torch.Tensor:
        """ids: [n] -> [n, H]."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.llm.model.embed_tokens(ids)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [N, 3, S, S] -> projected features [N, P, H]."""
        out = self.clip(pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.config.vision.select_layer][:, 1:]  # drop CLS
        return self.clip_proj(feats)

    def new_session(self) -> "ReferenceSession":
        return ReferenceSession(self)



class ReferenceSession:
    """One sequence's KV cache (transformers DynamicCache); positions continue across calls."""

    def __init__(self, model: ReferenceModel):
        from transformers import DynamicCache

        self.m = model
        self.cache = DynamicCache()
        self.length = 0

    @torch.no_grad()
    def _forward(self, embeds: torch.Tensor) -> torch.Tensor:
        n = embeds.shape[0]
        pos = torch.arange(self.length, self.length + n, device=self.m.device)[None]
        out = self.m.llm.model(inputs_embeds=embeds[None].to(self.m.dtype), position_ids=pos,
                               past_key_values=self.cache, use_cache=True)
        self.length += n
        return out.last_hidden_state[0]  # after the final RMSNorm

    @torch.no_grad()
    def extend(self, embeds: torch.Tensor) -> torch.Tensor:
        """Append [n, H] embeddings; returns the fp32 logits of the last position, [V]."""
        h = self._forward(embeds)
        return self.m.llm.lm_head(h[-1:]).float()[0]

    @torch.no_grad()
    def extend_dream(self, embeds: torch.Tensor, rows) -> torch.Tensor:
        """Append [n, H] embeddings; returns the projected condition at `rows`, [len(rows), C]."""
        h = self._forward(embeds)
        return self.m.cond_proj(h[torch.as_tensor(rows, device=h.device)])

    def close(self) -> None:
        self.cache = None
