"""FP8 attention over [B, S, H, D] with a per-batch valid key length: Q·Kᵀ as an 8-bit tensor-core dot, P·V as an
8-bit (pv="fp8") or bf16 (pv="bf16") one.

Test:  python -m pytest -q tests/test_attention_fp8.py            (CPU, Triton interpreter)
       python -m pytest -q -m gpu tests/test_attention_fp8.py     (GPU, real sizes)
Bench: python -m benchmarks.bench_attention_fp8 --out FILE.json

Two steps. quantize() (kernels/attention_fp8_quant.py): Q and mean-smoothed K to e4m3 or int8 codes with one scale
per 128 tokens; V to e4m3 per channel, transposed (pv="fp8"), or left as it is (pv="bf16").
attend(), FA2 with the online softmax in fp32: s = (q8·k8ᵀ)·(q_scale·k_scale) in log2 units, then
  pv="fp8":  p = 2^(s - m + log2 448·(1-ε)) lies in [0, 447.9], e4m3's range (p in [0, 1] would lose everything
             below 2^-9 to zero and everything below 2^-6 to subnormals); acc += e4m3(p)·v8; l += Σp. The 448
             cancels in acc / l and V's per-channel scale is applied once at the end.
  pv="bf16": p = 2^(s - m) in [0, 1] (bf16 has float32's exponent range: no shift needed); acc += bf16(p)·bf16(v),
             a bf16 dot accumulating in fp32. bf16 MMAs run at half the 8-bit rate (Hopper, Ada), so P·V's half
             of the flops may take up to twice as long; in exchange the two e4m3 roundings (P and V, ~2.5e-2 rel
             L2 each on Gaussian inputs) become bf16's 2^-8 (only P's, when V arrives in bf16).
  Keys >= kv_len[b] are masked; blocks past them never visited.
qk="int8": int8 Q/K codes (int32 accumulator) instead of e4m3, at the same tensor-core rate; e4m3's 3 mantissa
bits cost ~3x int8's error on Gaussian-like Q/K (scaling cannot help a float format there: its error is relative,
not range). With pv="bf16" that is SageAttention 1's recipe (int8 Q·K, per-block scales, smoothed K, 16-bit P·V).
Under the interpreter the bf16 tl.dot returns garbage and fp32 -> bf16 truncates (triton 3.8): EXACT_ROUND rounds
P to bf16 in fp32 and runs the P·V dot in fp32 on those bf16 values; bf16 products are exact in fp32, so that is
the bf16 MMA with fp32 accumulation up to summation order.
"""
import os

import torch

from kernels.attention import attention_ref
from kernels.attention_fp8_quant import (  # noqa: F401  (re-exported: tests and benchmarks take them from here)
    E4M3_MAX, INT8_MAX, QBLOCK, Quantized, _valid_keys, quantize_ref)

P_LOG2_MAX = 8.807     # < log2(448) = 8.80735: p's largest value 447.9 rounds to 448, never past it


def attention_fp8_ref(q, k, v, kv_len=None, scale=None, qk="fp8", pv="fp8", block_n=QBLOCK):
    """The kernel's math in float32, step by step: quantize_ref, then the online softmax over key blocks of
    block_n (the kernel's BLOCK_N: P is rounded against the running row max, so the block size matters),
    s = (q8·k8ᵀ)·(q_scale·k_scale) in log2 units; pv="fp8": p = 2^(s - m + 8.807), acc += e4m3(p)·v8,
    out = acc / l · v_scale; pv="bf16": p = 2^(s - m), acc += bf16(p)·bf16(v), out = acc / l; l += Σp.
    Returns [B, Sq, H, D] in q's dtype."""
    z = quantize_ref(q, k, v, kv_len, scale, qk, pv)
    B, Sq, H, D = q.shape
    assert QBLOCK % block_n == 0 or block_n % QBLOCK == 0, block_n
    q8, k8 = z.q8[:, :, :Sq].float(), z.k8.float()
    qs = z.qs.repeat_interleave(QBLOCK, dim=-1)[:, :, :Sq, None]   # [B, H, Sq, 1]
    ks = z.ks.repeat_interleave(QBLOCK, dim=-1)[:, :, None, :]      # [B, H, 1, SK_pad]: one per key
    keep = torch.zeros(B, k8.shape[2], dtype=torch.bool, device=q.device)
    keep[:, :z.sk] = _valid_keys(kv_len, B, z.sk, q.device)
    if pv == "bf16":   # [B, H, SK_pad, D]: bf16 values in float32, keys >= kv_len zero
        vh = torch.where(keep[:, None, :z.sk, None], z.v.float().transpose(1, 2), 0.0)
        vn, shift = torch.nn.functional.pad(vh, (0, 0, 0, k8.shape[2] - z.sk)), 0.0
    else:
        vn, shift = z.vt.float().transpose(2, 3), P_LOG2_MAX
    m = torch.full((B, H, Sq, 1), float("-inf"), device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(B, H, Sq, D, device=q.device)
    for n0 in range(0, int(keep.sum(1).max()), block_n):
        n1 = n0 + block_n
        s = (q8 @ k8[:, :, n0:n1].transpose(2, 3)).masked_fill(~keep[:, None, None, n0:n1], float("-inf"))
        c = qs * ks[..., n0:n1]           # max(s)·c = max(s·c) exactly: c > 0 and rounding is monotone
        m_new = torch.maximum(m, (s * c).amax(-1, keepdim=True))
        p = torch.exp2(s * c - (m_new - shift))                    # [B, H, Sq, block_n]: [0, 447.9] or [0, 1]
        alpha = torch.exp2(m - m_new)
        l = l * alpha + p.sum(-1, keepdim=True)
        p8 = p.to(torch.bfloat16 if pv == "bf16" else torch.float8_e4m3fn).float()
        acc = acc * alpha + p8 @ vn[:, :, n0:n1]
        m = m_new
    out = acc / l if pv == "bf16" else acc / l * z.vs[:, :, None, :]
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
    from kernels.attention_fp8_quant import _kv_end, _round_bf16, _round_e4m3, quantize  # noqa: F401
    _INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
    _P_SHIFT = tl.constexpr(P_LOG2_MAX)
    _QBLOCK = tl.constexpr(QBLOCK)

    @triton.jit
    def _attn_block(acc, l_i, m_i, q, qs, k_ptrs, v_ptrs, ks_row, desc_k, desc_v, k_row0, v_row0, v_col0,
                    stride_vn, start_n, kv_end, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                    INT8: tl.constexpr, PV_BF16: tl.constexpr, EXACT_ROUND: tl.constexpr, USE_TMA: tl.constexpr,
                    PV_ACC: tl.constexpr):
        """One key block at start_n. MASK: the block holds keys >= kv_end, whose scores go to -inf (their
        codes are zero; the caller's bf16 V rows there are loaded as 0, as they may hold NaN: 0 · NaN = NaN)."""
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if USE_TMA:
            k = desc_k.load([k_row0 + start_n, 0])          # [BLOCK_N, D] of the [B*H*SK_pad, D] view
            if PV_BF16:
                v = desc_v.load([v_row0 + start_n, v_col0])  # [BLOCK_N, D] of V's [B*Sk, H*D] view
                if MASK:
                    v = tl.where((offs_n < kv_end)[:, None], v, 0.0)
            else:
                v = desc_v.load([v_row0, start_n])          # [D, BLOCK_N] of the [B*H*D, SK_pad] Vᵀ view
        else:
            k = tl.load(k_ptrs + start_n * HEAD_D)
            if PV_BF16 and MASK:
                v = tl.load(v_ptrs + start_n * stride_vn, mask=(offs_n < kv_end)[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs + start_n * stride_vn)
        if INT8:
            qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        else:
            qk = tl.dot(q, tl.trans(k))                     # [BLOCK_M, BLOCK_N] fp32; B operand K-major
        if BLOCK_N > _QBLOCK:   # the block spans several K scales (one per 128 keys): scaled per key here
            qk = qk * (qs * tl.load(ks_row + offs_n // _QBLOCK))[None, :]
            c = 1.0
        else:
            c = qs * tl.load(ks_row + start_n // _QBLOCK)   # q_scale · k_scale, log2 units
        if MASK:
            qk = tl.where(offs_n[None, :] < kv_end, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * c)           # c > 0 (floored scales)
        if PV_BF16:
            p = tl.math.exp2(qk * c - m_ij[:, None])        # [0, 1]
        else:
            p = tl.math.exp2(qk * c - (m_ij - _P_SHIFT)[:, None])  # [0, 447.9]: e4m3's range
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        if PV_BF16:  # 16-bit MMAs accumulate in full fp32: the running sum may go into the dot
            acc = acc * alpha[:, None]
            if EXACT_ROUND:
                acc = tl.dot(_round_bf16(p), v.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16), acc)
        else:
            if EXACT_ROUND:
                p = _round_e4m3(p)
            # a fresh product added in fp32: the 8-bit MMAs accumulate with fewer bits than fp32 (~14 on Hopper's
            # wgmma), so the running sum over all keys stays out of them. Triton folds `dot(a, b) + c` into
            # dot(a, b, c) unless max_num_imprecise_acc != 0: sm90's default (2^30) keeps the two apart; elsewhere
            # the launcher passes PV_ACC = 32 (<= BLOCK_N) for the same effect.
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), tl.trans(v), max_num_imprecise_acc=PV_ACC)
        return acc, l_i, m_ij

    @triton.jit
    def _attn_loop(acc, l_i, m_i, q, qs, k_ptrs, v_ptrs, ks_row, desc_k, desc_v, k_row0, v_row0, v_col0, stride_vn,
                   lo, hi, kv_end, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                   INT8: tl.constexpr, PV_BF16: tl.constexpr, EXACT_ROUND: tl.constexpr, USE_TMA: tl.constexpr,
                   PV_ACC: tl.constexpr, WS: tl.constexpr):
        # WS: the compiler's warp specialization of the loop (loads, MMAs and softmax on separate warps), a sweep
        # option (benchmarks/bench_attention_fp8.py --sweep); off in the autotuned configs
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, qs, k_ptrs, v_ptrs, ks_row, desc_k, desc_v, k_row0,
                                        v_row0, v_col0, stride_vn, start_n, kv_end, HEAD_D, BLOCK_N, MASK, INT8,
                                        PV_BF16, EXACT_ROUND, USE_TMA, PV_ACC)
        return acc, l_i, m_i

    @triton.jit
    def _attn_fp8_kernel(Q8, QS, K8, KS, V, VS, O, KV_LEN, desc_k, desc_v, stride_vb, stride_vs, stride_vh,
                         stride_ob, stride_os, stride_oh, H, SQ, SK, SQP, SKP, SEQ_BUCKET,
                         HEAD_D: tl.constexpr, HAS_KV_LEN: tl.constexpr, INT8: tl.constexpr, PV_BF16: tl.constexpr,
                         EXACT_ROUND: tl.constexpr, USE_TMA: tl.constexpr, PV_ACC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr = False):
        # grid (SQ_pad / BLOCK_M, B * H): BLOCK_M queries of one (b, h) against its keys [0, kv_len).
        # V: pv="fp8" the e4m3 Vᵀ [B, H, D, SK_pad]; pv="bf16" the caller's bf16 V [B, Sk, H, D] (strides given)
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
        if PV_BF16:   # [BLOCK_N, D] tiles; TMA coordinates [b·Sk + key, h·D]
            v_ptrs = V + b.to(tl.int64) * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + d[None, :]
            v_row0, v_col0, stride_vn = b * SK, h * HEAD_D, stride_vs
        else:         # [D, BLOCK_N] tiles; TMA coordinates [bh·D, key]
            v_ptrs = V + bh64 * HEAD_D * SKP + d[:, None] * SKP + offs_n[None, :]
            v_row0, v_col0, stride_vn = bh * HEAD_D, 0, 1
        ks_row = KS + bh * (SKP // _QBLOCK)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
        acc, l_i, m_i = _attn_loop(acc, l_i, m_i, q, qs, k_ptrs, v_ptrs, ks_row, desc_k, desc_v, bh * SKP, v_row0,
                                   v_col0, stride_vn, 0, n_full, kv_end, HEAD_D, BLOCK_N, False, INT8, PV_BF16,
                                   EXACT_ROUND, USE_TMA, PV_ACC, WS)
        acc, l_i, m_i = _attn_loop(acc, l_i, m_i, q, qs, k_ptrs, v_ptrs, ks_row, desc_k, desc_v, bh * SKP, v_row0,
                                   v_col0, stride_vn, n_full, kv_end, kv_end, HEAD_D, BLOCK_N, True, INT8, PV_BF16,
                                   EXACT_ROUND, USE_TMA, PV_ACC, WS)
        out = acc / l_i[:, None]
        if not PV_BF16:
            out = out * tl.load(VS + bh * HEAD_D + d)[None, :]   # V's per-channel scale; 448 cancels in acc / l
        o_ptrs = O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < SQ)

    def _v_block(pv_bf16, block_n, d):
        return [block_n, d] if pv_bf16 else [d, block_n]

    def _tma_block_shape(nargs):
        if isinstance(nargs["desc_k"], TensorDescriptor or ()):
            nargs["desc_k"].block_shape = [nargs["BLOCK_N"], nargs["HEAD_D"]]
            nargs["desc_v"].block_shape = _v_block(nargs["PV_BF16"], nargs["BLOCK_N"], nargs["HEAD_D"])

    def _config(bm, bn, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages,
                             pre_hook=_tma_block_shape)

    if _INTERPRET:  # one small config: the interpreter cannot benchmark; 128 / BM and 128 / BN > 1 on purpose
        _CONFIGS = [_config(64, 32, 4, 1)]
    else:  # sm90, D = 128: fp8 tiles are half the bytes of bf16's, so 3 stages of 128x128 fit beside Q
        # (pv="bf16": a stage is 16 KiB of K + 32 KiB of V, 3 stages + Q = 160 KiB, still under 227)
        _CONFIGS = [_config(128, 128, 8, 3), _config(128, 128, 8, 2), _config(128, 64, 8, 3),
                    _config(128, 64, 4, 3), _config(64, 128, 4, 3)]
    _attend = triton.autotune(_CONFIGS, key=["SEQ_BUCKET", "HEAD_D", "INT8", "PV_BF16", "USE_TMA"])(_attn_fp8_kernel)

    def _tma_ok(t):
        """t [B, S, H, D] (D unit-stride) readable as a 2D [B*S, H*D] TMA tensor with 16-byte aligned rows."""
        B, S, H, D = t.shape
        return (t.stride(2) == D and (B == 1 or t.stride(0) == S * t.stride(1))
                and (t.stride(1) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)

    def attend(z, kv_len=None, out_dtype=torch.bfloat16, tma=None, config=None):
        """The attention of quantize()'s output -> [B, Sq, H, D] contiguous in out_dtype. tma: None = TMA loads
        where the GPU allows (sm90+); config: a dict of BLOCK_M, BLOCK_N, num_warps, num_stages (and WS) that
        bypasses autotuning (benchmark sweeps)."""
        B, H, SQP, D = z.q8.shape
        SKP = z.k8.shape[2]
        dev = z.q8.device
        pv_bf16 = z.vt is None
        if tma is None:
            tma = (TensorDescriptor is not None and not _INTERPRET and z.q8.is_cuda
                   and torch.cuda.get_device_capability(dev)[0] >= 9)
        v = z.v
        if pv_bf16 and tma and not _tma_ok(v):
            v = v.contiguous()          # an odd view (e.g. heads not adjacent): one copy, then the TMA path
        if tma:  # block_shape is set per config by _tma_block_shape
            desc_k = TensorDescriptor(z.k8, [B * H * SKP, D], [D, 1], [16, D])
            desc_v = (TensorDescriptor(v, [B * z.sk, H * D], [v.stride(1), 1], [16, D]) if pv_bf16
                      else TensorDescriptor(z.vt, [B * H * D, SKP], [SKP, 1], [D, 16]))
        else:
            desc_k, desc_v = z.k8, z.k8  # unused placeholders
        has = kv_len is not None
        kv = kv_len.to(device=dev, dtype=torch.int32) if has else z.qs
        o = torch.empty((B, z.sq, H, D), dtype=out_dtype, device=dev)
        vargs = (v, z.qs, v.stride(0), v.stride(1), v.stride(2)) if pv_bf16 else (z.vt, z.vs, 0, 0, 0)
        args = (z.q8, z.qs, z.k8, z.ks, vargs[0], vargs[1], o, kv, desc_k, desc_v, *vargs[2:],
                o.stride(0), o.stride(1), o.stride(2), H, z.sq, z.sk, SQP, SKP, triton.next_power_of_2(max(z.sq, z.sk)))
        sm90 = z.q8.is_cuda and torch.cuda.get_device_capability(dev)[0] == 9
        meta = dict(HEAD_D=D, HAS_KV_LEN=has, INT8=z.q8.dtype == torch.int8, PV_BF16=pv_bf16,
                    EXACT_ROUND=_INTERPRET, USE_TMA=bool(tma), PV_ACC=None if sm90 or _INTERPRET else 32)
        if config is None:
            _attend[lambda m: (triton.cdiv(z.sq, m["BLOCK_M"]), B * H)](*args, **meta)
        else:
            cfg = dict(config)
            if tma:
                desc_k.block_shape, desc_v.block_shape = [cfg["BLOCK_N"], D], _v_block(pv_bf16, cfg["BLOCK_N"], D)
            _attn_fp8_kernel[(triton.cdiv(z.sq, cfg["BLOCK_M"]), B * H)](*args, **meta, **cfg)
        return o

    def attention_fp8(q, k, v, kv_len=None, scale=None, qk="fp8", pv="fp8", tma=None, config=None):
        """softmax(q kᵀ · scale) v with an 8-bit Q·Kᵀ (qk: "fp8" e4m3 or "int8" codes) and an 8-bit (pv="fp8") or
        bf16 (pv="bf16") P·V. q, k, v [B, S, H, D] (views fine, D unit-stride); kv_len int32 [B] >= 1 or None.
        Returns [B, Sq, H, D] contiguous in q's dtype."""
        return attend(quantize(q, k, v, kv_len, scale, qk, pv), kv_len, q.dtype, tma, config)

    def _supports(q, k, v):
        dtypes = (torch.float16, torch.bfloat16, torch.float32)   # all quantized alike
        gpu_ok = _INTERPRET or (q.is_cuda and torch.cuda.get_device_capability(q.device) >= (8, 9))
        return (gpu_ok and q.dim() == 4 and k.dim() == 4 and k.shape == v.shape and q.dtype in dtypes
                and q.dtype == k.dtype == v.dtype and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:]
                and q.shape[-1] in (64, 128) and q.stride(3) == k.stride(3) == v.stride(3) == 1)

    attention_fp8.supports = _supports
