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

import functools
import inspect
import weakref

import torch
from torch import nn

from ..backend import DecodeBatchBase, OneByOnePasses
from ..checkpoint import Checkpoint
from ..modules import build_diffusion_modules, load_clip_on_device, no_meta_left
from ..config import SpecialTokens
from ..diffusion import EagerDiffusionHead
from ..errors import InvalidInputError
from ..sampling import SamplingRows, sample_next


@functools.cache
def _cache_param(forward) -> str:
    # transformers 5.25 renamed LLaMA's `past_key_values` argument to `cache` (the old name warns and
    # goes away in 5.40); 5.0-5.24 know only the old one. Read the name off the signature once.
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwargs(module: nn.Module, cache) -> dict:
    """``{name: cache}`` under the name ``module.forward`` takes for its KV cache: ``cache`` from
    transformers 5.25, ``past_key_values`` before."""
    return {_cache_param(type(module).forward): cache}


class ReferenceModel(OneByOnePasses, EagerDiffusionHead):
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
        self._open: "weakref.WeakSet[ReferenceSession]" = weakref.WeakSet()  # for kv_slots()

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
        s = ReferenceSession(self)
        self._open.add(s)
        return s

    @property
    def max_len(self) -> int:
        """Positions a session may hold: the model's (each session grows its own cache)."""
        return self.config.llm.max_position_embeddings

    def kv_slots(self) -> tuple[int, None]:
        """(used, total): sessions open now; total None (each session grows its own cache)."""
        return len(self._open), None

    def decode_batch(self, sessions, token_ids, params, seeds) -> "ReferenceDecodeBatch":
        """The decode loop's batch (same contract as the engine's; plain and synchronous)."""
        return ReferenceDecodeBatch(self, sessions, token_ids, params, seeds)


class ReferenceDecodeBatch(DecodeBatchBase):
    """One plain step per `launch()`: each session extends by its previous token (batch-1
    transformers forwards), then the shared sampler draws every row's next id, exactly as the
    engine's captured step does. `close(lengths)` crops each cache to the accepted length, so a
    step run past a stop leaves nothing behind."""

    def __init__(self, model: ReferenceModel, sessions, token_ids, params, seeds):
        if len(sessions) != len(token_ids) or len(params) != len(sessions) or len(seeds) != len(sessions):
            raise InvalidInputError("decode_batch needs one token id, sampling setting and seed per session")
        if len({id(s) for s in sessions}) != len(sessions) or any(s.cache is None for s in sessions):
            raise InvalidInputError("decode_batch needs distinct open sessions")
        super().__init__(sessions)
        self.m = model
        self.ids = [int(t) for t in token_ids]
        self.rows = SamplingRows.of(params, seeds, model.device)
        self.greedy = not any(p.do_sample for p in params)
        self._results: list[list[int]] = []

    @torch.no_grad()
    def _launch(self, k: int) -> None:
        logits = torch.stack([s.extend(self.m.embed_tokens([t])) for s, t in zip(self.sessions, self.ids)])
        pos = torch.tensor([s.length for s in self.sessions], dtype=torch.int64, device=logits.device)
        self.ids = sample_next(logits, self.rows, pos, greedy_only=self.greedy).tolist()
        self._results.append(self.ids)
        self.logits = logits

    def _result(self, k: int) -> list[int]:
        return self._results.pop(0)

    def _commit(self, i: int, session, length: int) -> None:
        if session.cache is not None:
            session.truncate(length)


class ReferenceSession:
    """One sequence's KV cache (transformers DynamicCache); positions continue across calls."""

    def __init__(self, model: ReferenceModel):
        from transformers import DynamicCache

        self.m = model
        self.cache = DynamicCache()
        self._cache_kw = cache_kwargs(model.llm.model, self.cache)
        self.length = 0

    @torch.no_grad()
    def _forward(self, embeds: torch.Tensor) -> torch.Tensor:
        n = embeds.shape[0]
        pos = torch.arange(self.length, self.length + n, device=self.m.device)[None]
        out = self.m.llm.model(inputs_embeds=embeds[None].to(self.m.dtype), position_ids=pos,
                               use_cache=True, **self._cache_kw)
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

    def truncate(self, length: int) -> None:
        """Forget positions >= length (crops every layer's K/V)."""
        if not 0 <= length <= self.length:
            raise InvalidInputError(f"truncate to {length} of a {self.length}-position session")
        # Slice each layer directly: `crop`'s argument changed meaning within transformers 5.x.
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]
        self.length = int(length)

    def close(self) -> None:
        self.cache = self._cache_kw = None  # both hold the K/V tensors
        self.m._open.discard(self)
