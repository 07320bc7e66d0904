"""A backend whose model math costs nothing: the pipeline's own host work, measured and tested alone.

`StubModel` implements the backend protocol (dreamllm_fast/backend.py) over a scripted "model": every
sequence writes the same walk of ordinary word pieces, and, when `dream_every` is set, emits
`<dream_start>` after every `dream_every` text tokens. Logits are one-hot at the scripted id; the
dream branch, CLIP, U-Net and VAE return zeros of the right shapes. The decode batch mirrors the
engine's mechanics: on CUDA a device lookup (`ids = script[count]`), an async copy of the ids into
pinned memory and an event per step; on the CPU plain tensors. Used by
benchmarks/bench_host_overhead.py and by the decode-loop tests (stop rules, run-ahead).
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch

from ..backend import DecodeBatchBase, HostIds, OneByOnePasses
from ..config import SpecialTokens
from ..errors import InvalidInputError


class StubModel(OneByOnePasses):
    """Backend stand-in: `script_ids` is the walk (ids the stub writes, in order, forever)."""

    name = "stub"

    def __init__(self, config, special: SpecialTokens, script_ids: Sequence[int], device="cpu",
                 max_positions: int = 8192, dream_every: Optional[int] = None):
        self.config = copy.deepcopy(config)
        self.config.llm.max_position_embeddings = max_positions
        self.special = special
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.max_len = max_positions
        H, V = self.config.llm.hidden_size, self.config.llm.vocab_size
        self.dream_queries = torch.zeros(self.config.num_dream_queries, H, device=self.device)
        # the walk by generated-token count: text pieces, with <dream_start> every `dream_every`
        walk = []
        n = 0
        for _ in range(max_positions + 1):
            if dream_every and n and n % dream_every == 0 and (not walk or walk[-1] != special.dream_start):
                walk.append(special.dream_start)
            else:
                walk.append(int(script_ids[n % len(script_ids)]))
                n += 1
        self.walk = walk
        self.walk_dev = torch.tensor(walk, dtype=torch.int64, device=self.device)
        self.V = V
        self.unet = self.vae = None
        self.launches = 0  # decode steps launched (tests count wasted run-ahead steps)
        self.open_sessions = 0  # sessions not yet closed (a scheduler's slot count, as the engine's)

    # -- the interface ------------------------------------------------------------------------
    def embed_tokens(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return torch.zeros(ids.shape[0], self.config.llm.hidden_size, device=self.device)

    def encode_images(self, pixel_values) -> torch.Tensor:
        n = pixel_values.shape[0]
        return torch.zeros(n, self.config.vision.num_patches, self.config.llm.hidden_size, device=self.device)

    def unet_eps(self, sample, t, cond) -> torch.Tensor:
        return torch.zeros_like(sample)

    def vae_decode(self, latents) -> torch.Tensor:
        f = self.config.diffusion.vae_scale_factor
        B, _, h, w = latents.shape
        return torch.zeros(B, 3, h * f, w * f, device=latents.device)

    def kv_slots(self) -> tuple[int, None]:
        """(used, total): sessions open now; no bound (the stub holds no cache)."""
        return self.open_sessions, None

    def new_session(self) -> "StubSession":
        self.open_sessions += 1
        return StubSession(self)

    def decode_batch(self, sessions, token_ids, params, seeds) -> "StubDecodeBatch":
        return StubDecodeBatch(self, sessions)

    def _one_hot(self, tok: int) -> torch.Tensor:
        x = torch.zeros(self.V, device=self.device)
        x[tok] = 1.0
        return x


class StubSession:
    def __init__(self, model: StubModel):
        self.m = model
        self.length = 0
        self.generated = 0  # tokens the script has produced for this sequence
        self.closed = False

    def extend(self, embeds: torch.Tensor) -> torch.Tensor:
        if self.length + embeds.shape[0] > self.m.max_len:
            raise InvalidInputError("stub: context overflow")
        self.length += embeds.shape[0]
        tok = self.m.walk[self.generated]
        self.generated += 1
        return self.m._one_hot(tok)

    def extend_dream(self, embeds: torch.Tensor, rows) -> torch.Tensor:
        self.length += embeds.shape[0]
        return torch.zeros(len(rows), self.m.config.diffusion.cross_attention_dim, device=self.m.device)

    def truncate(self, length: int) -> None:
        self.length = length

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.m.open_sessions -= 1


class StubDecodeBatch(DecodeBatchBase):
    """Each step: every row's next scripted id; one device gather + pinned copy + event on CUDA."""

    def __init__(self, model: StubModel, sessions):
        super().__init__(sessions)
        self.m, self.max_len = model, model.max_len
        self.start = [s.generated for s in sessions]
        self.count = [s.generated for s in sessions]  # CPU: plain ints, so the stub costs ~nothing
        if model.device.type == "cuda":
            self.count = torch.tensor(self.count, dtype=torch.int64, device=model.device)
        self._ids = HostIds(len(sessions), model.device)

    def _launch(self, k: int) -> None:
        self.m.launches += 1
        if self._ids.cuda:
            self._ids.put(k, self.m.walk_dev[self.count])
            self.count += 1
        else:
            walk = self.m.walk
            self._ids.put(k, [walk[c] for c in self.count])
            self.count = [c + 1 for c in self.count]

    def _result(self, k: int) -> list[int]:
        return self._ids.get(k)

    def _commit(self, i: int, session, length: int) -> None:
        session.generated = self.start[i] + (length - self.base[i])  # tokens accepted past the first
        session.length = length
