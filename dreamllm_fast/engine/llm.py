"""The engine's LLaMA decoder: fused weights, a static KV cache, and two forwards over the kernels.

- `LlamaWeights`: the checkpoint's HF-named LLaMA tensors rearranged once at load: q|k|v fused into
  one [(Hq + 2 Hkv) D, H] matrix, gate|up into one [2F, H] matrix (one GEMM each instead of three
  and two), all on the device in the activation dtype.
- `KVCache`: per layer `[num_slots, max_seq, Hkv, D]` K and V, allocated once; `max_seq` is the
  context rounded up to a multiple of 8 (style.md §11). The last slot is a scratch slot that
  CUDA-graph padding rows and capture warm-ups write into, so they never touch a live sequence.
- `LlamaRunner.prefill`: any number of new tokens for B sequences packed varlen (append_attention),
  returning the pre-final-norm hidden states of the packed rows (the residual stream).
- `LlamaRunner.decode_step`: one token for each of B sequences (decode_attention); a pure function
  of (embeds, cache_lens, slot_ids) over static weights and cache, so a CUDA graph can capture it.

RoPE rotation and the K/V cache write happen inside the attention kernels; positions are the
`cache_lens` device tensor, never host ints, so a captured step is valid at every position.
The math follows HF LLaMA op for op (residual = residual + out, RMSNorm in fp32, SwiGLU), so fp32
results agree with transformers to fp32 rounding (tests/parity/test_engine.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels as K
from ..config import LLMConfig


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass
class LayerWeights:
    ln1: torch.Tensor  # [H]
    wqkv: torch.Tensor  # [(Hq + 2 Hkv) D, H]
    wo: torch.Tensor  # [H, Hq D]
    ln2: torch.Tensor  # [H]
    wgu: torch.Tensor  # [2F, H] (gate rows first, then up: silu_and_mul's layout)
    wdown: torch.Tensor  # [H, F]


class LlamaWeights:
    """HF LLaMA state dict -> fused device tensors. Checks every key is used exactly once."""

    def __init__(self, state: dict, cfg: LLMConfig, device, dtype):
        used = set()

        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise KeyError(f"LLM weight {name!r} missing from the checkpoint")
            used.add(name)
            return state[name]

        def put(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()

        self.embed = put(take("model.embed_tokens.weight"))  # [V, H]
        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            self.layers.append(LayerWeights(
                ln1=put(take(p + "input_layernorm.weight")),
                wqkv=put(torch.cat([take(p + "self_attn.q_proj.weight"), take(p + "self_attn.k_proj.weight"),
                                    take(p + "self_attn.v_proj.weight")])),
                wo=put(take(p + "self_attn.o_proj.weight")),
                ln2=put(take(p + "post_attention_layernorm.weight")),
                wgu=put(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])),
                wdown=put(take(p + "mlp.down_proj.weight")),
            ))
        self.norm = put(take("model.norm.weight"))  # [H]
        self.lm_head = put(take("lm_head.weight"))  # [V, H]
        extra = sorted(set(state) - used)
        if extra:
            raise KeyError(f"unused LLM weights (the engine would silently ignore them): {extra[:5]}")


class KVCache:
    """Static K/V buffers: `num_slots` sequences (+1 scratch slot) of `max_seq` positions."""

    def __init__(self, cfg: LLMConfig, num_slots: int, max_seq: int, device, dtype):
        self.num_slots = num_slots
        self.scratch_slot = num_slots  # padding rows of graph replays write here
        self.max_seq = round_up(max_seq, 8)
        shape = (num_slots + 1, self.max_seq, cfg.num_key_value_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class LlamaRunner:
    """The decoder forward over `LlamaWeights` and a `KVCache` (no host syncs on CUDA)."""

    def __init__(self, cfg: LLMConfig, weights: LlamaWeights, cache: KVCache, device):
        self.cfg = cfg
        self.w = weights
        self.cache = cache
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        # fp32 tables as HF builds them; the kernels rotate in fp32.
        self.cos, self.sin = K.rope_cos_sin(cache.max_seq, cfg.head_dim, cfg.rope_theta, device=device)

    def _split_qkv(self, qkv: torch.Tensor):
        """qkv: [T, (Hq + 2 Hkv) D] -> q [T, Hq, D], k/v [T, Hkv, D] (strided views, no copies)."""
        T = qkv.shape[0]
        nq, nk = self.hq * self.d, self.hkv * self.d
        q = qkv[:, :nq].view(T, self.hq, self.d)
        k = qkv[:, nq:nq + nk].view(T, self.hkv, self.d)
        v = qkv[:, nq + nk:].view(T, self.hkv, self.d)
        return q, k, v

    def _layers(self, x: torch.Tensor, attend) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] embeddings -> (h, m): residual stream and last MLP output, hidden = h + m.

        The last residual add is left to the caller, which only needs some rows of it (logits at
        the sampled rows; the dream rows go through the fused dream_projection instead).
        """
        h = x.clone()  # residual stream; rmsnorm(residual=h) updates it in place
        T = x.shape[0]
        m = None
        for i, lw in enumerate(self.w.layers):
            if m is None:
                a = K.rmsnorm(h, lw.ln1, self.eps)
            else:
                a, h = K.rmsnorm(m, lw.ln1, self.eps, residual=h)  # h += m (HF: residual + out)
            q, k, v = self._split_qkv(F.linear(a, lw.wqkv))
            o = attend(i, q, k, v)  # [T, Hq, D]
            a, h = K.rmsnorm(F.linear(o.reshape(T, self.hq * self.d), lw.wo), lw.ln2, self.eps, residual=h)
            m = F.linear(K.silu_and_mul(F.linear(a, lw.wgu)), lw.wdown)
        return h, m

    def logits(self, h: torch.Tensor, m: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, V] at `rows` only (final norm + lm_head on N rows, not T)."""
        last = h.index_select(0, rows) + m.index_select(0, rows)
        return F.linear(K.rmsnorm(last, self.w.norm, self.eps), self.w.lm_head).float()

    def prefill(self, embeds: torch.Tensor, cu_seqlens: torch.Tensor, cache_lens: torch.Tensor,
                slot_ids: torch.Tensor, max_seqlen_q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds: [T, H] packed; cu_seqlens: [B+1] int32; cache_lens, slot_ids: [B] int32.

        Writes K/V at positions [cache_lens[b], cache_lens[b] + n_b) of slot slot_ids[b]. Returns
        (h, m) as in `_layers`. Does not advance cache_lens (the caller owns lengths).
        """
        c = self.cache

        def attend(i, q, k, v):
            return K.append_attention(q, k, v, c.k[i], c.v[i], cu_seqlens, cache_lens, slot_ids,
                                      self.cos, self.sin, max_seqlen_q)

        return self._layers(embeds, attend)

    def decode_step(self, embeds: torch.Tensor, cache_lens: torch.Tensor,
                    slot_ids: torch.Tensor) -> torch.Tensor:
        """embeds: [B, H], one token per sequence at position cache_lens[b] -> fp32 logits [B, V].

        Pure in its arguments (static weights and cache): safe to capture in a CUDA graph.
        """
        c = self.cache

        def attend(i, q, k, v):
            return K.decode_attention(q, k, v, c.k[i], c.v[i], cache_lens, slot_ids, self.cos, self.sin)

        h, m = self._layers(embeds, attend)
        return F.linear(K.rmsnorm(h + m, self.w.norm, self.eps), self.w.lm_head).float()
