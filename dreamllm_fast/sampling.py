"""Token sampling: greedy, temperature, top-k, top-p, with sync-free draws.

One implementation serves the reference pipeline and the engine, so both draw the same token from
the same logits and generator. The draw is gpt-fast's exponential trick
(argmax(p / q), q ~ Exp(1)), which needs no host sync and can run inside a CUDA graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import InvalidInputError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise InvalidInputError(
                f"temperature must be a finite number > 0, got {self.temperature!r} "
                f"(for greedy decoding pass do_sample=False)"
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidInputError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise InvalidInputError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [..., V] fp32 -> probabilities [..., V] after temperature, top-k and top-p."""
    logits = logits / temperature
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sp, si = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (sp.cumsum(-1) - sp) >= top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_token(logits: torch.Tensor, params: SamplingParams,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits: [..., V] -> token ids [...] (int64), without a host sync."""
    logits = logits.float()
    if not params.do_sample:
        return torch.argmax(logits, dim=-1)
    probs = filter_logits(logits, params.temperature, params.top_k, params.top_p)
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / q, dim=-1)
