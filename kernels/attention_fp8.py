"""FP8 attention over [B, S, H, D] with a per-batch valid key length: Q·Kᵀ and P·V as 8-bit tensor-core dots.

Test:  python -m pytest -q tests/test_attention_fp8.py            (CPU, Triton interpreter)
       python -m pytest -q -m gpu tests/test_attention_fp8.py     (GPU, real sizes)
Bench: python -m benchmarks.bench_attention_fp8 --out FILE.json

Two steps. quantize(), per (b, h), three memory-bound kernels:
  Q  codes in blocks of QBLOCK = 128 tokens, scale = amax / 448; the stored scale carries softmax scale · log2 e.
  K  minus its mean over the valid keys, then codes in blocks of 128 keys. q·(k - μ) = q·k - q·μ shifts every
     score of a query row by the same constant, which softmax ignores: exact in math, and the codes then spend
     their range on what differs between keys (SageAttention's smoothing). Keys >= kv_len are stored as 0.
  V  e4m3 with one scale per channel (amax over the valid keys / 448), stored transposed [B, H, D, S_pad]:
     the P·V dot reduces over keys, and Hopper's 8-bit wgmma reads its B operand only K-major, i.e. a [D, keys]
     tile with keys contiguous, loaded as such and handed over as tl.trans(tile).
  Every buffer is [B, H, S_pad, ...] with S_pad a multiple of 128, zero-filled: the attention loads need no masks.
attend(), FA2 with the online softmax in fp32: s = (q8·k8ᵀ)·(q_scale·k_scale) in log2 units,
  p = 2^(s - m + log2 448·(1-ε)) lies in [0, 447.9], e4m3's range (p in [0, 1] would lose everything below 2^-9
  to zero and everything below 2^-6 to subnormals); acc += e4m3(p)·v8; l += Σp. The 448 cancels in acc / l and V's
  per-channel scale is applied once at the end. Keys >= kv_len[b] are masked; blocks past them never visited.

qk="int8" makes the Q/K codes int8 (scale amax / 127, round half away from zero, int32 accumulator) instead of
e4m3: the same tensor-core rate, and e4m3's 3 mantissa bits cost ~3x int8's error on Gaussian-like Q/K (float
scaling cannot help a float format on such data: its error is relative, not range). P and V stay e4m3 either way.
Under the interpreter (triton 3.8 at least) the fp32 -> e4m3 cast takes the wrong binade when it rounds up to a
power of two (1.99 -> 1.0); EXACT_ROUND rounds to the e4m3 grid in fp32 first, so that cast is exact. The GPU's
cvt.rn.satfinite does the same rounding itself.
"""
import math
import os
from typing import NamedTuple

import torch

from kernels.attention import attention_ref

QBLOCK = 128           # tokens per Q/K scale; the kernel's BLOCK_M and BLOCK_N divide it
E4M3_MAX = 448.0
INT8_MAX = 127.0
AMAX_FLOOR = 2.0 ** -40  # an all-zero block's amax: keeps q_scale · k_scale a normal float32 (never 0)
P_LOG2_MAX = 8.807     # < log2(448) = 8.80735: p's largest value 447.9 rounds to 448, never past it
SPLIT = 16             # K/V statistics: programs per (b, h), each summing its share of the keys
_LOG2E = 1.4426950408889634


class Quantized(NamedTuple):
    q8: torch.Tensor   # [B, H, SQ_pad, D] e4m3fn (int8 with qk="int8"), rows >= Sq zero
    qs: torch.Tensor   # [B, H, SQ_pad / 128] float32: amax / 448 · softmax scale · log2 e
    k8: torch.Tensor   # [B, H, SK_pad, D] codes of k - mean, rows >= kv_len zero
    ks: torch.Tensor   # [B, H, SK_pad / 128] float32
    vt: torch.Tensor   # [B, H, D, SK_pad] e4m3fn, columns >= kv_len zero
    vs: torch.Tensor   # [B, H, D] float32 per channel
    sq: int
    sk: int


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


def quantize_ref(q, k, v, kv_len=None, scale=None, qk="fp8"):
    """The torch (float32) twin of quantize(): q, k, v [B, S, H, D] -> Quantized."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    int8 = qk == "int8"
    valid = _valid_keys(kv_len, B, Sk, q.device)[:, None, :, None]        # [B, 1, Sk, 1]
    pad = lambda t, S: torch.nn.functional.pad(t, (0, 0, 0, _pad(S) - S))  # noqa: E731  zero rows at the end
    qh = q.float().transpose(1, 2)                                         # [B, H, Sq, D]
    kh = torch.where(valid, k.float().transpose(1, 2), 0.0)
    vh = torch.where(valid, v.float().transpose(1, 2), 0.0)
    mean = kh.sum(2, keepdim=True) / valid.sum(2, keepdim=True).clamp(min=1)
    kh = torch.where(valid, kh - mean, 0.0)
    q8, qs = _blocks_ref(pad(qh, Sq), INT8_MAX if int8 else E4M3_MAX, int8)
    qs = qs * torch.tensor(scale * _LOG2E, dtype=torch.float32)
    k8, ks = _blocks_ref(pad(kh, Sk), INT8_MAX if int8 else E4M3_MAX, int8)
    vs = vh.abs().amax(2).clamp(min=AMAX_FLOOR) * torch.tensor(1.0 / E4M3_MAX, dtype=torch.float32)  # [B, H, D]
    vt = _codes_ref(pad(vh, Sk), vs[:, :, None, :], False).transpose(2, 3).contiguous()
    return Quantized(q8, qs, k8, ks, vt, vs, Sq, Sk)


def attention_fp8_ref(q, k, v, kv_len=None, scale=None, qk="fp8", block_n=QBLOCK):
    """The kernel's math in float32, step by step: quantize_ref, then the online softmax over key blocks of
    block_n (the kernel's BLOCK_N: P is rounded to e4m3 against the running row max, so the block size
    matters), s = (q8·k8ᵀ)·(q_scale·k_scale) in log2 units, p = 2^(s - m + 8.807), acc += e4m3(p)·v8,
    l += Σp; out = acc / l · v_scale. Returns [B, Sq, H, D] in q's dtype."""
    z = quantize_ref(q, k, v, kv_len, scale, qk)
    B, Sq, H, D = q.shape
    assert QBLOCK % block_n == 0, block_n
    q8, k8 = z.q8[:, :, :Sq].float(), z.k8.float()
    qs = z.qs.repeat_interleave(QBLOCK, dim=-1)[:, :, :Sq, None]   # [B, H, Sq, 1]
    keep = torch.zeros(B, k8.shape[2], dtype=torch.bool, device=q.device)
    keep[:, :z.sk] = _valid_keys(kv_len, B, z.sk, q.device)
    m = torch.full((B, H, Sq, 1), float("-inf"), device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(B, H, Sq, D, device=q.device)
    for n0 in range(0, int(keep.sum(1).max()), block_n):
        n1 = n0 + block_n
        qk = (q8 @ k8[:, :, n0:n1].transpose(2, 3)).masked_fill(~keep[:, None, None, n0:n1], float("-inf"))
        c = qs * z.ks[:, :, n0 // QBLOCK, None, None]
        m_new = torch.maximum(m, qk.amax(-1, keepdim=True) * c)
        p = torch.exp2(qk * c - (m_new - P_LOG2_MAX))              # [B, H, Sq, block_n] in [0, 447.9]
        alpha = torch.exp2(m - m_new)
        l = l * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + p.to(torch.float8_e4m3fn).float() @ z.vt[:, :, :, n0:n1].float().transpose(2, 3)
        m = m_new
    out = acc / l * z.vs[:, :, None, :]
    return out.transpose(1, 2).to(q.dtype)


def attention_fp32_ref(q, k, v, kv_len=None, scale=None, chunk=4096):
    """Plain attention in float32 (no quantization), computed in query chunks to bound memory at S = 53608.
    Returns float32 [B, Sq, H, D]."""
    kf, vf = k.float(), v.float()
    return torch.cat([attention_ref(q[:, m0:m0 + chunk].float(), kf, vf, kv_len=kv_len, scale=scale)
                      for m0 in range(0, q.shape[1], chunk)], dim=1)


try:
    import triton
    import triton.language as tl
except ImportError:  # the references above still work; ops falls back to them
    triton = None

if triton is not None:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # host-side TMA descriptors (triton >= 3.4)
    except ImportError:
        TensorDescriptor = None
    _INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
    _E4M3 = tl.constexpr(E4M3_MAX)
    _FLOOR = tl.constexpr(AMAX_FLOOR)
    _INV_E4M3 = tl.constexpr(1.0 / E4M3_MAX)
    _P_SHIFT = tl.constexpr(P_LOG2_MAX)
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
                         H, SK, ROWS, HEAD_D: tl.constexpr, HAS_KV_LEN: tl.constexpr, SPLIT: tl.constexpr,
                         BLOCK: tl.constexpr):
        # grid (SPLIT, B * H): Σ k and max |v| per channel over keys [split·ROWS, +ROWS) ∩ [0, kv_len)
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
            v = tl.load(v_base + rows[:, None] * stride_vs, mask=keep, other=0.0).to(tl.float32)
            vmax = tl.maximum(vmax, tl.max(tl.abs(v), 0))
        out = (bh * SPLIT + split) * HEAD_D + d
        tl.store(KSUM + out, ksum)
        tl.store(VMAX + out, vmax)

    @triton.jit
    def _quant_kv_kernel(K, V, KV_LEN, KSUM, VMAX, K8, KS, VT, VS, stride_kb, stride_ks, stride_kh,
                         stride_vb, stride_vs, stride_vh, H, SK, SKP, inv_qmax,
                         HEAD_D: tl.constexpr, HAS_KV_LEN: tl.constexpr, INT8: tl.constexpr,
                         EXACT_ROUND: tl.constexpr, SPLIT: tl.constexpr):
        # grid (SK_pad / 128, B * H): one block of 128 keys: K - mean -> codes + scale; V -> e4m3, transposed
        blk, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        kv_end = _kv_end(KV_LEN, b, SK, HAS_KV_LEN)
        d = tl.arange(0, HEAD_D)
        part = (bh * SPLIT + tl.arange(0, SPLIT))[:, None] * HEAD_D + d[None, :]     # [SPLIT, D] partials
        mean = tl.math.div_rn(tl.sum(tl.load(KSUM + part), 0), tl.maximum(kv_end, 1).to(tl.float32))
        vs = tl.maximum(tl.max(tl.load(VMAX + part), 0), _FLOOR) * _INV_E4M3           # [D]
        rows = blk * _QBLOCK + tl.arange(0, _QBLOCK)
        keep = rows[:, None] < kv_end
        k = tl.load(K + b.to(tl.int64) * stride_kb + h * stride_kh + rows[:, None] * stride_ks + d[None, :],
                    mask=keep, other=0.0).to(tl.float32)
        k = tl.where(keep, k - mean[None, :], 0.0)
        ks = tl.maximum(tl.max(tl.max(tl.abs(k), 1), 0), _FLOOR) * inv_qmax
        bh64 = bh.to(tl.int64)
        tl.store(K8 + bh64 * SKP * HEAD_D + rows[:, None] * HEAD_D + d[None, :], _codes(k, ks, INT8, EXACT_ROUND))
        tl.store(KS + bh * (SKP // _QBLOCK) + blk, ks)
        v = tl.load(V + b.to(tl.int64) * stride_vb + h * stride_vh + rows[:, None] * stride_vs + d[None, :],
                    mask=keep, other=0.0).to(tl.float32)
        # the [128 keys, D] tile lands in VT [D, SK_pad] (keys contiguous); Triton orders the store by keys
        tl.store(VT + bh64 * HEAD_D * SKP + d[None, :] * SKP + rows[:, None],
                 _codes(v, vs[None, :], False, EXACT_ROUND))
        if blk == 0:
            tl.store(VS + bh * HEAD_D + d, vs)

    @triton.jit
    def _attn_block(acc, l_i, m_i, q, qs, k_ptrs, vt_ptrs, ks_row, desc_k, desc_v, k_row0, vt_row0, start_n, kv_end,
                    HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, INT8: tl.constexpr,
                    EXACT_ROUND: tl.constexpr, USE_TMA: tl.constexpr, PV_ACC: tl.constexpr):
        """One key block at start_n. MASK: the block holds keys >= kv_end, whose scores go to -inf (their
        codes are zero, so nothing else needs masking)."""
        start_n = tl.multiple_of(start_n, BLOCK_N)
        if USE_TMA:
            k = desc_k.load([k_row0 + start_n, 0])          # [BLOCK_N, D] of the [B*H*SK_pad, D] view
            vt = desc_v.load([vt_row0, start_n])            # [D, BLOCK_N] of the [B*H*D, SK_pad] view
        else:
            k = tl.load(k_ptrs + start_n * HEAD_D)
            vt = tl.load(vt_ptrs + start_n)
        c = qs * tl.load(ks_row + start_n // _QBLOCK)       # q_scale · k_scale, log2 units
        if INT8:
            qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        else:
            qk = tl.dot(q, tl.trans(k))                     # [BLOCK_M, BLOCK_N] fp32; B operand K-major
        if MASK:
            qk = tl.where((start_n + tl.arange(0, BLOCK_N))[None, :] < kv_end, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * c)           # c > 0 (floored scales)
        p = tl.math.exp2(qk * c - (m_ij - _P_SHIFT)[:, None])  # [0, 447.9]: e4m3's range
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        if EXACT_ROUND:
            p = _round_e4m3(p)
        # a fresh product added in fp32: the 8-bit MMAs accumulate with fewer bits than fp32 (~14 on Hopper's
        # wgmma), so the running sum over all keys stays out of them. Triton folds `dot(a, b) + c` into
        # dot(a, b, c) unless max_num_imprecise_acc != 0: sm90's default (2^30) keeps the two apart; elsewhere
        # the launcher passes PV_ACC = 32 (<= BLOCK_N) for the same effect.
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), tl.trans(vt), max_num_imprecise_acc=PV_ACC)
        return acc, l_i, m_ij

    @triton.jit
    def _attn_loop(acc, l_i, m_i, q, qs, k_ptrs, vt_ptrs, ks_row, desc_k, desc_v, k_row0, vt_row0, lo, hi, kv_end,
                   HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, INT8: tl.constexpr,
                   EXACT_ROUND: tl.constexpr, USE_TMA: tl.constexpr, PV_ACC: tl.constexpr):
        for start_n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, qs, k_ptrs, vt_ptrs, ks_row, desc_k, desc_v, k_row0,
                                        vt_row0, start_n, kv_end, HEAD_D, BLOCK_N, MASK, INT8, EXACT_ROUND, USE_TMA,
                                        PV_ACC)
        return acc, l_i, m_i

    @triton.jit
    def _attn_fp8_kernel(Q8, QS, K8, KS, VT, VS, O, KV_LEN, desc_k, desc_v, stride_ob, stride_os, stride_oh,
                         H, SQ, SK, SQP, SKP, SEQ_BUCKET,
                         HEAD_D: tl.constexpr, HAS_KV_LEN: tl.constexpr, INT8: tl.constexpr,
                         EXACT_ROUND: tl.constexpr, USE_TMA: tl.constexpr, PV_ACC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # grid (SQ_pad / BLOCK_M, B * H): BLOCK_M queries of one (b, h) against its keys [0, kv_len)
        start_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        m0 = start_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        d = tl.arange(0, HEAD_D)
        bh64 = bh.to(tl.int64)
        q = tl.load(Q8 + bh64 * SQP * HEAD_D + offs_m[:, None] * HEAD_D + d[None, :])  # [BLOCK_M, D], padded
        qs = tl.load(QS + bh * (SQP // _QBLOCK) + m0 // _QBLOCK)
        kv_end = _kv_end(KV_LEN, b, SK, HAS_KV_LEN)
        n_full = (kv_end // BLOCK_N) * BLOCK_N                  # blocks below need no mask
        k_ptrs = K8 + bh64 * SKP * HEAD_D + offs_n[:, None] * HEAD_D + d[None, :]   # [BLOCK_N, D]
        vt_ptrs = VT + bh64 * HEAD_D * SKP + d[:, None] * SKP + offs_n[None, :]     # [D, BLOCK_N]
        ks_row = KS + bh * (SKP // _QBLOCK)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
        acc, l_i, m_i = _attn_loop(acc, l_i, m_i, q, qs, k_ptrs, vt_ptrs, ks_row, desc_k, desc_v, bh * SKP,
                                   bh * HEAD_D, 0, n_full, kv_end, HEAD_D, BLOCK_N, False, INT8, EXACT_ROUND, USE_TMA,
                                   PV_ACC)
        acc, l_i, m_i = _attn_loop(acc, l_i, m_i, q, qs, k_ptrs, vt_ptrs, ks_row, desc_k, desc_v, bh * SKP,
                                   bh * HEAD_D, n_full, kv_end, kv_end, HEAD_D, BLOCK_N, True, INT8, EXACT_ROUND,
                                   USE_TMA, PV_ACC)
        vs = tl.load(VS + bh * HEAD_D + d)                       # V's per-channel scale; 448 cancels in acc / l
        out = acc / l_i[:, None] * vs[None, :]
        o_ptrs = O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < SQ)

    def _tma_block_shape(nargs):
        if isinstance(nargs["desc_k"], TensorDescriptor or ()):
            nargs["desc_k"].block_shape = [nargs["BLOCK_N"], nargs["HEAD_D"]]
            nargs["desc_v"].block_shape = [nargs["HEAD_D"], nargs["BLOCK_N"]]

    def _config(bm, bn, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages,
                             pre_hook=_tma_block_shape)

    if _INTERPRET:  # one small config: the interpreter cannot benchmark; 128 / BM and 128 / BN > 1 on purpose
        _CONFIGS = [_config(64, 32, 4, 1)]
    else:  # sm90, D = 128: fp8 tiles are half the bytes of bf16's, so 3 stages of 128x128 fit beside Q
        _CONFIGS = [_config(128, 128, 8, 3), _config(128, 128, 8, 2), _config(128, 64, 8, 3),
                    _config(128, 64, 4, 3), _config(64, 128, 4, 3)]
    _attend = triton.autotune(_CONFIGS, key=["SEQ_BUCKET", "HEAD_D", "INT8", "USE_TMA"])(_attn_fp8_kernel)

    def quantize(q, k, v, kv_len=None, scale=None, qk="fp8"):
        """q, k, v [B, S, H, D] (views fine, D unit-stride), kv_len int [B] >= 1 or None -> Quantized
        (see quantize_ref). qk: "fp8" (e4m3) or "int8" codes for Q and K."""
        B, Sq, H, D = q.shape
        Sk = k.shape[1]
        assert k.shape == v.shape == (B, Sk, H, D), (q.shape, k.shape, v.shape)
        assert qk in ("fp8", "int8"), qk
        assert D in (64, 128), f"head dim {D}: the fp8 kernel takes 64 or 128"
        q, k, v = (t if t.stride(3) == 1 else t.contiguous() for t in (q, k, v))
        int8 = qk == "int8"
        SQP, SKP = _pad(Sq), _pad(Sk)
        new = lambda *shape, dtype=torch.float32: torch.empty(shape, dtype=dtype, device=q.device)  # noqa: E731
        code = torch.int8 if int8 else torch.float8_e4m3fn
        z = Quantized(new(B, H, SQP, D, dtype=code), new(B, H, SQP // QBLOCK), new(B, H, SKP, D, dtype=code),
                      new(B, H, SKP // QBLOCK), new(B, H, D, SKP, dtype=torch.float8_e4m3fn), new(B, H, D), Sq, Sk)
        ksum, vmax = new(B, H, SPLIT, D), new(B, H, SPLIT, D)
        has = kv_len is not None
        kv = kv_len.to(device=q.device, dtype=torch.int32) if has else z.vs    # a placeholder when unused
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        inv_qmax = 1.0 / (INT8_MAX if int8 else E4M3_MAX)
        ks_, vs_ = (k.stride(0), k.stride(1), k.stride(2)), (v.stride(0), v.stride(1), v.stride(2))
        _quant_q_kernel[(SQP // QBLOCK, B * H)](q, z.q8, z.qs, q.stride(0), q.stride(1), q.stride(2), H, Sq, SQP,
                                                 scale * _LOG2E, inv_qmax, HEAD_D=D, INT8=int8,
                                                 EXACT_ROUND=_INTERPRET, num_warps=8)
        rows = -(-(-(-Sk // SPLIT)) // 64) * 64                 # keys per stats program, a multiple of 64
        _kv_stats_kernel[(SPLIT, B * H)](k, v, kv, ksum, vmax, *ks_, *vs_, H, Sk, rows, HEAD_D=D,
                                         HAS_KV_LEN=has, SPLIT=SPLIT, BLOCK=64, num_warps=4)
        _quant_kv_kernel[(SKP // QBLOCK, B * H)](k, v, kv, ksum, vmax, z.k8, z.ks, z.vt, z.vs, *ks_, *vs_, H, Sk,
                                                  SKP, inv_qmax, HEAD_D=D, HAS_KV_LEN=has, INT8=int8,
                                                  EXACT_ROUND=_INTERPRET, SPLIT=SPLIT, num_warps=8)
        return z

    def attend(z, kv_len=None, out_dtype=torch.bfloat16, tma=None, config=None):
        """The attention of quantize()'s output -> [B, Sq, H, D] contiguous in out_dtype. tma: None = TMA loads
        where the GPU allows (sm90+); config: a dict of BLOCK_M, BLOCK_N, num_warps, num_stages that bypasses
        autotuning (benchmark sweeps)."""
        B, H, SQP, D = z.q8.shape
        SKP = z.k8.shape[2]
        dev = z.q8.device
        if tma is None:
            tma = (TensorDescriptor is not None and not _INTERPRET and z.q8.is_cuda
                   and torch.cuda.get_device_capability(dev)[0] >= 9)
        if tma:  # block_shape is set per config by _tma_block_shape
            desc_k = TensorDescriptor(z.k8, [B * H * SKP, D], [D, 1], [16, D])
            desc_v = TensorDescriptor(z.vt, [B * H * D, SKP], [SKP, 1], [D, 16])
        else:
            desc_k, desc_v = z.k8, z.vt  # unused placeholders
        has = kv_len is not None
        kv = kv_len.to(device=dev, dtype=torch.int32) if has else z.vs
        o = torch.empty((B, z.sq, H, D), dtype=out_dtype, device=dev)
        args = (z.q8, z.qs, z.k8, z.ks, z.vt, z.vs, o, kv, desc_k, desc_v, o.stride(0), o.stride(1), o.stride(2),
                H, z.sq, z.sk, SQP, SKP, triton.next_power_of_2(max(z.sq, z.sk)))
        sm90 = z.q8.is_cuda and torch.cuda.get_device_capability(dev)[0] == 9
        meta = dict(HEAD_D=D, HAS_KV_LEN=has, INT8=z.q8.dtype == torch.int8, EXACT_ROUND=_INTERPRET,
                    USE_TMA=bool(tma), PV_ACC=None if sm90 or _INTERPRET else 32)
        if config is None:
            _attend[lambda m: (triton.cdiv(z.sq, m["BLOCK_M"]), B * H)](*args, **meta)
        else:
            cfg = dict(config)
            if tma:
                desc_k.block_shape, desc_v.block_shape = [cfg["BLOCK_N"], D], [D, cfg["BLOCK_N"]]
            _attn_fp8_kernel[(triton.cdiv(z.sq, cfg["BLOCK_M"]), B * H)](*args, **meta, **cfg)
        return o

    def attention_fp8(q, k, v, kv_len=None, scale=None, qk="fp8", tma=None, config=None):
        """softmax(q kᵀ · scale) v with 8-bit Q·Kᵀ and P·V. q, k, v [B, S, H, D] (views fine, D unit-stride);
        kv_len int32 [B] >= 1 or None. Returns [B, Sq, H, D] contiguous in q's dtype."""
        return attend(quantize(q, k, v, kv_len, scale, qk), kv_len, q.dtype, tma, config)

    def _supports(q, k, v):
        dtypes = (torch.float16, torch.bfloat16, torch.float32)   # all quantized alike
        gpu_ok = _INTERPRET or (q.is_cuda and torch.cuda.get_device_capability(q.device) >= (8, 9))
        return (gpu_ok and q.dim() == 4 and k.dim() == 4 and k.shape == v.shape and q.dtype in dtypes
                and q.dtype == k.dtype == v.dtype and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:]
                and q.shape[-1] in (64, 128) and q.stride(3) == k.stride(3) == v.stride(3) == 1)

    attention_fp8.supports = _supports
