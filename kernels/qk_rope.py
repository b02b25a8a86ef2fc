"""q/k RMSNorm (with weight) + rotary embedding in Qwen-Image's interleaved-pair form.

Test:  python -m pytest -q tests/test_kernels.py -k rope          (CPU, Triton interpreter)
       python -m pytest -q -m gpu tests/test_kernels.py -k rope  (GPU)

Pairs (x[2i], x[2i+1]) rotate by angle theta_i: (a, b) -> (a cos - b sin, a sin + b cos).
The kernel reads x (often a strided [B, S, H, D] view of a [B, S, H*D] or fused-QKV Linear output) once and
writes the contiguous [B, S, H, D] layout the attention kernel reads. One program owns BLOCK_T tokens with
all their heads, so cos/sin rows are loaded once per token.
"""
import os

import torch


def rms_norm_rope_ref(x, weight, cos, sin, eps=1e-6):
    """x [B, S, H, D]; weight [D]; cos, sin [S, D/2] float32. Returns [B, S, H, D] in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    a, b = xf.unflatten(-1, (-1, 2)).unbind(-1)  # [B, S, H, D/2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)


try:
    import triton
    import triton.language as tl
except ImportError:  # the reference above still works; ops falls back to it
    triton = None

if triton is not None:
    _INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

    @triton.jit
    def _rms_norm_rope_kernel(X, W, COS, SIN, OUT, S, H, D, eps,
                              stride_xb, stride_xs, stride_xh, stride_cs, stride_ss, stride_ob, stride_os, stride_oh,
                              BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
        # grid (cdiv(S, BLOCK_T), B); per token a contiguous [BLOCK_H heads, 2 * BLOCK_P] tile (16-byte loads),
        # split in registers into the even/odd halves of each pair, rotated, joined back, stored contiguous
        BLOCK_D: tl.constexpr = 2 * BLOCK_P
        b = tl.program_id(1).to(tl.int64)
        heads = tl.arange(0, BLOCK_H)
        cols = tl.arange(0, BLOCK_D)
        pairs = tl.arange(0, BLOCK_P)
        mask = (heads[:, None] < H) & (cols[None, :] < D)  # [BLOCK_H, BLOCK_D]
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
        for t in tl.static_range(BLOCK_T):
            s = tl.program_id(0) * BLOCK_T + t
            if s < S:
                x_ptrs = X + b * stride_xb + s * stride_xs + heads[:, None] * stride_xh + cols[None, :]
                x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.math.rsqrt(tl.sum(x * x, 1) / D + eps)  # [BLOCK_H]
                x = x * rstd[:, None] * w[None, :]
                a, bb = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_P, 2]))  # x[..., 2i], x[..., 2i+1]
                c = tl.load(COS + s * stride_cs + pairs, mask=pairs < D // 2, other=0.0)[None, :]
                sn = tl.load(SIN + s * stride_ss + pairs, mask=pairs < D // 2, other=0.0)[None, :]
                o = tl.reshape(tl.join(a * c - bb * sn, a * sn + bb * c), [BLOCK_H, BLOCK_D])
                o_ptrs = OUT + b * stride_ob + s * stride_os + heads[:, None] * stride_oh + cols[None, :]
                tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=mask)

    def _launch(x, weight, cos, sin, eps, out=None, block_t=None, num_warps=None):
        B, S, H, D = x.shape
        assert D % 2 == 0 and weight.shape == (D,), (x.shape, weight.shape)
        assert cos.shape == (S, D // 2) and sin.shape == (S, D // 2), (cos.shape, sin.shape)
        assert x.stride(3) == 1 and weight.stride(0) == 1 and cos.stride(1) == 1 and sin.stride(1) == 1
        if out is None:
            out = torch.empty((B, S, H, D), dtype=x.dtype, device=x.device)
        assert out.shape == x.shape and out.dtype == x.dtype and out.stride(3) == 1, (out.shape, out.stride())
        BLOCK_H = triton.next_power_of_2(H)
        BLOCK_P = triton.next_power_of_2(D // 2)
        if block_t is None:
            block_t = 2 if _INTERPRET else max(1, min(8, 4096 // (BLOCK_H * 2 * BLOCK_P)))
        if num_warps is None:
            num_warps = 4 if BLOCK_H * BLOCK_P * 2 <= 4096 else 8
        _rms_norm_rope_kernel[(triton.cdiv(S, block_t), B)](
            x, weight, cos, sin, out, S, H, D, eps, x.stride(0), x.stride(1), x.stride(2),
            cos.stride(0), sin.stride(0), out.stride(0), out.stride(1), out.stride(2), BLOCK_T=block_t, BLOCK_H=BLOCK_H, BLOCK_P=BLOCK_P, num_warps=num_warps)
        return out

    def rms_norm_rope(x, weight, cos, sin, eps=1e-6, out=None):
        """x [B, S, H, D] (strided view fine, D unit-stride); weight [D]; cos, sin [S, D/2] float32.
        Returns RMSNorm(x) * weight rotated in interleaved pairs, in x's dtype: a new contiguous
        [B, S, H, D], or written into `out` (any [B, S, H, D] view with unit D stride, e.g. a slice of
        the joint sequence the attention reads)."""
        return _launch(x, weight, cos, sin, eps, out=out)
