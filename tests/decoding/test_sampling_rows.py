"""Batched sampling with per-row settings (dreamllm_fast/sampling.py), on the CPU oracle path.

One batch may mix greedy and sampled rows with their own temperature, top-k, top-p and seed; each
row must draw exactly what it draws alone, and the filters keep the documented semantics.
"""
import math

import pytest
import torch

from dreamllm_fast.errors import InvalidInputError
from dreamllm_fast.sampling import (SamplingParams, SamplingRows, draw_seed, filter_logits,
                                    sample_next, sampling_probs)

V = 50
P = [SamplingParams(),  # greedy
     SamplingParams(do_sample=True, temperature=0.7),
     SamplingParams(do_sample=True, top_k=5),
     SamplingParams(do_sample=True, temperature=1.3, top_p=0.8),
     SamplingParams(do_sample=True, temperature=2.0, top_k=12, top_p=0.95)]
SEEDS = [0, 11, 2 ** 40 + 3, 7, 2 ** 63 - 2]


def _logits(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g) * 2


def test_each_row_draws_what_it_draws_alone():
    logits = _logits(len(P))
    pos = torch.tensor([5, 6, 7, 8, 9])
    for step in range(20):
        batch = sample_next(logits, SamplingRows.of(P, SEEDS, "cpu"), pos + step)
        alone = [int(sample_next(logits[i:i + 1], SamplingRows.of([P[i]], [SEEDS[i]], "cpu"), pos[i:i + 1] + step))
                 for i in range(len(P))]
        assert batch.tolist() == alone
        assert batch[0] == logits[0].argmax(), "a greedy row takes the argmax of its raw logits"


def test_greedy_only_variant_is_argmax_and_equals_full_path_on_greedy_rows():
    logits = _logits(4, seed=1)
    rows = SamplingRows.of([SamplingParams()] * 4, [0] * 4, "cpu")
    pos = torch.arange(4)
    assert torch.equal(sample_next(logits, rows, pos, greedy_only=True), logits.argmax(-1))
    assert torch.equal(sample_next(logits, rows, pos), logits.argmax(-1))


def test_filters_per_row_match_the_scalar_filter():
    logits = _logits(len(P), seed=2)
    r = SamplingRows.of(P, SEEDS, "cpu")
    probs = sampling_probs(logits, r.temperature, r.top_k, r.top_p)
    for i, p in enumerate(P):
        if p.greedy:
            continue
        want = filter_logits(logits[i:i + 1], p.temperature, p.top_k, p.top_p)[0]
        torch.testing.assert_close(probs[i] / probs[i].sum(), want, atol=1e-7, rtol=0)
    assert (probs[2] > 0).sum() == 5  # top-k 5


def test_filter_semantics():
    x = torch.tensor([[1.0, 3.0, 2.0, 0.5, 3.0]])
    p = filter_logits(x, 1.0, top_k=1, top_p=1.0)
    assert torch.equal(p[0] > 0, torch.tensor([False, True, False, False, True])), "ties at the k-th value stay"
    p = filter_logits(x, 1.0, top_k=0, top_p=0.3)
    assert (p[0] > 0).sum() == 1, "the first token always stays"
    big = torch.randn(1, 32008) * 4  # top_p 1 keeps everything even where the cumsum rounds past 1
    assert (filter_logits(big, 1.0, 0, 1.0) > 0).all()


def test_draws_follow_the_filtered_distribution():
    """2000 positions of one row: frequencies vs the filtered probabilities (chi-square)."""
    logits = torch.linspace(-1, 2, 8)[None]
    sp = SamplingParams(do_sample=True, temperature=0.8, top_p=0.9)
    n = 2000
    rows = SamplingRows.of([sp] * n, [1234] * n, "cpu")
    ids = sample_next(logits.expand(n, -1), rows, torch.arange(n))
    p = filter_logits(logits, 0.8, 0, 0.9)[0].double()
    keep = p > 0
    assert (p[ids] > 0).all(), "drew a filtered-out token"
    counts = torch.bincount(ids, minlength=8).double()[keep]
    exp = p[keep] * n
    chi2 = ((counts - exp) ** 2 / exp).sum().item()
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), f"chi-square {chi2:.1f} over {dof} dof"


def test_seed_draw_is_reproducible_and_advances_the_generator():
    """Both backends draw the seed through the same call, so the generator goes on identically
    (it then drives the diffusion noise)."""
    g1, g2, g0 = (torch.Generator().manual_seed(3) for _ in range(3))
    a, b = draw_seed(g1), draw_seed(g2)
    assert a == b and 0 <= a < 2 ** 63
    after1, after2, untouched = (torch.randn(4, generator=g) for g in (g1, g2, g0))
    assert torch.equal(after1, after2)
    assert not torch.equal(after1, untouched), "the seed draw must advance the generator"


@pytest.mark.parametrize("kwargs,word", [
    (dict(max_new_tokens=True), "max_new_tokens"), (dict(top_k=False), "top_k"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_p=0.0), "top_p"),
])
def test_bad_settings_are_refused(kwargs, word):
    with pytest.raises(InvalidInputError, match=word):
        SamplingParams(**kwargs)


def test_rows_refuse_bad_seeds_and_sizes():
    rows = SamplingRows(2, "cpu")
    with pytest.raises(InvalidInputError, match="seeds"):
        rows.set([SamplingParams(do_sample=True)], [-1])
    with pytest.raises(InvalidInputError, match="slots"):
        rows.set([SamplingParams()] * 3, [0] * 3)
    assert rows.set([SamplingParams(), SamplingParams(do_sample=True)], [0, 5]) is True
    assert rows.greedy.tolist() == [True, False] and rows.seeds.tolist() == [0, 5]
