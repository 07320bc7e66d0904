"""GroupNorm(+SiLU): the fused Triton kernel (kernels/group_norm.py) against torch's GroupNorm then
SiLU (what diffusers' U-Net and VAE run) and torch.compile of the same: GPU time per call (CUDA
graph) and eager time, GB/s against the measured copy bandwidth.

Shapes: the SD-2.1 U-Net's GroupNorms at 512x512 with the CFG batch (2) and the server's batch (8),
and the VAE decoder's at 512x512 (batch 1); fp16, NCHW and channels-last. Bytes: one read and one
write of x (the fused kernel reads x twice, statistics then apply; torch's pair reads it twice
and writes it twice). Inputs rotate over > 4x L2.

    python -m benchmarks.bench_group_norm [--quick] [--out DIR]
"""
from benchmarks.kernel_common import DEVICE, SMOKE, ResultFile, add_gbps, measure  # noqa: I001 (sets smoke mode)

import torch  # noqa: E402

from benchmarks.harness import Rotator, ceilings, parser  # noqa: E402

GROUPS = 32
# (site, N, C, H, W): one row per distinct GroupNorm size of the U-Net / VAE at 512x512
CASES = ([("smoke", 2, 64, 6, 5)] if SMOKE else
         [("unet_down0", 2, 320, 64, 64), ("unet_down1", 2, 640, 32, 32),
          ("unet_down2", 2, 1280, 16, 16), ("unet_mid", 2, 1280, 8, 8), ("unet_up1", 2, 2560, 16, 16),
          ("unet_up3", 2, 960, 64, 64), ("unet_down0_b8", 8, 320, 64, 64),
          ("vae_mid", 1, 512, 64, 64), ("vae_up2", 1, 512, 256, 256), ("vae_up3", 1, 256, 512, 512),
          ("vae_out", 1, 128, 512, 512)])
QUICK = ("smoke", "unet_down0", "unet_down0_b8", "vae_out")


def _torch_pair(x, w, b):
    return torch.nn.functional.silu(torch.nn.functional.group_norm(x, GROUPS, w, b, 1e-5))


def bench_case(site, n, c, h, w_, layout, copy_gbps, compiled):
    from dreamllm_fast.kernels.group_norm import group_norm

    dtype = torch.float16
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    nbytes = n * c * h * w_ * 2

    def make(i):
        return torch.randn(n, c, h, w_, device=DEVICE, dtype=dtype).to(memory_format=fmt)

    rot = Rotator(make, nbytes)
    wt = torch.randn(c, device=DEVICE, dtype=dtype)
    bs = torch.randn(c, device=DEVICE, dtype=dtype)
    out = make(0)
    f = dict(op="group_norm_silu", site=site, shape=f"{n}x{c}x{h}x{w_}", layout=layout, dtype="float16",
             bytes=2 * nbytes)
    rows = [measure("triton", lambda: group_norm(rot.next(), wt, bs, GROUPS, 1e-5, silu=True, out=out), **f),
            measure("torch", lambda: _torch_pair(rot.next(), wt, bs), **f),
            measure("torch_compile", lambda: compiled(rot.next(), wt, bs), **f)]
    return [add_gbps(r, r["bytes"], copy_gbps) for r in rows]


def main(argv=None, out_dir=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    copy_gbps = ceilings()["copy_gbps"]
    if SMOKE:
        def compiled(*a):
            raise RuntimeError("torch.compile skipped in the CPU smoke run")
    else:
        compiled = torch.compile(_torch_pair)
    res = ResultFile("group_norm", out_dir or args.out)
    for site, n, c, h, w in CASES:
        if args.quick and site not in QUICK:
            continue
        for layout in ("channels_last", "nchw"):
            res.add(bench_case(site, n, c, h, w, layout, copy_gbps, compiled))
    return res.finish(["site", "shape", "layout", "provider", "graph_us", "eager_us", "gbps", "frac_copy_bw"])


if __name__ == "__main__":
    main()
