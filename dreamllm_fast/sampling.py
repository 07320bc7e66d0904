"""Token sampling: greedy, temperature, top-k, top-p, per row, on the device, without a host sync.

One function, `sample_next`, draws the next ids of a batch for every path: the engine's captured
decode step, its eager (CPU) twin, the reference backend, and the first token after a prefill. So
the paths agree by construction, and each row of a batch may have its own settings.

Randomness is counter-based: a request draws ONE 63-bit seed from its own `torch.Generator` when it
starts (`draw_seed`), and the noise of the token that will occupy position p is a pure function of
(seed, p, vocabulary index): keyed Philox4x32-10 (kernels/sampling.py, oracle in
kernels/reference.py). The draw is gpt-fast's exponential race, argmax(probs / q) with q ~ Exp(1).
Nothing is consumed per token, so a captured graph, a replay run ahead and thrown away, and the
eager path all see the same noise, and the generator goes on to drive the diffusion noise exactly
as far as the seed draw moved it. A greedy request draws no seed: its generator drives only the
diffusion noise, as before sampling moved on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import kernels as K
from .devices import fill_from_host
from .errors import InvalidInputError

SEED_BITS = 63  # a non-negative int64: the Philox key is its low and high 32-bit words


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise InvalidInputError(
                f"temperature must be a finite number > 0, got {self.temperature!r} "
                f"(for greedy decoding pass do_sample=False)"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) \
                or not 0 <= self.top_k < 2 ** 63:  # the sampling rows hold it as int64
            raise InvalidInputError(
                f"top_k must be an integer in [0, 2^63) (0 disables it), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise InvalidInputError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """One 63-bit Philox key from `generator` (the global default generator when None)."""
    device = generator.device if generator is not None else "cpu"
    t = torch.randint(0, 2 ** SEED_BITS - 1, (1,), generator=generator, device=device)
    return int(t.item())  # one sync per request, never per token


class SamplingRows:
    """Per-row sampling settings of a batch as device tensors (the captured step's static inputs).

    temperature [N] fp32, top_k [N] int64 (0: off), top_p [N] fp32 (1: off), greedy [N] bool,
    seeds [N] int64. `set` fills the leading rows from host values and pads the rest with greedy
    rows; `view(n)` gives the leading n rows without copying.
    """

    def __init__(self, capacity: int, device, _views=None):
        if _views is not None:
            self.temperature, self.top_k, self.top_p, self.greedy, self.seeds = _views
            return
        self.temperature = torch.ones(capacity, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.top_p = torch.ones(capacity, dtype=torch.float32, device=device)
        self.greedy = torch.ones(capacity, dtype=torch.bool, device=device)
        self.seeds = torch.zeros(capacity, dtype=torch.int64, device=device)

    @classmethod
    def of(cls, params: Sequence[SamplingParams], seeds: Sequence[int], device) -> "SamplingRows":
        rows = cls(len(params), device)
        rows.set(params, seeds)
        return rows

    @property
    def capacity(self) -> int:
        return self.seeds.shape[0]

    def view(self, n: int) -> "SamplingRows":
        return SamplingRows(0, None, _views=(self.temperature[:n], self.top_k[:n], self.top_p[:n],
                                             self.greedy[:n], self.seeds[:n]))

    def set(self, params: Sequence[SamplingParams], seeds: Sequence[int]) -> bool:
        """Fill rows [0, len(params)) (padding after them: greedy); True if any row samples."""
        n = len(params)
        if n != len(seeds) or n > self.capacity:
            raise InvalidInputError(f"{n} sampling rows for {len(seeds)} seeds and {self.capacity} slots")
        for s in seeds:
            if not 0 <= int(s) < 2 ** SEED_BITS:
                raise InvalidInputError(f"seeds must be integers in [0, 2^{SEED_BITS}), got {s!r}")
        pad = self.capacity - n
        sampled = [p.do_sample for p in params]
        host = (
            (self.temperature, [p.temperature if p.do_sample else 1.0 for p in params] + [1.0] * pad),
            (self.top_k, [p.top_k if p.do_sample else 0 for p in params] + [0] * pad),
            (self.top_p, [float(p.top_p) if p.do_sample else 1.0 for p in params] + [1.0] * pad),
            (self.greedy, [not s for s in sampled] + [True] * pad),
            (self.seeds, [int(s) if d else 0 for s, d in zip(seeds, sampled)] + [0] * pad),
        )
        for buf, values in host:
            fill_from_host(buf, values)
        return any(sampled)


def sampling_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> unnormalized probabilities [B, V] in vocabulary order, per-row filters.

    Temperature, then top-k on the logits (ties at the k-th value are kept), softmax, then top-p
    (the smallest prefix of the sorted distribution whose mass reaches top_p; the first token always
    stays). One stable descending sort serves both filters; rows with top_k 0 / top_p 1 are
    unfiltered. The result is not renormalized: the exponential race is scale-free.
    """
    x = logits.float() / temperature[:, None]
    V = x.shape[-1]
    sx, si = torch.sort(x, dim=-1, descending=True, stable=True)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    kth = sx.gather(1, (k - 1)[:, None])
    sp = torch.softmax(sx.masked_fill(sx < kth, float("-inf")), dim=-1)
    drop = ((sp.cumsum(-1) - sp) >= top_p[:, None]) & (top_p < 1.0)[:, None]
    return torch.zeros_like(sp).scatter_(1, si, sp.masked_fill(drop, 0.0))


def sample_next(logits: torch.Tensor, rows: SamplingRows, positions: torch.Tensor,
                greedy_only: bool = False) -> torch.Tensor:
    """Next token ids [B] int64 of a batch: logits [B, V]; rows: settings of the B rows;
    positions [B]: where each drawn token will sit in its sequence (the noise's counter).

    greedy_only (a host flag, e.g. one captured graph per variant): argmax only, no sort. Otherwise
    the full path; greedy rows still take the argmax of their raw logits (torch.where).
    """
    if greedy_only:
        return torch.argmax(logits, dim=-1)
    probs = sampling_probs(logits, rows.temperature, rows.top_k, rows.top_p)
    drawn = K.exponential_sample(probs, rows.seeds, positions)
    return torch.where(rows.greedy, torch.argmax(logits, dim=-1), drawn)


# -- one-off helpers (tests, scripts) -------------------------------------------------------------
def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [..., V] -> normalized probabilities [..., V] with one setting for every row."""
    x = logits.float().reshape(-1, logits.shape[-1])
    n = x.shape[0]
    probs = sampling_probs(x, torch.full((n,), float(temperature), device=x.device),
                           torch.full((n,), int(top_k), dtype=torch.int64, device=x.device),
                           torch.full((n,), float(top_p), device=x.device))
    return (probs / probs.sum(-1, keepdim=True)).reshape(logits.shape)


def sample_token(logits: torch.Tensor, params: SamplingParams,
                 generator: Optional[torch.Generator] = None, position: int = 0) -> torch.Tensor:
    """logits [..., V] -> token ids [...] (int64). Sampling draws a fresh seed from `generator` per
    call (a one-off helper: the decode loop draws one seed per request instead)."""
    if not params.do_sample:
        return torch.argmax(logits.float(), dim=-1)
    x = logits.float().reshape(-1, logits.shape[-1])
    n = x.shape[0]
    rows = SamplingRows.of([params] * n, [draw_seed(generator)] * n, x.device)
    pos = torch.full((n,), position, dtype=torch.int64, device=x.device)
    return sample_next(x, rows, pos).reshape(logits.shape[:-1])
