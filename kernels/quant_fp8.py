"""Per-token fp8 quantization straight from registers: the inputs of the fp8 GEMMs (kernels/fp8_linear.py).

Test:  TRITON_INTERPRET=1 python -m pytest -q tests/test_fp8_kernels.py   (CPU, Triton interpreter)
       python -m pytest -q -m gpu tests/test_fp8_kernels.py              (GPU, real sizes)
Bench: python -m benchmarks.bench_fp8 --out FILE.json

The rule is kernels/fp8_linear.quantize_rows, applied to the value a model-dtype kernel would have written (so the
row is first rounded to bf16): scale = max(amax(|row|) / 448, float32 tiny), q = clamp(row / scale, ±448) rounded
to e4m3fn. Two details make it bit-identical to quantize_rows on the same device (checked on the H200 at real sizes
for quantize and gelu_quantize; the modulation kernel's e4m3 mode: see kernels/modulation.py):
- row / scale is a correctly rounded division (tl.math.div_rn; Triton's `/` is the approximate div.full.f32 on
  NVIDIA, torch's tensor division is IEEE);
- amax / 448 with a Python-number divisor is, in torch on CUDA, amax · fl32(1/448) (its division kernel multiplies
  by the reciprocal of a CPU scalar), and a true division on the CPU. RECIP follows the input's device.
The same two helpers serve kernels/modulation.py's fp8 output mode (norm_modulate -> e4m3 + scales).

quantize(x): rows of x [..., K] -> FP8Rows. It exists for the attention output that feeds to_out/to_add_out: a
token's scale needs the amax over its whole row, all 24 heads, and each head is computed by a different attention
program (grid over query block x head x batch), so no program holds the row. A scale from inside the attention
kernel would need a cross-program reduction (an atomic amax per token, then a second pass to divide and round, or
all heads of a query block serialised in one program); one pass that reads the bf16 row once is cheaper.

gelu_quantize(y): GELU (tanh form) of the MLP up-projection's output y [M, N] (N = 12288), then the rule. One
program per row, walked twice in chunks of 4096 (amax, then GELU again and quantize; the second read mostly hits
L2): at [8552, 12288] on the H200 that took 416 us, the whole row in registers (BLOCK_K = 16384, one pass) 535 us,
chunks of 2048 540 us, torch F.gelu + quantize_rows 1400 us. On the GPU the GELU is torch's own expression with
libdevice's tanhf (it matched F.gelu bit for bit there); the interpreter has no libdevice, so there it is
x · sigmoid(2u), the same function.

Interpreter limits (TRITON_INTERPRET=1, triton 3.8): float32 -> bf16 rounds toward zero and float32 -> e4m3
misrounds near the top of a binade, so CPU tests use fp16/fp32 inputs and q_dtype=torch.float32 (row / scale
clamped, before the e4m3 rounding). The *_ref functions are the torch references.
"""
import math
import os

import torch
import torch.nn.functional as F

from kernels.fp8_linear import FP8Rows, quantize_rows

E4M3 = torch.float8_e4m3fn
INV_E4M3_MAX = (torch.tensor(1.0) / 448.0).item()   # fl32(1/448): the float32 reciprocal torch's CUDA division uses
GELU_BETA = math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5   # sqrt(2/pi); rounded to float32 in the kernel
GELU_KAPPA = 0.044715


def quantize_ref(x, reciprocal=None):
    """x [..., K] -> FP8Rows(q [..., K] e4m3fn, scale [...] float32, x.dtype): kernels/fp8_linear.quantize_rows per row.
    reciprocal=True: the scale as torch on CUDA computes it (amax · fl32(1/448)), on any device."""
    K = x.shape[-1]
    if reciprocal:
        t = x.reshape(-1, K).float()
        scale = (t.abs().amax(-1) * torch.tensor(INV_E4M3_MAX)).clamp(min=torch.finfo(torch.float32).tiny)
        q = (t / scale[:, None]).clamp(-448.0, 448.0).to(E4M3)
    else:
        q, scale = quantize_rows(x.reshape(-1, K))
    return FP8Rows(q.view(x.shape), scale.view(x.shape[:-1]), x.dtype)


def gelu_ref(y):
    """GELU, tanh form, in y's dtype (computed in float32 by torch)."""
    return F.gelu(y, approximate="tanh")


def gelu_quantize_ref(y, reciprocal=None):
    return quantize_ref(gelu_ref(y), reciprocal)


try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # the references above still work; ops falls back to them
    triton = None

if triton is not None:
    _INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

    @triton.jit
    def row_scale(amax, inv_max, RECIP: tl.constexpr):
        """amax [R] float32 -> the row scales [R], as quantize_rows computes them on the device RECIP names."""
        if RECIP:
            s = amax * inv_max                       # torch on CUDA: amax / 448 as amax · fl32(1/448)
        else:
            s = tl.math.div_rn(amax, 448.0)          # torch on the CPU: a true division
        return tl.maximum(s, 1.1754943508222875e-38)  # float32 tiny: an all-zero row quantizes to zeros

    @triton.jit
    def scaled(v, scale):
        """v / scale correctly rounded, clamped to ±448: the value that rounds to e4m3fn."""
        q = tl.math.div_rn(v, scale)
        return tl.minimum(tl.maximum(q, -448.0), 448.0)

    @triton.jit
    def _row_value(ptrs, mask, beta, kappa, GELU: tl.constexpr, DTYPE: tl.constexpr):
        # the value the model-dtype op writes, read back as float32. GELU 0: x itself; 1: x · sigmoid(2u)
        # (interpreter); 2: 0.5 x (1 + tanh u), torch's expression with libdevice's tanhf. u = beta (x + kappa x³)
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if GELU == 0:
            return x
        inner = beta * (x + kappa * (x * x * x))
        if GELU == 1:
            g = x / (1.0 + tl.exp(-2.0 * inner))
        else:
            g = 0.5 * x * (1.0 + libdevice.tanh(inner))
        return g.to(DTYPE).to(tl.float32)

    @triton.jit
    def _quantize_kernel(X, Q, SCALE, G, S, K, inv_max, beta, kappa,
                         stride_xb, stride_xs, stride_qb, stride_qs, stride_sb,
                         GELU: tl.constexpr, WRITE_G: tl.constexpr, RECIP: tl.constexpr, ONE_PASS: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        # grid (cdiv(S, BLOCK_R), B): rows [BLOCK_R] of x [B, S, K] (unit column stride) -> q [B, S, K] and
        # scale [B, S] (G: the GELU value in x's dtype, same layout as q, for tests). ONE_PASS: BLOCK_K >= K
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < S
        r64 = rows.to(tl.int64)[:, None]
        x_rows = X + b * stride_xb + r64 * stride_xs          # [BLOCK_R, 1] pointers
        q_off = b * stride_qb + r64 * stride_qs
        cols = tl.arange(0, BLOCK_K)
        if ONE_PASS:
            mask = rmask[:, None] & (cols[None, :] < K)
            v = _row_value(x_rows + cols[None, :], mask, beta, kappa, GELU, X.dtype.element_ty)
            scale = row_scale(tl.max(tl.where(mask, tl.abs(v), 0.0), 1), inv_max, RECIP)
            tl.store(Q + q_off + cols[None, :], scaled(v, scale[:, None]).to(Q.dtype.element_ty), mask=mask)
            if WRITE_G:
                tl.store(G + q_off + cols[None, :], v.to(G.dtype.element_ty), mask=mask)
        else:
            amax = tl.zeros([BLOCK_R], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):                   # pass 1: the row's amax
                c = k0 + cols
                mask = rmask[:, None] & (c[None, :] < K)
                v = _row_value(x_rows + c[None, :], mask, beta, kappa, GELU, X.dtype.element_ty)
                amax = tl.maximum(amax, tl.max(tl.where(mask, tl.abs(v), 0.0), 1))
            scale = row_scale(amax, inv_max, RECIP)
            for k0 in range(0, K, BLOCK_K):                   # pass 2: the same values again, quantized
                c = k0 + cols
                mask = rmask[:, None] & (c[None, :] < K)
                v = _row_value(x_rows + c[None, :], mask, beta, kappa, GELU, X.dtype.element_ty)
                tl.store(Q + q_off + c[None, :], scaled(v, scale[:, None]).to(Q.dtype.element_ty), mask=mask)
                if WRITE_G:
                    tl.store(G + q_off + c[None, :], v.to(G.dtype.element_ty), mask=mask)
        tl.store(SCALE + b * stride_sb + rows, scale, mask=rmask)

    def _launch(x, gelu, q_dtype, reciprocal, return_gelu, block_r, block_k, num_warps):
        if x.dim() not in (2, 3) or x.stride(-1) != 1:
            raise ValueError(f"quantize: want x [M, K] or [B, S, K] with unit column stride, got "
                             f"{tuple(x.shape)} strides {x.stride()}")
        x3 = x if x.dim() == 3 else x[None]
        B, S, K = x3.shape
        if block_k is None:   # one pass up to 4096 wide; longer rows twice in 4096 chunks (measured: see above)
            block_k = min(triton.next_power_of_2(K), 4096)
        if _INTERPRET:
            block_k = min(block_k, triton.next_power_of_2(K))
        one_pass = block_k >= K
        if block_r is None:   # ~8K elements per program (a 3072 row: 2 rows); long rows: 1
            block_r = 2 if _INTERPRET else max(1, min(16, 8192 // block_k))
        if num_warps is None:
            num_warps = 16 if block_r * block_k >= 16384 else 8 if block_r * block_k >= 8192 else 4
        q = torch.empty((B, S, K), dtype=q_dtype, device=x.device)
        scale = torch.empty((B, S), dtype=torch.float32, device=x.device)
        g = torch.empty((B, S, K), dtype=x.dtype, device=x.device) if return_gelu else q
        tanh_form = 0 if not gelu else 1 if _INTERPRET else 2
        recip = x.is_cuda if reciprocal is None else bool(reciprocal)
        _quantize_kernel[(triton.cdiv(S, block_r), B)](
            x3, q, scale, g, S, K, INV_E4M3_MAX, GELU_BETA, GELU_KAPPA,
            x3.stride(0), x3.stride(1), q.stride(0), q.stride(1), scale.stride(0),
            GELU=tanh_form, WRITE_G=return_gelu, RECIP=recip, ONE_PASS=one_pass, BLOCK_R=block_r,
            BLOCK_K=block_k, num_warps=num_warps)
        rows = FP8Rows(q.view(x.shape), scale.view(x.shape[:-1]), x.dtype)
        return (rows, g.view(x.shape)) if return_gelu else rows

    def quantize(x, q_dtype=E4M3, reciprocal=None, block_r=None, block_k=None, num_warps=None):
        """x [M, K] or [B, S, K] (rows may be strided, columns contiguous) -> FP8Rows(q contiguous, scale [M] or
        [B, S] float32, x.dtype). q_dtype=torch.float32 stores row / scale before the e4m3 rounding (tests).
        reciprocal: the scale as torch computes it on CUDA (True) or the CPU (False); default: x's device."""
        return _launch(x, False, q_dtype, reciprocal, False, block_r, block_k, num_warps)

    def gelu_quantize(y, q_dtype=E4M3, reciprocal=None, return_gelu=False, block_k=None, num_warps=None):
        """quantize(gelu_tanh(y)), y [M, N] or [B, S, N], the GELU rounded to y's dtype before it is quantized.
        return_gelu: also that rounded GELU ([..., N] in y's dtype), to check the quantization against."""
        return _launch(y, True, q_dtype, reciprocal, return_gelu, None, block_k, num_warps)
