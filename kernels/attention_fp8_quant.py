"""The quantize step of the fp8 attention (kernels/attention_fp8.py): Q, K (and V) [B, S, H, D] -> 8-bit codes with
scales, in three memory-bound kernels per (b, h), beside quantize_ref, their float32 torch twin.

Test:  python -m pytest -q tests/test_attention_fp8.py -k quantize   (CPU, Triton interpreter)

  Q  codes in blocks of QBLOCK = 128 tokens, scale = amax / 448; the stored scale carries softmax scale · log2 e.
  K  minus its mean over the valid keys, then codes in blocks of 128 keys. q·(k - μ) = q·k - q·μ shifts every
     score of a query row by the same constant, which softmax ignores: exact in math, and the codes then spend
     their range on what differs between keys (SageAttention's smoothing). Keys >= kv_len are stored as 0.
  V  pv="fp8": e4m3 with one scale per channel (amax over the valid keys / 448), stored transposed
     [B, H, D, S_pad]: the P·V dot reduces over keys, and Hopper's 8-bit wgmma reads its B operand only K-major,
     i.e. a [D, keys] tile with keys contiguous, loaded as such and handed over as tl.trans(tile).
     pv="bf16": not quantized. The attention reads the caller's V in place (a bf16 copy only for other dtypes):
     16-bit wgmma takes its B operand MN-major too, so V's own [keys, D] rows (D contiguous) feed the dot as
     they are, the way the bf16 kernel (kernels/attention.py) reads them; a transposed copy would buy nothing
     and cost a pass over V.
  Every code buffer is [B, H, S_pad, ...] with S_pad a multiple of 128, zero-filled: the attention loads need no
masks. qk="int8" makes the Q/K codes int8 (scale amax / 127, round half away from zero) instead of e4m3.
Under the interpreter (triton 3.8 at least) the fp32 -> e4m3 cast takes the wrong binade when it rounds up to a
power of two (1.99 -> 1.0), and fp32 -> bf16 truncates; EXACT_ROUND rounds to the grid in fp32 first
(_round_e4m3, _round_bf16), so the cast is exact. The GPU's cvt.rn instructions do that rounding themselves.
"""
import math
import os
from typing import NamedTuple, Optional

import torch

QBLOCK = 128           # tokens per Q/K scale; the attention kernel's BLOCK_M and BLOCK_N divide it
E4M3_MAX = 448.0
INT8_MAX = 127.0
AMAX_FLOOR = 2.0 ** -40  # an all-zero block's amax: keeps q_scale · k_scale a normal float32 (never 0)
SPLIT = 16             # K/V statistics: programs per (b, h), each summing its share of the keys
_LOG2E = 1.4426950408889634


class Quantized(NamedTuple):
    q8: torch.Tensor   # [B, H, SQ_pad, D] e4m3fn (int8 with qk="int8"), rows >= Sq zero
    qs: torch.Tensor   # [B, H, SQ_pad / 128] float32: amax / 448 · softmax scale · log2 e
    k8: torch.Tensor   # [B, H, SK_pad, D] codes of k - mean, rows >= kv_len zero
    ks: torch.Tensor   # [B, H, SK_pad / 128] float32
    vt: Optional[torch.Tensor]  # pv="fp8": [B, H, D, SK_pad] e4m3fn, columns >= kv_len zero; else None
    vs: Optional[torch.Tensor]  # pv="fp8": [B, H, D] float32 per channel; else None
    sq: int
    sk: int
    v: Optional[torch.Tensor] = None  # pv="bf16": the caller's V [B, Sk, H, D] in bf16 (keys >= kv_len as given)


def _pad(n):
    return -(-n // QBLOCK) * QBLOCK


def _valid_keys(kv_len, B, Sk, device):
    """[B, Sk] bool: key j of row b counts (j < kv_len[b])."""
    n = torch.full((B,), Sk, device=device) if kv_len is None else kv_len.to(device).clamp(max=Sk)
    return torch.arange(Sk, device=device)[None, :] < n[:, None]


def _codes_ref(x, s, int8):
    """x float32 / s (broadcast) -> int8 (round half away from zero) or e4m3fn (nearest, ties to even) codes."""
    y = x / s
    if int8:
        return torch.floor(y + 0.5).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _blocks_ref(x, qmax, int8):
    """x float32 [B, H, S_pad, D] -> (codes, scale [B, H, S_pad / 128]) with one scale per 128 tokens."""
    B, H, Sp, D = x.shape
    xb = x.view(B, H, Sp // QBLOCK, QBLOCK, D)
    inv = torch.tensor(1.0 / qmax, dtype=torch.float32)  # float32 constant, as the kernel multiplies
    s = xb.abs().amax((-1, -2)).clamp(min=AMAX_FLOOR) * inv
    return _codes_ref(xb, s[..., None, None], int8).view(B, H, Sp, D), s


def _check_args(q, k, v, qk, pv):
    B, Sq, H, D = q.shape
    assert k.shape == v.shape == (B, k.shape[1], H, D), (q.shape, k.shape, v.shape)
    assert qk in ("fp8", "int8") and pv in ("fp8", "bf16"), (qk, pv)


def quantize_ref(q, k, v, kv_len=None, scale=None, qk="fp8", pv="fp8"):
    """The torch (float32) twin of quantize(): q, k, v [B, S, H, D] -> Quantized."""
    _check_args(q, k, v, qk, pv)
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    int8 = qk == "int8"
    valid = _valid_keys(kv_len, B, Sk, q.device)[:, None, :, None]        # [B, 1, Sk, 1]
    pad = lambda t, S: torch.nn.functional.pad(t, (0, 0, 0, _pad(S) - S))  # noqa: E731  zero rows at the end
    qh = q.float().transpose(1, 2)                                         # [B, H, Sq, D]
    kh = torch.where(valid, k.float().transpose(1, 2), 0.0)
    mean = kh.sum(2, keepdim=True) / valid.sum(2, keepdim=True).clamp(min=1)
    kh = torch.where(valid, kh - mean, 0.0)
    q8, qs = _blocks_ref(pad(qh, Sq), INT8_MAX if int8 else E4M3_MAX, int8)
    qs = qs * torch.tensor(scale * _LOG2E, dtype=torch.float32)
    k8, ks = _blocks_ref(pad(kh, Sk), INT8_MAX if int8 else E4M3_MAX, int8)
    if pv == "bf16":
        return Quantized(q8, qs, k8, ks, None, None, Sq, Sk, v.to(torch.bfloat16))
    vh = torch.where(valid, v.float().transpose(1, 2), 0.0)
    vs = vh.abs().amax(2).clamp(min=AMAX_FLOOR) * torch.tensor(1.0 / E4M3_MAX, dtype=torch.float32)  # [B, H, D]
    vt = _codes_ref(pad(vh, Sk), vs[:, :, None, :], False).transpose(2, 3).contiguous()
    return Quantized(q8, qs, k8, ks, vt, vs, Sq, Sk)


try:
    import triton
    import triton.language as tl
except ImportError:  # the reference above still works; ops falls back to it
    triton = None

if triton is not None:
    _INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
    _E4M3 = tl.constexpr(E4M3_MAX)
    _FLOOR = tl.constexpr(AMAX_FLOOR)
    _INV_E4M3 = tl.constexpr(1.0 / E4M3_MAX)
    _QBLOCK = tl.constexpr(QBLOCK)

    @triton.jit
    def _round_e4m3(x):
        """x float32 -> the nearest e4m3fn value (ties to even, saturated at ±448), still float32."""
        bits = x.to(tl.int32, bitcast=True)
        e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)          # binade; subnormals share 2^-6's step
        step = ((e + 124) << 23).to(tl.float32, bitcast=True)    # 2^(e - 3): 3 mantissa bits
        y = x / step                                             # exact (a power of two)
        r = tl.floor(y + 0.5)
        r = tl.where((r - y == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)
        return tl.minimum(tl.maximum(r * step, -_E4M3), _E4M3)

    @triton.jit
    def _round_bf16(x):
        """x float32, finite and >= 0 (P) -> the nearest bfloat16 value (ties to even), still float32: add half
        of the 16 dropped bits' unit (less one, plus the kept lsb for the tie), then clear them."""
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return ((bits >> 16) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _codes(x, s, INT8: tl.constexpr, EXACT_ROUND: tl.constexpr):
        """x / s as int8 (round half away from zero) or e4m3fn (nearest even, saturated) codes."""
        y = tl.math.div_rn(x, s)                                 # IEEE division: the reference's bits
        if INT8:
            c = tl.minimum(tl.maximum(tl.floor(y + 0.5), -127.0), 127.0).to(tl.int8)
        else:
            y = tl.minimum(tl.maximum(y, -_E4M3), _E4M3)
            if EXACT_ROUND:
                y = _round_e4m3(y)
            c = y.to(tl.float8e4nv)
        return c

    @triton.jit
    def _kv_end(KV_LEN, b, SK, HAS_KV_LEN: tl.constexpr):
        kv_end = SK
        if HAS_KV_LEN:
            kv_end = tl.minimum(tl.load(KV_LEN + b), SK)
        return kv_end

    @triton.jit
    def _quant_q_kernel(Q, Q8, QS, stride_qb, stride_qs, stride_qh, H, SQ, SQP, out_scale, inv_qmax,
                        HEAD_D: tl.constexpr, INT8: tl.constexpr, EXACT_ROUND: tl.constexpr):
        # grid (SQ_pad / 128, B * H): one block of 128 queries of one (b, h) -> codes + one scale
        blk, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        rows = blk * _QBLOCK + tl.arange(0, _QBLOCK)
        d = tl.arange(0, HEAD_D)
        x = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + rows[:, None] * stride_qs + d[None, :],
                    mask=rows[:, None] < SQ, other=0.0).to(tl.float32)
        s = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), _FLOOR) * inv_qmax
        tl.store(Q8 + bh.to(tl.int64) * SQP * HEAD_D + rows[:, None] * HEAD_D + d[None, :],
                 _codes(x, s, INT8, EXACT_ROUND))
        tl.store(QS + bh * (SQP // _QBLOCK) + blk, s * out_scale)

    @triton.jit
    def _kv_stats_kernel(K, V, KV_LEN, KSUM, VMAX, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                         H, SK, ROWS, HEAD_D: tl.constexpr, HAS_KV_LEN: tl.constexpr, QUANT_V: tl.constexpr,
                         SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        # grid (SPLIT, B * H): Σ k (and max |v|) per channel over keys [split·ROWS, +ROWS) ∩ [0, kv_len)
        split, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        lo = split * ROWS
        hi = tl.minimum(lo + ROWS, _kv_end(KV_LEN, b, SK, HAS_KV_LEN))
        d = tl.arange(0, HEAD_D)
        k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh + d[None, :]
        v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh + d[None, :]
        ksum = tl.zeros([HEAD_D], tl.float32)
        vmax = tl.zeros([HEAD_D], tl.float32)
        for t0 in range(lo, hi, BLOCK):
            rows = t0 + tl.arange(0, BLOCK)
            keep = rows[:, None] < hi                            # padding keys (maybe NaN) never loaded
            ksum += tl.sum(tl.load(k_base + rows[:, None] * stride_ks, mask=keep, other=0.0).to(tl.float32), 0)
            if QUANT_V:
                v = tl.load(v_base + rows[:, None] * stride_vs, mask=keep, other=0.0).to(tl.float32)
                vmax = tl.maximum(vmax, tl.max(tl.abs(v), 0))
        out = (bh * SPLIT + split) * HEAD_D + d
        tl.store(KSUM + out, ksum)
        if QUANT_V:
            tl.store(VMAX + out, vmax)

    @triton.jit
    def _quant_kv_kernel(K, V, KV_LEN, KSUM, VMAX, K8, KS, VT, VS, stride_kb, stride_ks, stride_kh,
                         stride_vb, stride_vs, stride_vh, H, SK, SKP, inv_qmax,
                         HEAD_D: tl.constexpr, HAS_KV_LEN: tl.constexpr, INT8: tl.constexpr, QUANT_V: tl.constexpr,
                         EXACT_ROUND: tl.constexpr, SPLIT: tl.constexpr):
        # grid (SK_pad / 128, B * H): one block of 128 keys: K - mean -> codes + scale; V -> e4m3, transposed
        blk, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        kv_end = _kv_end(KV_LEN, b, SK, HAS_KV_LEN)
        d = tl.arange(0, HEAD_D)
        part = (bh * SPLIT + tl.arange(0, SPLIT))[:, None] * HEAD_D + d[None, :]     # [SPLIT, D] partials
        mean = tl.math.div_rn(tl.sum(tl.load(KSUM + part), 0), tl.maximum(kv_end, 1).to(tl.float32))
        rows = blk * _QBLOCK + tl.arange(0, _QBLOCK)
        keep = rows[:, None] < kv_end
        k = tl.load(K + b.to(tl.int64) * stride_kb + h * stride_kh + rows[:, None] * stride_ks + d[None, :],
                    mask=keep, other=0.0).to(tl.float32)
        k = tl.where(keep, k - mean[None, :], 0.0)
        ks = tl.maximum(tl.max(tl.max(tl.abs(k), 1), 0), _FLOOR) * inv_qmax
        bh64 = bh.to(tl.int64)
        tl.store(K8 + bh64 * SKP * HEAD_D + rows[:, None] * HEAD_D + d[None, :], _codes(k, ks, INT8, EXACT_ROUND))
        tl.store(KS + bh * (SKP // _QBLOCK) + blk, ks)
        if QUANT_V:
            vs = tl.maximum(tl.max(tl.load(VMAX + part), 0), _FLOOR) * _INV_E4M3       # [D]
            v = tl.load(V + b.to(tl.int64) * stride_vb + h * stride_vh + rows[:, None] * stride_vs + d[None, :],
                        mask=keep, other=0.0).to(tl.float32)
            # the [128 keys, D] tile lands in VT [D, SK_pad] (keys contiguous); Triton orders the store by keys
            tl.store(VT + bh64 * HEAD_D * SKP + d[None, :] * SKP + rows[:, None],
                     _codes(v, vs[None, :], False, EXACT_ROUND))
            if blk == 0:
                tl.store(VS + bh * HEAD_D + d, vs)

    def quantize(q, k, v, kv_len=None, scale=None, qk="fp8", pv="fp8"):
        """q, k, v [B, S, H, D] (views fine, D unit-stride), kv_len int [B] >= 1 or None -> Quantized
        (see quantize_ref). qk: "fp8" (e4m3) or "int8" codes for Q and K; pv: "fp8" quantizes V (e4m3,
        transposed), "bf16" keeps it (a bf16 copy only when v is another dtype)."""
        _check_args(q, k, v, qk, pv)
        B, Sq, H, D = q.shape
        Sk = k.shape[1]
        assert D in (64, 128), f"head dim {D}: the fp8 kernel takes 64 or 128"
        q, k, v = (t if t.stride(3) == 1 else t.contiguous() for t in (q, k, v))
        int8, quant_v = qk == "int8", pv == "fp8"
        SQP, SKP = _pad(Sq), _pad(Sk)
        new = lambda *shape, dtype=torch.float32: torch.empty(shape, dtype=dtype, device=q.device)  # noqa: E731
        code = torch.int8 if int8 else torch.float8_e4m3fn
        z = Quantized(new(B, H, SQP, D, dtype=code), new(B, H, SQP // QBLOCK), new(B, H, SKP, D, dtype=code),
                      new(B, H, SKP // QBLOCK), None, None, Sq, Sk, None if quant_v else v.to(torch.bfloat16))
        if quant_v:
            z = z._replace(vt=new(B, H, D, SKP, dtype=torch.float8_e4m3fn), vs=new(B, H, D))
        ksum = new(B, H, SPLIT, D)
        vmax = new(B, H, SPLIT, D) if quant_v else ksum                 # placeholders when V stays bf16
        vt, vs = (z.vt, z.vs) if quant_v else (ksum, ksum)
        has = kv_len is not None
        kv = kv_len.to(device=q.device, dtype=torch.int32) if has else ksum   # a placeholder when unused
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        inv_qmax = 1.0 / (INT8_MAX if int8 else E4M3_MAX)
        ks_, vs_ = (k.stride(0), k.stride(1), k.stride(2)), (v.stride(0), v.stride(1), v.stride(2))
        _quant_q_kernel[(SQP // QBLOCK, B * H)](q, z.q8, z.qs, q.stride(0), q.stride(1), q.stride(2), H, Sq, SQP,
                                                 scale * _LOG2E, inv_qmax, HEAD_D=D, INT8=int8,
                                                 EXACT_ROUND=_INTERPRET, num_warps=8)
        rows = -(-(-(-Sk // SPLIT)) // 64) * 64                 # keys per stats program, a multiple of 64
        _kv_stats_kernel[(SPLIT, B * H)](k, v, kv, ksum, vmax, *ks_, *vs_, H, Sk, rows, HEAD_D=D,
                                         HAS_KV_LEN=has, QUANT_V=quant_v, SPLIT=SPLIT, BLOCK=64, num_warps=4)
        _quant_kv_kernel[(SKP // QBLOCK, B * H)](k, v, kv, ksum, vmax, z.k8, z.ks, vt, vs, *ks_, *vs_, H, Sk,
                                                  SKP, inv_qmax, HEAD_D=D, HAS_KV_LEN=has, INT8=int8,
                                                  QUANT_V=quant_v, EXACT_ROUND=_INTERPRET, SPLIT=SPLIT,
                                                  num_warps=8)
        return z
