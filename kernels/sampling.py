"""Token draw in one launch: keyed Philox4x32-10 noise fused with the exponential race's argmax.

ids[b] = argmax_v probs[b, v] / q[b, v], q = -log(u), u = (r0 + 0.5) / 2^32, where r0 is the first
output of Philox4x32-10 at counter (v, position[b], 0, 0) under key (seed[b] low, seed[b] high).
The noise is a pure function of (seed, position, v): no generator state on the device or the host,
so a captured graph replays it, the eager path and the torch oracle (`exponential_sample_ref`,
bit-exact) reproduce it, and a step that is run ahead and thrown away consumes nothing.

Philox is written out here with uint32 math (`tl.umulhi` for the multiply-high), not taken from
`tl.rand`, whose counter layout is Triton's internal business and may change between versions.

Exactness: the log runs in float64 (rounded once to float32) and the division is `div_rn` (plain
`/` on fp32 compiles to the approximate `div.full.f32`), so the kernel, numpy (interpreter mode)
and torch agree bit for bit on q and on the ids; ties go to the smallest index, as torch.argmax.

Parallelism: grid [B, cdiv(V, BLOCK_V)]. Each program reduces its block to one int64 key
(score bits << 32 | (2^31 - 1 - v); scores are >= 0, so the float bits order as integers), merges
it with `atomic_max` into a per-row scratch word, and counts itself done; the last program of a row
reads and zeroes the word (`atomic_xchg`), writes the id and re-arms the counter. One launch per
step, no memset: at V = 32008 a single program per row would walk 32 blocks of Philox + fp64 log
on one SM (tens of us), the split spreads it over 32 programs per row.
"""
import torch
import triton
import triton.language as tl

from ._utils import is_interpret, is_tracing, next_pow2, register_triton_op


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors: counter (c0..c3), key (k0, k1) -> four uint32 outputs."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + 0x9E3779B9  # key schedule (Weyl sequence); uint32 wrap-around
            k1 = k1 + 0xBB67AE85
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _exponential_sample_kernel(
    # pointers
    probs_ptr, seeds_ptr, pos_ptr, out_ptr, packed_ptr, count_ptr, noise_ptr,
    # sizes
    V,
    # strides
    stride_pb, stride_nb,
    # meta
    BLOCK_V: tl.constexpr, WRITE_NOISE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # int32 vocabulary index
    ok = offs < V
    seed = tl.load(seeds_ptr + b).to(tl.int64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros([BLOCK_V], dtype=tl.uint32)
    c1 = zero + tl.load(pos_ptr + b).to(tl.uint32)
    r0, _, _, _ = _philox4x32_10(offs.to(tl.uint32), c1, zero, zero, k0, k1)
    u = (r0.to(tl.float64) + 0.5) * 2.3283064365386963e-10  # (r0 + 0.5) / 2^32, exact, in (0, 1)
    q = (-tl.log(u)).to(tl.float32)
    if WRITE_NOISE:
        tl.store(noise_ptr + b * stride_nb + offs, q, mask=ok)
    p = tl.load(probs_ptr + b * stride_pb + offs, mask=ok, other=0.0).to(tl.float32)
    score = tl.math.div_rn(p, q)  # >= 0 for the non-negative probs the launcher requires; masked lanes 0
    bits = (score.to(tl.uint32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)  # & drops a -0.0 sign
    key = tl.max((bits << 32) + (0x7FFFFFFF - offs.to(tl.int64)), 0)  # max score, then min index
    tl.atomic_max(packed_ptr + b, key)
    done = tl.atomic_add(count_ptr + b, 1)  # acq_rel: orders this row's atomic_max before it
    last = done == tl.num_programs(1) - 1
    best = tl.atomic_xchg(packed_ptr + b, 0, mask=last)  # read + re-arm for the next call
    tl.atomic_xchg(count_ptr + b, 0, mask=last)
    tl.store(out_ptr + b, 0x7FFFFFFF - (best & 0xFFFFFFFF), mask=last)


_scratch: dict = {}


def _get_scratch(device, B):
    """Per-row (packed key, done count) words: zero, and left zero by every launch (the last
    program of a row re-arms them), so a captured graph and eager calls share them safely on one
    stream. Cached per (device, B) and never freed: a graph keeps their addresses. Fresh (zeros)
    while tracing: fake or traced buffers must never enter the cache."""
    key = (device, B)
    tracing = is_tracing()
    buf = None if tracing else _scratch.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # inside a capture the zeros would be recorded, not run: eager calls before the first
            # replay would see garbage, and a non-zero count never re-arms (every later draw stale)
            raise RuntimeError(f"exponential_sample: first call for batch {B} on {device} inside a CUDA "
                               "graph capture; call it once eagerly first (warm-up) to allocate its scratch")
        buf = (torch.zeros(B, dtype=torch.int64, device=device),
               torch.zeros(B, dtype=torch.int32, device=device))
        if not tracing:
            _scratch[key] = buf
    return buf


def _meta(V: int):
    """(vocabulary programs per row, constexprs/options) for a V-wide vocabulary."""
    block_v = min(1024, max(16, next_pow2(V)))  # 7B vocabulary 32008: 32 programs per row
    return -(-V // block_v), dict(BLOCK_V=block_v, num_warps=1 if is_interpret() else 4)


_PLANS: dict = {}  # V -> _meta(V); host ints only (triton.cdiv on the host costs ~3 us a call)


def _launch(kernel, probs, seeds, positions, out, packed, count, noise_out, write_noise, plan):
    kernel[(probs.shape[0], plan[0])](
        probs, seeds, positions, out, packed, count, noise_out,
        probs.shape[1],
        probs.stride(0), noise_out.stride(0),
        WRITE_NOISE=write_noise, **plan[1],
    )


@register_triton_op("exponential_sample", mutates_args=("out", "packed", "count", "noise_out"))
def _exponential_sample_traced(probs: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                               out: torch.Tensor, packed: torch.Tensor, count: torch.Tensor,
                               noise_out: torch.Tensor, write_noise: bool) -> None:
    """The launch as torch.compile / fake modes see it: the kernel through wrap_triton."""
    _launch(torch.library.wrap_triton(_exponential_sample_kernel), probs, seeds, positions, out, packed,
            count, noise_out, write_noise, _meta(probs.shape[1]))


def exponential_sample(probs, seeds, positions, out=None, noise_out=None):
    """Draw one token id per row: argmax_v probs[b, v] / q[b, v] with keyed Philox exponential noise.

    probs: [B, V] fp32, non-negative (unnormalized is fine: the argmax is scale-free), last dim
    contiguous. seeds: [B] int64 (63-bit Philox keys). positions: [B] int32/int64 (position of the
    token being drawn; the noise's counter). out: [B] int64 or None. noise_out: [B, V] fp32 or None
    (receives q, for tests). Returns out. No host sync; graph-capturable after one call per B.
    """
    assert probs.dim() == 2 and probs.stride(-1) == 1, "probs must be [B, V] with a contiguous last dim"
    assert probs.dtype == torch.float32, f"probs must be fp32, got {probs.dtype}"
    B, V = probs.shape
    assert 0 < V < 2 ** 31, f"vocabulary size out of range: {V}"
    assert seeds.shape == (B,) and seeds.dtype == torch.int64, f"seeds must be [{B}] int64"
    assert positions.shape == (B,) and positions.dtype in (torch.int32, torch.int64), \
        f"positions must be [{B}] int32/int64"
    assert len({t.device for t in (probs, seeds, positions)}) == 1, "all tensors on one device"
    if out is None:
        out = torch.empty(B, dtype=torch.int64, device=probs.device)
    assert out.shape == (B,) and out.dtype == torch.int64, f"out must be [{B}] int64"
    write_noise = noise_out is not None
    if write_noise:
        assert noise_out.shape == (B, V) and noise_out.dtype == torch.float32 and noise_out.stride(-1) == 1, \
            f"noise_out must be [{B}, {V}] fp32 with a contiguous last dim"
    else:
        noise_out = out.new_empty(0, V, dtype=torch.float32) if is_tracing() else _no_noise(probs.device, V)
    if B == 0:
        return out
    packed, count = _get_scratch(probs.device, B)
    if is_tracing(probs):
        _exponential_sample_traced.op(probs, seeds, positions, out, packed, count, noise_out, write_noise)
        return out
    plan = _PLANS.get(V)
    if plan is None:
        plan = _PLANS[V] = _meta(V)
    # eager: the raw kernel (no dispatcher, no wrap_triton: ~0.2-1 ms of host time per call there)
    _launch(_exponential_sample_kernel, probs, seeds, positions, out, packed, count, noise_out, write_noise, plan)
    return out


_dummies: dict = {}


def _no_noise(device, V):
    """A never-written [0, V] stand-in for noise_out (the kernel only touches it with WRITE_NOISE)."""
    t = _dummies.get((device, V))
    if t is None:
        t = _dummies[(device, V)] = torch.empty(0, V, dtype=torch.float32, device=device)
    return t
