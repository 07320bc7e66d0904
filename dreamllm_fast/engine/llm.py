"""The engine's LLaMA decoder: fused weights, a static KV cache, and two forwards over the kernels.

- `LlamaWeights`: the checkpoint's HF-named LLaMA tensors rearranged once at load: q|k|v fused into
  one [(Hq + 2 Hkv) D, H] matrix, gate|up into one [2F, H] matrix (one GEMM each instead of three
  and two), all on the device in the activation dtype. With `weights="int8"|"fp8"` the four
  linears of every layer and the LM head become `QuantizedWeight`s (dreamllm_fast/quant.py: one
  scale per output channel, quantized on the device right after the fusion, or read as stored by
  `convert --weights`) and run through `kernels.quant_linear`; everything else stays unquantized.
- `KVCache`: per layer `[num_slots + 1, max_seq, Hkv, D]` K and V views of one buffer allocated
  once; `max_seq` is the context rounded up to a multiple of 8. The last slot is a
  short scratch slot that graph padding and capture warm-ups write into, so they never touch a live
  sequence.
- `LlamaRunner.prefill`: any number of new tokens for B sequences packed varlen (append_attention),
  returning the pre-final-norm hidden states of the packed rows; `engine/prefill.py` runs it in
  length buckets (captured graphs on CUDA) and in chunks.
- `LlamaRunner.decode_step`: one token for each of B sequences (decode_attention); a pure function
  of (embeds, cache_lens, slot_ids) over static weights and cache, so a CUDA graph can capture it.

RoPE rotation and the K/V cache write happen inside the attention kernels; positions are the
`cache_lens` device tensor, never host ints, so a captured step is valid at every position.
The math follows HF LLaMA op for op (residual = residual + out, RMSNorm in fp32, SwiGLU), so fp32
results agree with transformers to fp32 rounding (tests/parity/test_engine.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .. import kernels as K
from ..config import LLMConfig, WeightFormat
from ..quant import SCALE_SUFFIX, QuantizedWeight, quantize, storage_dtype

Linear = "torch.Tensor | QuantizedWeight"  # a weight as `linear` takes it


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def linear(x: torch.Tensor, w: Linear) -> torch.Tensor:
    """x @ w^T (bias-free): cuBLAS for a plain weight, the fused-dequant kernel for a quantized one."""
    if isinstance(w, QuantizedWeight):
        return K.quant_linear(x, w.qweight, w.scale)
    return F.linear(x, w)


@dataclass
class LayerWeights:
    ln1: torch.Tensor  # [H]
    wqkv: Linear  # [(Hq + 2 Hkv) D, H]
    wo: Linear  # [H, Hq D]
    ln2: torch.Tensor  # [H]
    wgu: Linear  # [2F, H] (gate rows first, then up: silu_and_mul's layout)
    wdown: Linear  # [H, F]


class LlamaWeights:
    """HF LLaMA state dict -> fused device tensors. Checks every key is used exactly once.

    weights: "bf16" keeps the linears in `dtype`; "int8"/"fp8" quantizes them (and the LM head)
    per output channel. A state written by `convert --weights` already holds `<name>.weight` in
    the storage dtype beside `<name>.weight_scale` [N] fp32; it is used as stored (the format must
    match `weights`).
    """

    def __init__(self, state: dict, cfg: LLMConfig, device, dtype, weights="bf16"):
        used = set()
        fmt = self.format = WeightFormat.parse(weights)

        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise KeyError(f"LLM weight {name!r} missing from the checkpoint")
            used.add(name)
            return state[name]

        def put(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()

        def stored(name: str) -> bool:
            """Whether `name` was saved quantized (its scale sits beside it); checks the format."""
            if name + SCALE_SUFFIX not in state:
                return False
            if not fmt.quantized or state[name].dtype != storage_dtype(fmt):  # a mix-up: say so
                raise ValueError(
                    f"{name} is stored as {state[name].dtype} with per-channel scales, but the engine "
                    f"was asked for weights={fmt.value!r}: load it with the weights it was converted "
                    f"to, or convert the bf16 checkpoint again")
            return True

        def lin(*names: str) -> Linear:
            """The weights `names` fused along the output dim, quantized if asked."""
            if all(stored(n) for n in names):
                return QuantizedWeight(torch.cat([take(n) for n in names]).to(device).contiguous(),
                                       torch.cat([take(n + SCALE_SUFFIX) for n in names]).to(
                                           device=device, dtype=torch.float32).contiguous())
            w = torch.cat([take(n) for n in names]) if len(names) > 1 else take(names[0])
            if not fmt.quantized:
                return put(w)
            # on the device, one matrix at a time: a fused bf16 copy lives only until quantized
            return quantize(w.to(device=device), fmt)

        self.embed = put(take("model.embed_tokens.weight"))  # [V, H]
        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            self.layers.append(LayerWeights(
                ln1=put(take(p + "input_layernorm.weight")),
                wqkv=lin(p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"),
                wo=lin(p + "self_attn.o_proj.weight"),
                ln2=put(take(p + "post_attention_layernorm.weight")),
                wgu=lin(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                wdown=lin(p + "mlp.down_proj.weight"),
            ))
        self.norm = put(take("model.norm.weight"))  # [H]
        self.lm_head = lin("lm_head.weight")  # [V, H]
        extra = sorted(set(state) - used)
        if extra:
            raise KeyError(f"unused LLM weights (the engine would silently ignore them): {extra[:5]}")

    def tensors(self) -> list:
        """Every device tensor of the decoder (quantized weights as their Q and scale)."""
        out = [self.embed, self.norm]
        for w in [self.lm_head] + [t for lw in self.layers for t in (lw.ln1, lw.wqkv, lw.wo, lw.ln2, lw.wgu, lw.wdown)]:
            out += list(w.tensors()) if isinstance(w, QuantizedWeight) else [w]
        return out

    def decode_read_bytes(self) -> int:
        """Bytes one decode step reads from the weights: all but the embedding table (one row is
        gathered), quantized weights with their scales."""
        return sum(t.numel() * t.element_size() for t in self.tensors()) \
            - self.embed.numel() * self.embed.element_size()


class KVCache:
    """Static K/V for `num_slots` sequences of `max_seq` positions, plus a short scratch slot.

    `k[i]`, `v[i]`: layer i's `[num_slots + 1, max_seq, Hkv, D]` views; slot `num_slots` is the
    scratch slot that CUDA-graph padding rows, padding sequences and capture warm-ups write into, so
    they never touch a live sequence. Padding only ever writes scratch positions
    `[0, scratch_len)` (decode pads at position 0, a prefill pads fewer rows than its bucket gap),
    so the scratch slot holds `scratch_len` positions, not `max_seq`: one flat buffer lays out, per
    layer and per K/V, the live slots followed by `scratch_len` scratch positions, and each view's
    scratch slot is declared `max_seq` long only so that one tensor describes all slots (its
    positions past `scratch_len` alias the next block and are never written). A full scratch slot
    cost 1 GiB at 7B shapes and ctx 2048 in bf16 (32 layers x 2 x 2048 x 4096 x 2 B); this costs
    `scratch_len / max_seq` of that plus one block's tail.
    """

    def __init__(self, cfg: LLMConfig, num_slots: int, max_seq: int, device, dtype,
                 scratch_len: Optional[int] = None):
        self.num_slots = num_slots
        self.scratch_slot = num_slots  # padding rows of graph replays write here
        self.max_seq = round_up(max_seq, 8)
        self.scratch_len = min(self.max_seq, round_up(scratch_len or self.max_seq, 8))
        hkv, d = cfg.num_key_value_heads, cfg.head_dim
        row = hkv * d  # elements per position
        slot = self.max_seq * row
        block = num_slots * slot + self.scratch_len * row  # live slots + scratch positions
        layers = cfg.num_hidden_layers
        tail = (self.max_seq - self.scratch_len) * row  # the last view's scratch slot, as declared
        self.buffer = torch.zeros(2 * layers * block + tail, device=device, dtype=dtype)
        shape, stride = (num_slots + 1, self.max_seq, hkv, d), (slot, row, d, 1)
        self.k = [self.buffer.as_strided(shape, stride, (2 * i) * block) for i in range(layers)]
        self.v = [self.buffer.as_strided(shape, stride, (2 * i + 1) * block) for i in range(layers)]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


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

    def _layers(self, x: torch.Tensor, attend, residual_out: Optional[torch.Tensor] = None):
        """x: [T, H] embeddings (read only) -> (h, m): residual stream and last MLP output.

        HF op order, launch for launch: per layer rmsnorm, qkv GEMM, attention (RoPE + cache write
        inside), o GEMM, rmsnorm fused with the residual add (h = o + h), gate|up GEMM, silu*up,
        down GEMM; the next layer's input rmsnorm adds the MLP output (h = m + h). Layer 0 reads the
        embeddings as its residual and writes x + o into `residual_out` (a fresh buffer if None):
        no clone of x. The last add, hidden = h + m, is the caller's: `decode_step` fuses it into
        the final norm, `prefill` does it in place.
        """
        assert self.w.layers, "the decoder has no layers"
        T = x.shape[0]
        h = m = None
        for i, lw in enumerate(self.w.layers):
            if i == 0:
                a = K.rmsnorm(x, lw.ln1, self.eps)
            else:
                a, h = K.rmsnorm(m, lw.ln1, self.eps, residual=h)  # h = m + h (HF: residual + out)
            q, k, v = self._split_qkv(linear(a, lw.wqkv))
            o = linear(attend(i, q, k, v).reshape(T, self.hq * self.d), lw.wo)  # attend: [T, Hq, D]
            if i == 0:
                a, h = K.rmsnorm(o, lw.ln2, self.eps, residual=x,
                                 residual_out=torch.empty_like(x) if residual_out is None else residual_out)
            else:
                a, h = K.rmsnorm(o, lw.ln2, self.eps, residual=h)
            m = linear(K.silu_and_mul(linear(a, lw.wgu)), lw.wdown)
        return h, m

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] pre-norm rows (only the sampled ones) -> fp32 logits [N, V]."""
        return linear(K.rmsnorm(hidden, self.w.norm, self.eps), self.w.lm_head).float()

    def prefill(self, embeds: torch.Tensor, cu_seqlens: torch.Tensor, cache_lens: torch.Tensor,
                slot_ids: torch.Tensor, max_seqlen_q: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """embeds: [T, H] packed; cu_seqlens: [B+1] int32; cache_lens, slot_ids: [B] int32.

        Writes K/V at positions [cache_lens[b], cache_lens[b] + n_b) of slot slot_ids[b] and
        returns the pre-final-norm hidden states [T, H] (in `out` if given: the prefill graphs'
        static output). Does not advance cache_lens (the caller owns lengths). `max_seqlen_q` is a
        host int that sizes the attention grid: a captured chunk passes its bucket size.
        """
        c = self.cache

        def attend(i, q, k, v):
            return K.append_attention(q, k, v, c.k[i], c.v[i], cu_seqlens, cache_lens, slot_ids,
                                      self.cos, self.sin, max_seqlen_q)

        h, m = self._layers(embeds, attend, residual_out=out)
        return h.add_(m)  # HF: hidden = residual + mlp_out (same bits as m + h)

    def decode_step(self, embeds: torch.Tensor, cache_lens: torch.Tensor,
                    slot_ids: torch.Tensor) -> torch.Tensor:
        """embeds: [B, H], one token per sequence at position cache_lens[b] -> fp32 logits [B, V].

        Pure in its arguments (static weights and cache): safe to capture in a CUDA graph.
        """
        c = self.cache

        def attend(i, q, k, v):
            return K.decode_attention(q, k, v, c.k[i], c.v[i], cache_lens, slot_ids, self.cos, self.sin)

        h, m = self._layers(embeds, attend)
        normed, _ = K.rmsnorm(m, self.w.norm, self.eps, residual=h)  # final add fused: h = m + h
        return linear(normed, self.w.lm_head).float()
