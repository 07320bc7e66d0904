"""Weight-only quantization of the LLaMA linears: symmetric, one scale per output channel.

A weight W [N, K] (N outputs) becomes Q [N, K] and s [N] fp32 with W ~ Q * s[:, None]:

- int8: s = max|W[n]| / 127, Q = round(W / s) clamped to [-127, 127] (no -128: symmetric), so
  every element's rounding error is at most s / 2;
- fp8: float8 e4m3fn, s = max|W[n]| / 448 (e4m3's largest finite value), Q = W / s rounded to
  nearest by the cast (3 mantissa bits: relative error <= 2^-4 for normal values).

The product a @ W^T is then (a @ Q^T) * s: the scale is applied once per output after the K
reduction (kernels/quant_linear.py). Quantization runs in fp32 on the device the weight lives on,
one matrix at a time (a 7B gate|up matrix: 360 MB of fp32 transient). All-zero rows get scale 1 and
Q = 0 (exact).

Where fp8 runs: compute capability >= 8.9 (Ada, Hopper, Blackwell): Triton converts e4m3 in
hardware there and refuses it on older GPUs. The CPU runs both formats through the torch reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import WeightFormat
from .errors import InvalidInputError

INT8_MAX = 127.0
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP8_MIN_CAPABILITY = (8, 9)
SCALE_SUFFIX = "_scale"  # convert --weights: `<name>.weight` int8/fp8 + `<name>.weight_scale` fp32 [N]


def storage_dtype(fmt: WeightFormat) -> torch.dtype:
    return {WeightFormat.INT8: torch.int8, WeightFormat.FP8: torch.float8_e4m3fn}[WeightFormat.parse(fmt)]


@dataclass
class QuantizedWeight:
    """Q [N, K] (int8 or float8_e4m3fn, K contiguous) and its per-output-channel scale s [N] fp32."""

    qweight: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.scale.numel() * self.scale.element_size()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.qweight, self.scale

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """Q * s[:, None] in `dtype` (computed in fp32, or fp64 for an fp64 `dtype`)."""
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        return (self.qweight.to(cdt) * self.scale.to(cdt)[:, None]).to(dtype)


@torch.no_grad()
def quantize(w: torch.Tensor, fmt: "WeightFormat | str") -> QuantizedWeight:
    """W [N, K] (any float dtype, any device) -> `QuantizedWeight` on the same device."""
    fmt = WeightFormat.parse(fmt)
    assert fmt.quantized, "quantize() needs int8 or fp8"
    assert w.dim() == 2 and w.is_floating_point(), f"expected a float matrix [N, K], got {w.dtype} {tuple(w.shape)}"
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    top = INT8_MAX if fmt is WeightFormat.INT8 else FP8_MAX
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    x = wf / scale[:, None]
    del wf
    if fmt is WeightFormat.INT8:
        q = x.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        q = x.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedWeight(q.contiguous(), scale.contiguous())


def check_device_supports(fmt: "WeightFormat | str", device) -> None:
    """Raise InvalidInputError when `device` cannot run `fmt` (fp8 below compute capability 8.9).

    CPU tensors run the torch reference (every format). Fake CUDA tensors on a machine without a
    driver (devtools/check7b.py) stand for an H100 (sm_90), as kernels/_utils.num_sms does.
    """
    fmt, device = WeightFormat.parse(fmt), torch.device(device)
    if fmt is not WeightFormat.FP8 or device.type != "cuda" or not torch.cuda.is_available():
        return
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise InvalidInputError(
            f"weights='fp8' needs a GPU with fp8 support (compute capability >= 8.9: Ada L4/L40, "
            f"Hopper H100/H200, Blackwell); {name} is sm_{cap[0]}{cap[1]}: use weights='int8' (same "
            f"bytes per weight, runs on sm_80+) or 'bf16'")
