"""LayerNorm (no affine) + adaptive modulation, and the gated residual, for the MMDiT blocks.

Test:  python -m pytest -q tests/test_kernels.py -k modulat          (CPU, Triton interpreter)
       python -m pytest -q -m gpu tests/test_kernels.py -k modulat  (GPU)
Bench: python -m benchmarks.bench_kernels --out FILE.json

Modulation parameters are [B, C] (one set per batch row) or [B, 2, C] with `split`: tokens [0, split) take
set 0 and tokens [split, S) take set 1 (zero_cond_t models: the condition-image tokens use the t=0 set).
The *_ref functions are the float32 torch references. The kernel is memory-bound: each program owns
BLOCK_R whole rows that all use the same parameter set (programs never straddle `split`), so the
parameters are loaded once per program and the rows stream through HBM once.

fp8 output (q_dtype=torch.float8_e4m3fn): instead of the normalised rows, their e4m3 quantization and one float32
scale per token (FP8Rows, the input of an fp8 GEMM), computed from the registers holding the value the plain kernel
would store, rounded to x's dtype first (kernels/quant_fp8.py: the rule; per element one multiply by the row's
correctly rounded 1/scale). The float32-output mode (row · (1/scale) before the e4m3 rounding) equals
quantize_rows' on the bf16 kernel's output bit for bit; the e4m3 compile does not quite: on the H200 (B=2, S=8552,
C=3072) 18-25 of 52.5M values, one e4m3 step each, scales all equal (measured under the earlier rule, which divided
each element) — most likely the LayerNorm sums reduce in another order once Triton lays the registers out for a
1-byte store.
"""
import os

import torch


def _per_token(p, seq_len, split):
    """[B, C] -> [B, 1, C]; [B, 2, C] with split -> [B, S, C] float32."""
    p = p.float()
    if p.dim() == 2:
        return p[:, None, :]
    idx = (torch.arange(seq_len, device=p.device) >= split).long()  # [S]
    return p[:, idx, :]


def norm_modulate_ref(x, shift, scale, split=None, eps=1e-6):
    """x [B, S, C] -> LayerNorm(x) * (1 + scale) + shift, in x's dtype."""
    S = x.shape[1]
    xf = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (xf * (1 + _per_token(scale, S, split)) + _per_token(shift, S, split)).to(x.dtype)


def gated_residual_ref(x, gate, y, split=None):
    """x + gate * y, x and y [B, S, C]."""
    return (x.float() + _per_token(gate, x.shape[1], split) * y.float()).to(x.dtype)


def gated_residual_norm_modulate_ref(x, gate, y, shift, scale, split=None, eps=1e-6):
    """(x + gate * y, norm_modulate(x + gate * y)): the residual and the next sub-block's input."""
    h = gated_residual_ref(x, gate, y, split)
    return h, norm_modulate_ref(h, shift, scale, split, eps)


try:
    import triton
    import triton.language as tl
    from kernels.quant_fp8 import INV_E4M3_MAX, row_reciprocal, row_scale, scaled
    from kernels.fp8_linear import FP8Rows
except ImportError:  # the references above still work; ops falls back to them
    triton = None

if triton is not None:
    _INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

    @triton.jit
    def _modulation_kernel(X, Y, H, OUT, GATE, SHIFT, SCALE, QSCALE, S, C, split, n_blocks0, eps, inv_max,
                           stride_xb, stride_xs, stride_yb, stride_ys, stride_hb, stride_hs, stride_ob, stride_os,
                           stride_gb, stride_gp, stride_fb, stride_fp, stride_cb, stride_cp, stride_qsb,
                           RESIDUAL: tl.constexpr, NORM: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_C: tl.constexpr, FP8: tl.constexpr, RECIP: tl.constexpr):
        # grid (n_blocks0 + n_blocks1, B): blocks [0, n_blocks0) cover rows [0, split) with set 0,
        # the rest rows [split, S) with set 1. RESIDUAL: h = x + gate*y -> H. NORM: LN(h)*(1+scale)+shift -> OUT;
        # with FP8, OUT takes that value quantized per row (OUT's dtype: e4m3, or float32 for tests), QSCALE [B, S]
        # the row scales
        pid = tl.program_id(0)
        b = tl.program_id(1)
        if pid < n_blocks0:
            p_set = 0
            row0 = pid * BLOCK_R
            row_end = split
        else:
            p_set = 1
            row0 = split + (pid - n_blocks0) * BLOCK_R
            row_end = S
        rows = row0 + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < row_end) & (cols[None, :] < C)  # [BLOCK_R, BLOCK_C]
        rows64 = rows.to(tl.int64)[:, None]
        b64 = b.to(tl.int64)
        x = tl.load(X + b64 * stride_xb + rows64 * stride_xs + cols[None, :], mask=mask, other=0.0)
        if RESIDUAL:
            y = tl.load(Y + b64 * stride_yb + rows64 * stride_ys + cols[None, :], mask=mask, other=0.0)
            gate = tl.load(GATE + b * stride_gb + p_set * stride_gp + cols, mask=cols < C, other=0.0)
            x = (x.to(tl.float32) + gate.to(tl.float32)[None, :] * y.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(H + b64 * stride_hb + rows64 * stride_hs + cols[None, :], x, mask=mask)
        if NORM:
            xf = x.to(tl.float32)  # the residual rounded to x's dtype, as the reference normalises it
            mean = tl.sum(xf, 1) / C
            xc = tl.where(mask, xf - mean[:, None], 0.0)
            rstd = tl.math.rsqrt(tl.sum(xc * xc, 1) / C + eps)
            shift = tl.load(SHIFT + b * stride_fb + p_set * stride_fp + cols, mask=cols < C, other=0.0)
            scale = tl.load(SCALE + b * stride_cb + p_set * stride_cp + cols, mask=cols < C, other=0.0)
            out = xc * rstd[:, None] * (1.0 + scale.to(tl.float32))[None, :] + shift.to(tl.float32)[None, :]
            if FP8:  # quantize what the plain kernel would store: out rounded to x's dtype
                v = out.to(X.dtype.element_ty).to(tl.float32)
                q_scale = row_scale(tl.max(tl.where(mask, tl.abs(v), 0.0), 1), inv_max, RECIP)
                out = scaled(v, row_reciprocal(q_scale)[:, None])
                tl.store(QSCALE + b64 * stride_qsb + rows, q_scale, mask=rows < row_end)
            tl.store(OUT + b64 * stride_ob + rows64 * stride_os + cols[None, :], out.to(OUT.dtype.element_ty),
                     mask=mask)

    def _param_strides(p, B, C):
        """[B, C] -> (stride_b, 0); [B, 2, C] -> (stride_b, stride_set). The channel stride must be 1."""
        if p.dim() == 2:
            assert p.shape == (B, C) and p.stride(1) == 1, (p.shape, p.stride())
            return p.stride(0), 0
        assert p.shape == (B, 2, C) and p.stride(2) == 1, (p.shape, p.stride())
        return p.stride(0), p.stride(1)

    def _launch(x, y, gate, shift, scale, split, eps, residual, norm, block_r=None, num_warps=None, q_dtype=None,
                reciprocal=None):
        B, S, C = x.shape
        assert x.stride(2) == 1, "x needs unit channel stride"
        if residual:
            assert y.shape == x.shape and y.dtype == x.dtype and y.stride(2) == 1, (y.shape, y.dtype)
        for p in (gate, shift, scale):
            assert p is None or p.device == x.device, "parameters must sit on x's device"
        split = S if split is None else max(0, min(int(split), S))
        BLOCK_C = triton.next_power_of_2(C)
        if block_r is None:  # ~8K elements per program: enough bytes in flight, few registers
            block_r = 4 if _INTERPRET else max(1, min(16, 8192 // BLOCK_C))
        if num_warps is None:
            num_warps = 8 if block_r * BLOCK_C >= 8192 else 4
        n0, n1 = triton.cdiv(split, block_r), triton.cdiv(S - split, block_r)
        h = torch.empty((B, S, C), dtype=x.dtype, device=x.device) if residual else x
        fp8 = norm and q_dtype is not None
        out = torch.empty((B, S, C), dtype=q_dtype if fp8 else x.dtype, device=x.device) if norm else h
        q_scale = torch.empty((B, S), dtype=torch.float32, device=x.device) if fp8 else out
        g_s = _param_strides(gate, B, C) if residual else (0, 0)
        f_s = _param_strides(shift, B, C) if norm else (0, 0)
        c_s = _param_strides(scale, B, C) if norm else (0, 0)
        y = y if residual else x
        _modulation_kernel[(n0 + n1, B)](
            x, y, h, out, gate if residual else x, shift if norm else x, scale if norm else x, q_scale,
            S, C, split, n0, eps, INV_E4M3_MAX, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            h.stride(0), h.stride(1), out.stride(0), out.stride(1), *g_s, *f_s, *c_s, q_scale.stride(0),
            RESIDUAL=residual, NORM=norm, BLOCK_R=block_r, BLOCK_C=BLOCK_C, num_warps=num_warps, FP8=fp8,
            RECIP=x.is_cuda if reciprocal is None else bool(reciprocal))
        return h, FP8Rows(out, q_scale, x.dtype) if fp8 else out

    def norm_modulate(x, shift, scale, split=None, eps=1e-6, q_dtype=None, reciprocal=None):
        """x [B, S, C] -> LayerNorm(x) * (1 + scale) + shift; shift/scale [B, C] or [B, 2, C] (set 1 from
        token `split` on). Output [B, S, C] contiguous in x's dtype; with q_dtype (torch.float8_e4m3fn, or
        torch.float32 for tests: row · (1/scale) before the rounding) FP8Rows(q [B, S, C], scale [B, S], x.dtype).
        reciprocal: the scale rule of torch on CUDA (True) or the CPU (False); default: x's device."""
        return _launch(x, None, None, shift, scale, split, eps, residual=False, norm=True, q_dtype=q_dtype,
                       reciprocal=reciprocal)[1]

    def gated_residual(x, gate, y, split=None):
        """x + gate * y; x, y [B, S, C], gate [B, C] or [B, 2, C]. Output contiguous in x's dtype."""
        return _launch(x, y, gate, None, None, split, 0.0, residual=True, norm=False)[0]

    def gated_residual_norm_modulate(x, gate, y, shift, scale, split=None, eps=1e-6, q_dtype=None, reciprocal=None):
        """(h, norm_modulate(h)) with h = x + gate * y, in one pass over the residual stream; q_dtype and
        reciprocal as in norm_modulate (h stays in x's dtype)."""
        return _launch(x, y, gate, shift, scale, split, eps, residual=True, norm=True, q_dtype=q_dtype,
                       reciprocal=reciprocal)
