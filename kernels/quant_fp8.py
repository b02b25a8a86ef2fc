"""Per-token fp8 quantization straight from registers: the inputs of the fp8 GEMMs (kernels/fp8_linear.py).

Test:  TRITON_INTERPRET=1 python -m pytest -q tests/test_fp8_kernels.py   (CPU, Triton interpreter)
       python -m pytest -q -m gpu tests/test_fp8_kernels.py              (GPU, real sizes)
Bench: python -m benchmarks.bench_fp8 --out FILE.json

The rule is kernels/fp8_linear.quantize_rows, applied to the value a model-dtype kernel would have written (so the
row is first rounded to bf16): scale = max(amax(|row|) / 448, float32 tiny), r = 1 / scale correctly rounded (once
per row), q = clamp(row · r, ±448) rounded to e4m3fn. Per element that is one float32 multiply, the same on every
device; two per-row details make the kernels bit-identical to quantize_rows on the same device:
- r is tl.math.div_rn(1, scale) (Triton's `/` is the approximate div.full.f32 on NVIDIA; torch.reciprocal is IEEE on
  the CPU and on CUDA);
- amax / 448 with a Python-number divisor is, in torch on CUDA, amax · fl32(1/448) (its division kernel multiplies
  by the reciprocal of a CPU scalar), and a true division on the CPU. RECIP follows the input's device.
The same two helpers serve kernels/modulation.py's fp8 output mode (norm_modulate -> e4m3 + scales). The earlier
rule divided every element (div_rn: an IEEE division, several instructions and a slow path); that made these kernels
compute-bound (quantize at [8552, 3072] bf16: 87 us, 22% of the copy speed) and the modulation kernels' fp8 output
slower than their bf16 output.

quantize(x): rows of x [..., K] -> FP8Rows. It exists for the attention output that feeds to_out/to_add_out: a
token's scale needs the amax over its whole row, all 24 heads, and each head is computed by a different attention
program (grid over query block x head x batch), so no program holds the row. A scale from inside the attention
kernel would need a cross-program reduction (an atomic amax per token, then a second pass to scale and round, or
all heads of a query block serialised in one program); one pass that reads the bf16 row once is cheaper.

gelu_quantize(y): GELU of the MLP up-projection's output y [M, N] (N = 12288), rounded to y's dtype, then the rule.
The GELU is the tanh approximation written as x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x³): the same
function as torch's 0.5 x (1 + tanh u), one exp and one division, without tanh's cancellation for x << 0. It is not
F.gelu(approximate="tanh") bit for bit: their float32 roundings differ, and after rounding to bf16 they agree to
one bf16 step, except where F.gelu's own 1 + tanh u cancels (x < -3: an error of ~2^-24 |x|). cuBLASLt's GELU
epilogue on the bf16 path is not F.gelu bit for bit either. BLOCK_R rows per program (2 at N = 12288), walked in
chunks of 4096:
- pass 1 finds amax |gelu(x)| from x alone, for 16-bit inputs: gelu is increasing for x >= 0 and |gelu(x)| <=
  0.17004 for x <= 0, so where gelu(max x) >= GELU_NEG_MAX that is the amax. It is that element's own value (the
  same helper on the same float32 input) and no other element's exceeds it: adjacent 16-bit inputs x > 0 differ by
  >= 2^-11 relative and so do their GELUs, far beyond the float32 error of either (~2^-20), so the float32 GELU and
  its rounding keep the order. A row whose max x is below ~0.27 (never in a real MLP hidden) repeats pass 1 with
  the GELU (the whole program's rows: the branch is per program). float32 inputs always take that path.
- pass 2 computes the GELU, rounds it, quantizes and stores it: one GELU per element, not two.
The earlier kernel evaluated libdevice's tanhf twice per element and divided each: 416 us at [8552, 12288] on the
H200 (19% of the copy speed); the whole row in registers (BLOCK_K = 16384, one pass) 535 us, chunks of 2048
540 us, torch F.gelu + quantize_rows 1400 us. This kernel, same GPU and shape (2026-12-02): 140 us at 8 warps,
125 us at 16 (the default now), 2.5 TB/s; quantize [8552, 3072] 88 us at the old 2 rows per program, 52 us at 8
rows (the default now); the modulation kernels' fp8 output 87 / 99 us against 92 / 121 us with the divisions.
In the 60-block forward at 1024² (B=1) the kernels outside GEMMs, attention and our norm/RoPE kernels (these
quantizing ones, plus ~2 ms that bf16 has too) went from 32.8 to 12.4 ms (run before these two defaults
changed; the forward has not run with them).

Interpreter limits (TRITON_INTERPRET=1, triton 3.8): float32 -> bf16 rounds toward zero and float32 -> e4m3
misrounds near the top of a binade, so CPU tests use fp16/fp32 inputs and q_dtype=torch.float32 (row · r clamped,
before the e4m3 rounding). The *_ref functions are the torch references.
"""
import math
import os

import torch

from kernels.fp8_linear import FP8Rows, quantize_rows

E4M3 = torch.float8_e4m3fn
INV_E4M3_MAX = (torch.tensor(1.0) / 448.0).item()   # fl32(1/448): the float32 reciprocal torch's CUDA division uses
GELU_BETA = math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5   # sqrt(2/pi); rounded to float32 in the kernel
GELU_KAPPA = 0.044715
# above max |gelu(x)| over x <= 0 (0.170041 at x = -0.7525; rounded to bf16 0.169922, to fp16 0.170044): a row
# whose gelu(max x) reaches it has that as its amax (see gelu_quantize above)
GELU_NEG_MAX = 0.171


def quantize_ref(x, reciprocal=None):
    """x [..., K] -> FP8Rows(q [..., K] e4m3fn, scale [...] float32, x.dtype): kernels/fp8_linear.quantize_rows per row.
    reciprocal=True: the scale as torch on CUDA computes it (amax · fl32(1/448)), on any device."""
    K = x.shape[-1]
    if reciprocal:
        t = x.reshape(-1, K).float()
        scale = (t.abs().amax(-1) * torch.tensor(INV_E4M3_MAX)).clamp(min=torch.finfo(torch.float32).tiny)
        q = (t * scale.reciprocal()[:, None]).clamp(-448.0, 448.0).to(E4M3)
    else:
        q, scale = quantize_rows(x.reshape(-1, K))
    return FP8Rows(q.view(x.shape), scale.view(x.shape[:-1]), x.dtype)


def gelu_ref(y):
    """The kernel's GELU: x / (1 + exp(-2u)), u = beta (x + kappa x³), in float32, rounded to y's dtype.
    F.gelu(y, approximate="tanh") is the same function, 0.5 x (1 + tanh u) = x · sigmoid(2u), rounded otherwise:
    they agree to one step of y's dtype, apart from F.gelu's cancellation in 1 + tanh u for x << 0 (~2^-24 |x|).
    On the GPU the kernel's exp and division are the approximate ones (a few float32 ulps): equal to this after the
    rounding to bf16 nearly everywhere, not bit for bit; tests check the rule on the kernel's own GELU."""
    x = y.float()
    u = GELU_BETA * (x + GELU_KAPPA * (x * x * x))
    return (x / (1.0 + torch.exp(-2.0 * u))).to(y.dtype)


def gelu_quantize_ref(y, reciprocal=None):
    """quantize_ref(gelu_ref(y)): what gelu_quantize computes."""
    return quantize_ref(gelu_ref(y), reciprocal)


try:
    import triton
    import triton.language as tl
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
    def row_reciprocal(scale):
        """1 / scale correctly rounded (torch.reciprocal), once per row: the per-element factor."""
        return tl.math.div_rn(1.0, scale)

    @triton.jit
    def scaled(v, r):
        """v · r clamped to ±448 (r = row_reciprocal(scale)): the value that rounds to e4m3fn."""
        return tl.minimum(tl.maximum(v * r, -448.0), 448.0)

    @triton.jit
    def _gelu(x, neg2beta, kappa, DTYPE: tl.constexpr):
        # x / (1 + exp(-2u)), u = beta (x + kappa x³), float32 [any shape] -> rounded to DTYPE, back in float32.
        # neg2beta = fl32(-2 beta) = -2 fl32(beta): the same bits as -2 · (beta · w)
        e = tl.exp(neg2beta * (x + kappa * (x * x * x)))
        return (x / (1.0 + e)).to(DTYPE).to(tl.float32)

    @triton.jit
    def _value(ptrs, mask, neg2beta, kappa, GELU: tl.constexpr, DTYPE: tl.constexpr):
        # the value the model-dtype op writes (x itself, or its GELU rounded to x's dtype), as float32
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            x = _gelu(x, neg2beta, kappa, DTYPE)
        return x

    @triton.jit
    def _row_amax(x_rows, rmask, K, neg2beta, kappa, GELU: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_K: tl.constexpr):
        # max |value| of each row [BLOCK_R], walked in chunks of BLOCK_K
        cols = tl.arange(0, BLOCK_K)
        amax = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            c = k0 + cols
            mask = rmask[:, None] & (c[None, :] < K)
            v = _value(x_rows + c[None, :], mask, neg2beta, kappa, GELU, x_rows.dtype.element_ty)
            amax = tl.maximum(amax, tl.max(tl.where(mask, tl.abs(v), 0.0), 1))
        return amax

    @triton.jit
    def _quantize_kernel(X, Q, SCALE, G, S, K, inv_max, neg2beta, kappa, neg_max,
                         stride_xb, stride_xs, stride_qb, stride_qs, stride_sb,
                         GELU: tl.constexpr, WRITE_G: tl.constexpr, RECIP: tl.constexpr, ONE_PASS: tl.constexpr,
                         MAX_X: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        # grid (cdiv(S, BLOCK_R), B): rows [BLOCK_R] of x [B, S, K] (unit column stride) -> q [B, S, K] and
        # scale [B, S] (G: the GELU value in x's dtype, same layout as q, for tests). ONE_PASS: BLOCK_K >= K.
        # MAX_X (GELU, two passes): pass 1 reads x only, amax = gelu(max x) where that is >= neg_max
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
            v = _value(x_rows + cols[None, :], mask, neg2beta, kappa, GELU, X.dtype.element_ty)
            scale = row_scale(tl.max(tl.where(mask, tl.abs(v), 0.0), 1), inv_max, RECIP)
            r = row_reciprocal(scale)
            tl.store(Q + q_off + cols[None, :], scaled(v, r[:, None]).to(Q.dtype.element_ty), mask=mask)
            if WRITE_G:
                tl.store(G + q_off + cols[None, :], v.to(G.dtype.element_ty), mask=mask)
        else:
            if MAX_X:                                         # pass 1: the row's max x ...
                x_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    c = k0 + cols
                    mask = rmask[:, None] & (c[None, :] < K)
                    x = tl.load(x_rows + c[None, :], mask=mask, other=float("-inf")).to(tl.float32)
                    x_max = tl.maximum(x_max, tl.max(x, 1))
                amax = _gelu(tl.where(rmask, x_max, 0.0), neg2beta, kappa, X.dtype.element_ty)
                # ... unless a row's gelu(max x) is below neg_max (or NaN): then the GELU's own amax, all rows
                if tl.max(tl.where(rmask, tl.where(amax >= neg_max, 0, 1), 0), 0) > 0:
                    amax = _row_amax(x_rows, rmask, K, neg2beta, kappa, GELU, BLOCK_R, BLOCK_K)
            else:                                             # pass 1: the row's amax
                amax = _row_amax(x_rows, rmask, K, neg2beta, kappa, GELU, BLOCK_R, BLOCK_K)
            scale = row_scale(amax, inv_max, RECIP)
            r = row_reciprocal(scale)
            for k0 in range(0, K, BLOCK_K):                   # pass 2: the values, quantized
                c = k0 + cols
                mask = rmask[:, None] & (c[None, :] < K)
                v = _value(x_rows + c[None, :], mask, neg2beta, kappa, GELU, X.dtype.element_ty)
                tl.store(Q + q_off + c[None, :], scaled(v, r[:, None]).to(Q.dtype.element_ty), mask=mask)
                if WRITE_G:
                    tl.store(G + q_off + c[None, :], v.to(G.dtype.element_ty), mask=mask)
        tl.store(SCALE + b * stride_sb + rows, scale, mask=rmask)

    def _launch(x, gelu, q_dtype, reciprocal, return_gelu, block_r, block_k, num_warps, max_x=None):
        if x.dim() not in (2, 3) or x.stride(-1) != 1:
            raise ValueError(f"quantize: want x [M, K] or [B, S, K] with unit column stride, got "
                             f"{tuple(x.shape)} strides {x.stride()}")
        x3 = x if x.dim() == 3 else x[None]
        B, S, K = x3.shape
        if block_k is None:   # one pass up to 4096 wide; longer rows twice in 4096 chunks (measured: above)
            block_k = min(triton.next_power_of_2(K), 4096)
        if _INTERPRET:
            block_k = min(block_k, triton.next_power_of_2(K))
        one_pass = block_k >= K
        # swept on the H200 (2026-12-02, benchmarks/results/fp8_kernels_quant_h200.json): quantize [8552, 3072]
        # fastest at 8 rows x 4096 and 8 warps (52 us; 2 rows: 78-88 us); gelu_quantize [8552, 12288] at
        # 2 rows x 4096 and 16 warps (125 us; 8 warps 139 us). The launch parameters change no bits.
        if block_r is None:   # plain: ~32K elements per program (a 3072 row: 8 rows); GELU: ~8K
            block_r = 2 if _INTERPRET else max(1, min(16, (8192 if gelu else 32768) // block_k))
        if num_warps is None:
            num_warps = 16 if gelu and block_r * block_k >= 8192 else 8 if block_r * block_k >= 8192 else 4
        if max_x is None:     # the max-x pass 1 holds for 16-bit inputs only (see gelu_quantize above)
            max_x = x.element_size() == 2
        q = torch.empty((B, S, K), dtype=q_dtype, device=x.device)
        scale = torch.empty((B, S), dtype=torch.float32, device=x.device)
        g = torch.empty((B, S, K), dtype=x.dtype, device=x.device) if return_gelu else q
        recip = x.is_cuda if reciprocal is None else bool(reciprocal)
        _quantize_kernel[(triton.cdiv(S, block_r), B)](
            x3, q, scale, g, S, K, INV_E4M3_MAX, -2.0 * GELU_BETA, GELU_KAPPA, GELU_NEG_MAX,
            x3.stride(0), x3.stride(1), q.stride(0), q.stride(1), scale.stride(0),
            GELU=gelu, WRITE_G=return_gelu, RECIP=recip, ONE_PASS=one_pass, MAX_X=gelu and bool(max_x),
            BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps)
        rows = FP8Rows(q.view(x.shape), scale.view(x.shape[:-1]), x.dtype)
        return (rows, g.view(x.shape)) if return_gelu else rows

    def quantize(x, q_dtype=E4M3, reciprocal=None, block_r=None, block_k=None, num_warps=None):
        """x [M, K] or [B, S, K] (rows may be strided, columns contiguous) -> FP8Rows(q contiguous, scale [M] or
        [B, S] float32, x.dtype). q_dtype=torch.float32 stores row · r before the e4m3 rounding (tests).
        reciprocal: the scale as torch computes it on CUDA (True) or the CPU (False); default: x's device."""
        return _launch(x, False, q_dtype, reciprocal, False, block_r, block_k, num_warps)

    def gelu_quantize(y, q_dtype=E4M3, reciprocal=None, return_gelu=False, block_k=None, num_warps=None,
                      block_r=None, max_x=None):
        """quantize(gelu_ref(y)), y [M, N] or [B, S, N], the GELU rounded to y's dtype before it is quantized.
        return_gelu: also that rounded GELU ([..., N] in y's dtype), to check the quantization against.
        max_x: pass 1 from max x alone (default: for 16-bit y; False: the GELU in both passes)."""
        return _launch(y, True, q_dtype, reciprocal, return_gelu, block_r, block_k, num_warps, max_x)
