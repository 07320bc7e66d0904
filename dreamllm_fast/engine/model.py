"""`EngineModel`: the fast backend behind the pipeline's interface (same as `ReferenceModel`).

- LLM: `LlamaRunner` over the kernels (fused weights, static KV cache, logits only at the sampled
  row, fused dream projection); sessions are slots of the static cache, handed out from a free list.
- Single-token `extend` runs the decode step: a replayed CUDA graph on CUDA (`CudaGraphRunner`),
  the same function eagerly on the CPU (reference ops, no graphs).
- Every multi-token pass (prompt prefill, dream branch, image feedback, [uncond; cond] pair) goes
  through `PrefillRunner`: chunks of at most `EngineConfig.prefill_chunk` tokens, each padded to a
  length bucket and replayed from the bucket's captured graph on CUDA (the same bucketed step runs
  eagerly without graphs). All graphs share one memory pool; `graph_memory` reports it.
- `graph_backend`: real CUDA graphs by default on CUDA; `engine.graphs.StandInGraphs` runs the whole
  capture/replay path without a driver (CPU tests, fake-CUDA checks in devtools/check7b.py).
- `decode_batch` serves the decode loop (dreamllm_fast/decoding.py): `EngineDecoder` (engine/decode.py)
  holds a self-advancing step that embeds the previous ids, runs the decoder, samples on the device
  and feeds itself (captured per batch size in a greedy and a sampling variant), enqueued one step
  ahead of the host's reads.
- Weights: `EngineConfig.weights` "int8"/"fp8" stores every LLaMA linear and the LM head
  quantized per output channel (engine/llm.py, kernels/quant_linear.py); same shapes, same graphs.
- Vision: transformers' CLIPVisionModel cut after the selected layer (the penultimate one: the
  last encoder layer and post_layernorm never run), CLS dropped, then the projector (with bias).
  Modules are built on meta and assigned on the device (no random init, no module.to()).
- Diffusion: diffusers' U-Net and VAE, eager (the export backends replace them in the pipeline).

Errors: a request that would overflow the context raises ContextOverflowError before any work;
any exception inside a session call releases the session's slot, so the engine stays usable.
"""
from __future__ import annotations

import contextlib
import logging
import time
import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels as K
from ..checkpoint import Checkpoint
from ..modules import build_diffusion_modules, load_clip_on_device
from ..config import EngineConfig, Precision, SpecialTokens
from ..diffusion import EagerDiffusionHead
from ..errors import ContextOverflowError, EngineBusyError, InvalidInputError
from ..quant import check_device_supports
from ..sampling import SamplingParams
from .decode import EngineDecodeBatch, EngineDecoder
from .graphs import CudaGraphs
from .llm import KVCache, LlamaRunner, LlamaWeights, round_up
from .prefill import PrefillRunner, bucket_gap

log = logging.getLogger("dreamllm_fast.engine")
if not log.handlers:  # the warm-up line (graph memory) prints unless the application configures this
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("dreamllm_fast: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def build_clip_tower(ckpt: Checkpoint, device, dtype) -> nn.Module:
    """CLIPVisionModel truncated so that its last_hidden_state IS hidden_states[select_layer].

    hidden_states has num_layers + 1 entries (embeddings first), so index `s` (negative) is the
    output of the first num_layers + 1 + s layers. post_layernorm only touches the pooled CLS
    output, which is dropped: replaced by Identity so it never runs. Built on meta and assigned on
    the device (`load_on_device`): the layers cut off are never materialized.
    """
    from transformers import CLIPVisionModel

    cfg = ckpt.config.vision
    with torch.device("meta"):
        clip = CLIPVisionModel(cfg.to_hf())
    vm = getattr(clip, "vision_model", clip)  # transformers 4.x nests it; 5.x flattens it
    n = len(vm.encoder.layers)
    s = cfg.select_layer
    keep = n + 1 + s if s < 0 else s
    if not 0 <= keep <= n:
        raise ValueError(f"select_layer {s} out of range for a {n}-layer CLIP tower")
    vm.encoder.layers = vm.encoder.layers[:keep]
    vm.post_layernorm = nn.Identity()
    return load_clip_on_device(clip, ckpt.clip, device, dtype)  # the cut layers are never loaded


class EngineModel(EagerDiffusionHead):
    """All modules on one device and dtype; implements the pipeline's backend interface."""

    name = "engine"

    def __init__(self, ckpt: Checkpoint, special: SpecialTokens, device="cpu", dtype=torch.float32,
                 engine_config: Optional[EngineConfig] = None, graph_backend=None):
        """graph_backend: what captures and replays the graphs. None: real CUDA graphs on CUDA when
        `engine_config.use_cuda_graphs`, no graphs otherwise; `engine.graphs.StandInGraphs()` runs
        the whole capture/replay code path without a driver (CPU and fake-CUDA tests)."""
        self.config = cfg = ckpt.config
        self.special = special
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # fake CUDA has no driver: cuda:0
            self.device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        self.dtype = Precision.parse(dtype).dtype
        ec = engine_config or EngineConfig(precision=Precision.parse(dtype))
        self.engine_config = ec
        to = dict(device=self.device, dtype=self.dtype)

        # -- LLM: fused weights, static cache, runners ---------------------------------------
        lc = cfg.llm
        self.max_len = min(lc.max_position_embeddings, ec.max_seq or lc.max_position_embeddings)
        check_device_supports(ec.weights, self.device)  # fp8 below sm_89: refuse before loading
        self.weights = LlamaWeights(ckpt.llm, lc, self.device, self.dtype, weights=ec.weights)
        # buckets past the context are never needed: the context (rounded up to 8) replaces them
        buckets = [b for b in ec.prefill_buckets if b < self.max_len]
        if len(buckets) < len(ec.prefill_buckets):
            buckets.append(round_up(self.max_len, 8))
        # scratch positions: decode pads at position 0, a bucketed pass pads < the bucket gap
        self.cache = KVCache(lc, ec.max_batch, self.max_len, self.device, self.dtype,
                             scratch_len=max(1, bucket_gap(buckets)))
        self.llm = LlamaRunner(lc, self.weights, self.cache, self.device)
        chunk = min(ec.prefill_chunk or buckets[-1], buckets[-1]) if buckets else ec.prefill_chunk
        self.prefill = PrefillRunner(self.llm, buckets, chunk, ec.max_batch, self.device, self.dtype)
        self._free: list[int] = list(range(ec.max_batch))[::-1]  # pop() hands out slot 0 first
        self._arange = torch.arange(self.max_len, device=self.device)  # row ids of gathered hidden rows
        # the decode steps: static buffers (graph inputs on CUDA), the step, its graphs
        self.decoder = EngineDecoder(self.llm, ec.max_batch, self.dtype)

        # -- vision tower + projector ---------------------------------------------------------
        self.clip = build_clip_tower(ckpt, self.device, self.dtype)
        self.clip_proj_weight = ckpt.clip_proj_weight.to(**to).contiguous()  # [H, Hc]
        self.clip_proj_bias = ckpt.clip_proj_bias.to(**to).contiguous()  # [H]

        # -- dream queries + condition projector ---------------------------------------------
        self.dream_queries = ckpt.dream_queries.to(**to).contiguous()  # [Q, H]
        self.cond_proj_weight = ckpt.cond_proj_weight.to(**to).contiguous()  # [C, H], no bias

        # -- diffusion head (diffusers modules) -----------------------------------------------
        self.unet, self.vae = build_diffusion_modules(cfg, ckpt.unet, ckpt.vae, self.device, self.dtype)

        # -- graphs: prefill buckets + decode steps, one pool (CUDA; the CPU runs them eagerly) --
        self.graph_backend = graph_backend
        if graph_backend is None and self.device.type == "cuda" and ec.use_cuda_graphs:
            self.graph_backend = CudaGraphs(self.device)
        self.graph_memory: dict[str, int] = {}
        self.warmup_seconds = 0.0
        if self.graph_backend is not None:
            self.warmup([s for s in ec.cuda_graph_batch_sizes if 1 <= s <= ec.max_batch])

    # -- warm-up and capture ------------------------------------------------------------------
    @torch.no_grad()
    def warmup(self, capture_sizes: Sequence[int]) -> None:
        """Capture the prefill buckets (largest first), then the decode steps, into one pool."""
        t0 = time.perf_counter()
        backend = self.graph_backend
        if self.prefill.buckets:
            self.prefill.capture(backend)
        else:  # unbucketed prefill stays eager: compile its kernels on the scratch slot now
            for n in (1, 7, 64):
                n = min(n, self.cache.scratch_len)
                emb = torch.zeros(n, self.weights.embed.shape[1], device=self.device, dtype=self.dtype)
                self.prefill._pass([emb], [0], [self.cache.scratch_slot])
        if capture_sizes:
            self.decoder.capture(capture_sizes, backend, self.engine_config.capture_logits_graphs)
        backend.synchronize()
        self.warmup_seconds = time.perf_counter() - t0
        graphs = self.decoder.graphs
        self.graph_memory = {"pool_bytes": backend.pool_bytes(), "kv_cache_bytes": self.cache.nbytes,
                             "prefill_graphs": len(self.prefill.graphs),
                             "decode_graphs": len(graphs.graphs) if graphs else 0}
        log.info("%s graphs: %d prefill buckets (%s..%s tokens) + %d decode graphs in %.1f s; shared pool "
                 "%.1f MiB; KV cache %.1f MiB", backend.name, self.graph_memory["prefill_graphs"],
                 self.prefill.buckets[0] if self.prefill.buckets else "-",
                 self.prefill.buckets[-1] if self.prefill.buckets else "-",
                 self.graph_memory["decode_graphs"], self.warmup_seconds,
                 self.graph_memory["pool_bytes"] / 2**20, self.cache.nbytes / 2**20)

    # -- embeddings ---------------------------------------------------------------------------
    @torch.no_grad()
    def embed_tokens(self, ids) -> torch.Tensor:
        """ids: [n] (list or tensor) -> [n, H]."""
        if not isinstance(ids, torch.Tensor):
            ids = list(ids)
            V = self.weights.embed.shape[0]
            if any(not 0 <= int(i) < V for i in ids):  # a bad id on CUDA is a device assert
                raise InvalidInputError(f"token ids must be in [0, {V}), got {ids}")
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return F.embedding(ids, self.weights.embed)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [N, 3, S, S] -> projected features [N, P, H] (penultimate layer, no CLS)."""
        out = self.clip(pixel_values.to(self.device, self.dtype))
        feats = out.last_hidden_state[:, 1:]  # [N, P, Hc]
        return F.linear(feats, self.clip_proj_weight, self.clip_proj_bias)

    # -- sessions -----------------------------------------------------------------------------
    def new_session(self) -> "EngineSession":
        if not self._free:
            raise EngineBusyError(
                f"all {self.engine_config.max_batch} KV-cache slots are held by open sessions; "
                "close() a session first, or raise EngineConfig.max_batch")
        return EngineSession(self, self._free.pop())

    def kv_slots(self) -> tuple[int, int]:
        """(used, total) slots of the static KV cache: sessions open now, and `max_batch`."""
        total = self.engine_config.max_batch
        return total - len(self._free), total

    def _release(self, slot: int) -> None:
        if slot not in self._free:
            self._free.append(slot)

    def _decode(self, sessions: Sequence["EngineSession"], embeds: torch.Tensor) -> torch.Tensor:
        """One token per session: embeds [B, H] -> fp32 logits [B, V] (a copy, safe to keep)."""
        return self.decoder.logits(embeds.to(self.device, self.dtype), [s.length for s in sessions],
                                   [s.slot for s in sessions])

    def decode_batch(self, sessions: Sequence["EngineSession"], token_ids: Sequence[int],
                     params: Sequence[SamplingParams], seeds: Sequence[int]) -> EngineDecodeBatch:
        """The decode loop's batch over `sessions` (engine/decode.py); one at a time."""
        return EngineDecodeBatch(self.decoder, sessions, token_ids, params, seeds, self.max_len)

    @property
    def vocab_size(self) -> int:
        return self.weights.embed.shape[0]

    @property
    def prefill_chunk(self) -> int:
        """Tokens per packed prefill pass: the largest prefill bucket (512 with no buckets, when any
        size runs eagerly)."""
        return self.prefill.chunk or 512

    @contextlib.contextmanager
    def _guard(self, sessions: Sequence["EngineSession"], ns: Sequence[int], rows=None):
        """Checks before any work; on any exception (checks included) releases every session's slot."""
        try:
            for i, (s, n) in enumerate(zip(sessions, ns)):
                s.check_extend(n)
                if rows is not None:
                    _check_rows(rows[i], n)
            with torch.no_grad():
                yield
        except BaseException:
            for s in sessions:
                s.close()
            raise
        for s, n in zip(sessions, ns):
            s.length += n

    def extend_batch(self, sessions: Sequence["EngineSession"], embeds: Sequence[torch.Tensor]) -> torch.Tensor:
        """Extend several sessions in one pass (one kernel launch per op for all of them).

        embeds[b]: [n_b, H]. Returns fp32 logits [B, V] at each session's last new position.
        All-single-token batches take the (captured) decode step.
        """
        if len(sessions) != len(embeds) or len({s.slot for s in sessions}) != len(sessions):
            raise InvalidInputError("extend_batch needs one embedding block per distinct session")
        ns = [int(e.shape[0]) for e in embeds]
        with self._guard(sessions, ns):
            if all(n == 1 for n in ns):
                return self._decode(sessions, torch.cat(list(embeds)))
            hidden = self.prefill.prefill(embeds, [s.length for s in sessions], [s.slot for s in sessions],
                                          [[n - 1] for n in ns])
            return self.llm.logits(hidden)

    def condition_pair(self, sessions: Sequence["EngineSession"], embeds: Sequence[torch.Tensor],
                       rows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """`extend_dream` for several sessions in one pass, e.g. [uncond; cond] for guidance.

        Returns one projected condition [len(rows[b]), C] per session.
        """
        if len(sessions) != len(embeds) or len(rows) != len(embeds) \
                or len({s.slot for s in sessions}) != len(sessions):
            raise InvalidInputError("condition_pair needs one embedding block and row list per distinct session")
        ns = [int(e.shape[0]) for e in embeds]
        with self._guard(sessions, ns, rows):
            hidden = self.prefill.prefill(embeds, [s.length for s in sessions], [s.slot for s in sessions],
                                          rows)  # [N, H] pre-norm rows, in rows' order
            cond = K.dream_projection(hidden, self._arange[:hidden.shape[0]], self.weights.norm,
                                      self.cond_proj_weight, self.config.llm.rms_norm_eps)
            return list(cond.split([len(r) for r in rows]))


    def logits_at(self, session: "EngineSession", embeds: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """Extend `session` by embeds [n, H]; returns the fp32 logits at `rows` (indices into the n
        new positions), [len(rows), V]: scoring a text (dreamllm_fast/eval_ppl.py)."""
        n = int(embeds.shape[0])
        with self._guard([session], [n], [rows]):
            hidden = self.prefill.prefill([embeds], [session.length], [session.slot], [list(rows)])
            return self.llm.logits(hidden)


def _check_rows(rows: Sequence[int], n: int) -> None:
    if len(rows) == 0 or any(not 0 <= int(r) < n for r in rows):
        raise InvalidInputError(f"dream rows must be non-empty indices into the {n} new positions, got {list(rows)}")


class EngineSession:
    """One sequence: a slot of the static KV cache; positions continue across calls."""

    def __init__(self, model: EngineModel, slot: int):
        self.m = model
        self.slot = slot
        self.length = 0
        self._closed = False
        self.decoding = None  # the running EngineDecodeBatch that owns this session's length, if any
        # a session dropped without close() still gives its slot back
        self._finalizer = weakref.finalize(self, model._release, slot)

    @property
    def closed(self) -> bool:
        return self._closed

    def check_extend(self, n: int) -> None:
        """Refuse, before any work, an extend by n positions this session cannot take."""
        if self._closed:
            raise InvalidInputError("this session is closed; open a new one with new_session()")
        if n < 1:
            raise InvalidInputError("extend needs at least one embedding row")
        if self.length + n > self.m.max_len:
            raise ContextOverflowError(
                f"the sequence would reach {self.length + n} positions (holds {self.length}, adds "
                f"{n}); the model's context is {self.m.max_len}: shorten the prompt, request fewer "
                "tokens or images")

    def _not_decoding(self) -> None:
        if self.decoding is not None:  # its device length runs ahead of self.length until commit
            raise InvalidInputError("this session is in a running decode batch: finish or pause it in "
                                    "the DecodeLoop before extending it")

    def extend(self, embeds: torch.Tensor) -> torch.Tensor:
        """Append [n, H] embeddings; returns the fp32 logits of the last position, [V]."""
        self._not_decoding()
        return self.m.extend_batch([self], [embeds])[0]

    def extend_logits(self, embeds: torch.Tensor, rows) -> torch.Tensor:
        """Append [n, H] embeddings; returns the fp32 logits at `rows`, [len(rows), V]."""
        self._not_decoding()
        return self.m.logits_at(self, embeds, list(rows))

    def extend_dream(self, embeds: torch.Tensor, rows) -> torch.Tensor:
        """Append [n, H] embeddings; returns the projected condition at `rows`, [len(rows), C]."""
        self._not_decoding()
        return self.m.condition_pair([self], [embeds], [list(rows)])[0]

    def truncate(self, length: int) -> None:
        """Forget positions >= length (their K/V stay in the slot, unread, until overwritten)."""
        self._not_decoding()
        if not 0 <= length <= self.length:
            raise InvalidInputError(f"truncate to {length} of a {self.length}-position session")
        self.length = int(length)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.length = 0
            self._finalizer()  # releases the slot (once)
