"""Planted GPU bugs for the compile checks (kernels/targets.py --extra): each must be flagged.

Loaded by file path inside the targets tool (compile only, meta tensors, no launch):
- ``_spill_kernel``: a 128 x 128 fp32 tile held by one warp (512 values per thread > 255 registers).
- ``_smem_kernel``: a 128 x 256 x 256 bf16 dot pipelined over 4 stages (~750 KB of shared memory).
- ``_broken_kernel``: ``tl.arange`` over 3 elements (Triton needs a power of two): a compile error.
- ``_fp64_loop_kernel``: the 2026-11-23 decode-attention pattern, a Python float scale multiplied
  into a loop-carried fp32 statistic without a cast; compiles with Triton's fp32 typing, fails
  with Inductor's fp64 typing ("Loop-carried variable ... fp64").
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _spill_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + r[:, None] * BLOCK + r[None, :])
    y = tl.exp(x) * tl.sum(x, 0)[None, :] + tl.sum(x, 1)[:, None]  # keeps the whole tile live
    tl.store(y_ptr + r[:, None] * BLOCK + r[None, :], y)


@triton.jit
def _smem_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.arange(0, BLOCK_M)
    n = tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + m[:, None] * K + (k0 + kk)[None, :])
        b = tl.load(b_ptr + (k0 + kk)[:, None] * BLOCK_N + n[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + m[:, None] * BLOCK_N + n[None, :], acc)


@triton.jit
def _broken_kernel(x_ptr):
    r = tl.arange(0, 3)
    tl.store(x_ptr + r, r)


@triton.jit
def _fp64_loop_kernel(x_ptr, out_ptr, scale, n, BLOCK: tl.constexpr):
    m_i = tl.full([1], float("-inf"), tl.float32)
    for i in range(0, n, BLOCK):
        x = tl.load(x_ptr + i + tl.arange(0, BLOCK)).to(tl.float32) * scale
        m_i = tl.maximum(m_i, tl.max(x, 0))
    tl.store(out_ptr + tl.arange(0, 1), m_i)


def launches():
    def meta(*shape, dt=torch.float32):
        return torch.empty(*shape, dtype=dt, device="meta")

    _spill_kernel[(1,)](meta(128, 128), meta(128, 128), BLOCK=128, num_warps=1)
    _smem_kernel[(1,)](meta(128, 4096, dt=torch.bfloat16), meta(4096, 256, dt=torch.bfloat16), meta(128, 256), 4096,
                       BLOCK_M=128, BLOCK_N=256, BLOCK_K=256, num_warps=8, num_stages=4)
    _broken_kernel[(1,)](meta(4, dt=torch.int32))
    _fp64_loop_kernel[(1,)](meta(1024, dt=torch.bfloat16), meta(1), 0.125, 1024, BLOCK=64)
