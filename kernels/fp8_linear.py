"""FP8 linear: y = x @ (W_q · s_w)ᵀ + b with W_q float8_e4m3fn [N, K] and one float32 scale per output channel.

Test:  python -m pytest -q tests/test_fp8.py                (CPU: the reference, and the launcher's call layout)
       python -m pytest -q -m gpu tests/test_fp8.py         (GPU: torch._scaled_mm against the reference)

Here the "kernel" is torch._scaled_mm (cuBLASLt/CUTLASS fp8 GEMM, Ada sm89 and Hopper sm90 and later) with rowwise
scales: the activation is quantized per token (its own float32 scale per row of x), the weight carries its scale
per output channel, and the GEMM multiplies both back in its epilogue, accumulating in float32. The reference is
the dequantized matmul: W = W_q.float() · s_w[:, None] cast to x's dtype, then F.linear.

The quantization rule (both operands): scale = amax(|row|) / 448 (448 = the largest finite e4m3fn), r = 1 / scale
correctly rounded (torch.reciprocal, once per row), row · r clamped to ±448 and rounded to nearest. A multiply, not a
division, per element: that keeps the kernels that quantize from registers (kernels/quant_fp8.py) memory-bound and
bit-identical to this; row · r is within ~2^-23 (relative) of the exact row / scale. e4m3fn keeps 3 mantissa bits,
so a value in a normal binade is off by at most half a step: 2^-4 of itself; below 2^-6 (subnormals, step 2^-9) by
at most 2^-10 absolute. In row units: |W - W_dq| <= max(2^-4 |W|, 2^-10 · amax / 448) <= 2^-4 · amax (up to those
float32 roundings).
"""
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


class FP8Rows(NamedTuple):
    """An activation already quantized by the rule below, as a kernel emits it for an fp8 GEMM:
    q [..., K] float8_e4m3fn contiguous, scale [...] float32 (one per row: per token), and `dtype`, the
    activation's own dtype (what it stands for, and what the GEMM returns). Value ≈ q.float() · scale[..., None]."""
    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self):
        return self.q.shape

    @property
    def device(self):
        return self.q.device

    @property
    def is_cuda(self):
        return self.q.is_cuda

    def dequantized(self, dtype=None):
        """q · scale computed in float32, cast to `dtype` (default: the activation's own dtype)."""
        K = self.q.shape[-1]
        return dequantize_rows(self.q.reshape(-1, K), self.scale.reshape(-1), dtype or self.dtype).view(self.q.shape)


def quantize_rows(t):
    """t [R, C] (any float dtype) -> (q float8_e4m3fn [R, C], scale float32 [R]) with t ≈ q.float() · scale[:, None].
    The scale never reaches zero (an all-zero row gets the smallest normal float32 and quantizes to zeros), so its
    reciprocal (at most 2^126) is finite."""
    t = t.float()
    scale = (t.abs().amax(-1) / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)  # [R]
    q = (t * scale.reciprocal()[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_rows(q, scale, dtype=torch.float32):
    """(q [R, C] fp8, scale [R] float32) -> q · scale[:, None], computed in float32 and cast to `dtype` once."""
    return (q.float() * scale[:, None]).to(dtype)


def fp8_linear_ref(x, weight, scale, bias=None):
    """x [..., K] (float) · dequantized weight [N, K]ᵀ + bias [N] -> [..., N] in x's dtype.
    x as FP8Rows: what torch._scaled_mm computes, emulated (both operands dequantized, float32 products and sums,
    bias, one rounding to the activation's dtype)."""
    if isinstance(x, FP8Rows):
        b = None if bias is None else bias.float()
        return F.linear(x.dequantized(torch.float32), dequantize_rows(weight, scale), b).to(x.dtype)
    return F.linear(x, dequantize_rows(weight, scale, x.dtype), bias)


@functools.lru_cache(maxsize=None)
def _capability(index):
    return torch.cuda.get_device_capability(index)


def supports(x, weight, bias=None):
    """Whether fp8_linear runs these inputs: CUDA sm89+ with torch._scaled_mm, bf16 activations (rowwise scaling
    gives bf16 output only), e4m3fn weights, K and N multiples of 16 (cuBLASLt's fp8 alignment).
    x: a tensor, or FP8Rows (its dtype is the activation's)."""
    return (x.is_cuda and hasattr(torch, "_scaled_mm") and x.dtype == torch.bfloat16
            and weight.dtype == torch.float8_e4m3fn and weight.is_cuda
            and _capability(x.device.index if x.device.index is not None else torch.cuda.current_device()) >= (8, 9)
            and x.shape[-1] % 16 == 0 and weight.shape[0] % 16 == 0
            and (bias is None or bias.dtype == x.dtype))


def fp8_linear(x, weight, scale, bias=None):
    """The fp8 GEMM: x [..., K] quantized per token (or FP8Rows, quantized already by the kernel that made it),
    weight [N, K] e4m3fn with scale [N] float32 -> [..., N] in the activation's dtype. Call through
    ops.linear_fp8 (which checks `supports`); the shapes are checked here."""
    K, N = x.shape[-1], weight.shape[0]
    if weight.shape[1] != K or scale.shape != (N,) or scale.dtype != torch.float32:
        raise ValueError(f"fp8_linear: x [..., {K}], weight {tuple(weight.shape)} {weight.dtype}, "
                         f"scale {tuple(scale.shape)} {scale.dtype}: want weight [N, {K}], scale [N] float32")
    if isinstance(x, FP8Rows):
        if x.q.dtype != torch.float8_e4m3fn or x.scale.dtype != torch.float32 or x.scale.shape != x.q.shape[:-1]:
            raise ValueError(f"fp8_linear: FP8Rows q {tuple(x.q.shape)} {x.q.dtype}, scale {tuple(x.scale.shape)} "
                             f"{x.scale.dtype}: want q [..., K] float8_e4m3fn and scale [...] float32")
        x_q, x_scale = x.q.reshape(-1, K), x.scale.reshape(-1)    # views of the kernel's contiguous outputs
    else:
        x_q, x_scale = quantize_rows(x.reshape(-1, K))     # [M, K] e4m3fn row-major, [M] float32
    # mat2 = weight.t(): [K, N] column-major, as cuBLASLt's fp8 GEMM wants it (no copy);
    # scale_a [M, 1] and scale_b [1, N] select rowwise scaling
    y = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale[:, None], scale_b=scale[None, :], bias=bias,
                         out_dtype=x.dtype)
    if isinstance(y, tuple):   # older torch returned (out, amax)
        y = y[0]
    return y.view(*x.shape[:-1], N)
