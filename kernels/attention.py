"""Attention over [B, S, H, D] tensors with a per-batch valid key length (flash attention forward).

Test:  python -m pytest -q tests/test_kernels.py -k attention          (CPU, Triton interpreter)
       python -m pytest -q -m gpu tests/test_kernels.py -k attention   (GPU)
Bench: python -m benchmarks.bench_kernels --out FILE.json

attention_ref is the float32 torch reference; the Triton kernel and its launcher sit beside it.
One program owns BLOCK_M query rows of one (batch, head) and streams key/value blocks through an online
softmax (FA2). Keys are split in two loops: full blocks without any mask, then the few boundary blocks
(kv_len, causal diagonal) with masks. Blocks past kv_len[b] are never visited.
"""
import functools
import json
import math
import os

import torch
import torch.nn.functional as F


def attention_ref(q, k, v, kv_len=None, causal=False, scale=None):
    """q [B, Sq, H, D]; k, v [B, Sk, Hk, D] with H % Hk == 0 (grouped heads); kv_len int [B] or None:
    keys at index >= kv_len[b] are ignored. Returns [B, Sq, H, D] in q's dtype."""
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    qt, kt, vt = (t.transpose(1, 2).float() for t in (q, k, v))  # [B, H, S, D]
    if Hk != H:
        kt = kt.repeat_interleave(H // Hk, dim=1)
        vt = vt.repeat_interleave(H // Hk, dim=1)
    mask = None
    if kv_len is not None:
        keep = torch.arange(Sk, device=q.device)[None, :] < kv_len.to(q.device)[:, None]  # [B, Sk]
        mask = keep[:, None, None, :]
    if causal:
        tri = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
        mask = tri if mask is None else (mask & tri)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).to(q.dtype)


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
    _LOG2E = 1.4426950408889634

    @triton.jit
    def _load_tile(ptrs, rows, n_rows, cols, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
        """Load a [R, C] tile; masked-out elements read as 0 (never touched in memory)."""
        if MASK_ROWS:
            if MASK_COLS:
                t = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
            else:
                t = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            if MASK_COLS:
                t = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
            else:
                t = tl.load(ptrs)
        return t

    @triton.jit
    def _softmax_pv(acc, l_i, m_i, qk, v, qk_scale):
        """Online-softmax update with scores qk [BLOCK_M, BLOCK_N] fp32 and values v [BLOCK_N, BLOCK_D].
        exp2 with the scale folded in: p = 2^(qk * scale * log2e - m), m kept in the same units."""
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        return acc, l_i, m_ij

    @triton.jit
    def _attn_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, desc_k, desc_v, kv_row0, kv_col, start_n,
                    stride_ks, stride_vs, kv_end, offs_m, causal_off, qk_scale,
                    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, USE_TMA: tl.constexpr):
        """One key block at start_n. MASK: the block may hold keys >= kv_end or above the causal diagonal;
        those scores go to -inf and their V rows to 0 (padding rows may hold NaN, and 0 * NaN = NaN)."""
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        if USE_TMA:  # [BLOCK_N, D] tiles of the [B*Sk, Hk*D] view; rows past the end read as 0
            k = desc_k.load([kv_row0 + start_n, kv_col])
            v = desc_v.load([kv_row0 + start_n, kv_col])
            if MASK:
                v = tl.where((offs_n < kv_end)[:, None], v, 0.0)
        else:
            k = _load_tile(k_ptrs + start_n * stride_ks, offs_n, kv_end, offs_d, HEAD_D, MASK, BLOCK_D != HEAD_D)
            v = _load_tile(v_ptrs + start_n * stride_vs, offs_n, kv_end, offs_d, HEAD_D, MASK, BLOCK_D != HEAD_D)
        qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] fp32
        if MASK:
            keep = offs_n[None, :] < kv_end
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_off)
            qk = tl.where(keep, qk, float("-inf"))
        return _softmax_pv(acc, l_i, m_i, qk, v, qk_scale)

    @triton.jit
    def _attn_loop(acc, l_i, m_i, q, k_ptrs, v_ptrs, desc_k, desc_v, kv_row0, kv_col,
                   stride_ks, stride_vs, lo, hi, kv_end, offs_m, causal_off, qk_scale,
                   HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   MASK: tl.constexpr, CAUSAL: tl.constexpr, USE_TMA: tl.constexpr):
        """Key blocks [lo, hi) of one (batch, head). Tried (triton 3.6) and dropped: issuing the next block's
        q k^T before this block's softmax (FA3's intra-warpgroup overlap) was no faster on an H200, and
        tl.range(warp_specialize=True) either failed to compile or changed nothing; skipping the acc rescale
        until a row max grows by 2^8 (FA4's lazy rescale, a data-dependent branch) ran at 464 TFLOP/s
        against 569 on an H100 (S=8552, 128x128 w8 s3)."""
        for start_n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, desc_k, desc_v, kv_row0, kv_col,
                                        start_n, stride_ks, stride_vs, kv_end, offs_m, causal_off, qk_scale,
                                        HEAD_D, BLOCK_D, BLOCK_N, MASK, CAUSAL, USE_TMA)
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, KV_LEN, desc_k, desc_v, qk_scale,
                         stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                         stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                         H, GROUP, SQ, SK, SEQ_BUCKET,
                         HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KV_LEN: tl.constexpr,
                         CAUSAL: tl.constexpr, USE_TMA: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # grid (cdiv(Sq, BLOCK_M), B * H): the m-blocks of one head run side by side and share K/V in L2
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP  # grouped-query: GROUP = H // Hk query heads per key head
        m0 = start_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        b64 = b.to(tl.int64)
        q_ptrs = Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
        k_ptrs = K + b64 * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = V + b64 * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]
        q = _load_tile(q_ptrs, offs_m, SQ, offs_d, HEAD_D, True, BLOCK_D != HEAD_D)  # [BLOCK_M, BLOCK_D]

        kv_end = SK
        if HAS_KV_LEN:
            kv_end = tl.minimum(tl.load(KV_LEN + b), SK)
        causal_off = SK - SQ  # bottom-right aligned diagonal: key j is seen by query i iff j <= i + off
        hi = kv_end
        n_full = (kv_end // BLOCK_N) * BLOCK_N  # blocks below need no mask
        if CAUSAL:
            hi = tl.minimum(hi, m0 + BLOCK_M + causal_off)
            n_full = tl.minimum(n_full, ((m0 + causal_off + 1) // BLOCK_N) * BLOCK_N)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kv_row0 = b * SK
        kv_col = hk * HEAD_D
        acc, l_i, m_i = _attn_loop(acc, l_i, m_i, q, k_ptrs, v_ptrs, desc_k, desc_v, kv_row0, kv_col,
                                   stride_ks, stride_vs, 0, n_full, kv_end, offs_m, causal_off, qk_scale,
                                   HEAD_D, BLOCK_D, BLOCK_N, False, CAUSAL, USE_TMA)
        acc, l_i, m_i = _attn_loop(acc, l_i, m_i, q, k_ptrs, v_ptrs, desc_k, desc_v, kv_row0, kv_col,
                                   stride_ks, stride_vs, n_full, hi, kv_end, offs_m, causal_off, qk_scale,
                                   HEAD_D, BLOCK_D, BLOCK_N, True, CAUSAL, USE_TMA)
        out = acc / l_i[:, None]
        o_ptrs = O + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
        if BLOCK_D == HEAD_D:
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < SQ)
        else:
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < SQ) & (offs_d[None, :] < HEAD_D))

    def _tma_block_shape(nargs):
        for name in ("desc_k", "desc_v"):
            if isinstance(nargs[name], TensorDescriptor or ()):
                nargs[name].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_D"]]

    def _config(bm, bn, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages,
                             pre_hook=_tma_block_shape)

    if _INTERPRET:  # one small config: the interpreter is slow and cannot benchmark; BM != BN on purpose
        _CONFIGS = [_config(32, 16, 4, 1)]
    else:  # H200, S=8552, TMA: 128x128 w8 s3 532 TFLOP/s; 128x64 w8 s3/s4 492/498; 64x64 w4 s3 395 (short S)
        _CONFIGS = [_config(128, 128, 8, 3), _config(128, 64, 8, 3), _config(128, 64, 8, 4), _config(64, 64, 4, 3)]
    # SEQ_BUCKET = next power of two of max(Sq, Sk): retune per size class, not per exact length
    _attn_fwd = triton.autotune(_CONFIGS, key=["SEQ_BUCKET", "HEAD_D", "CAUSAL", "USE_TMA"])(_attn_fwd_kernel)

    def _tma_ok(t, D):
        """t [B, S, Hk, D] readable as a 2D [B*S, Hk*D] TMA tensor (16-byte aligned rows)."""
        B, S = t.shape[:2]
        es = t.element_size()
        return (t.stride(3) == 1 and t.stride(2) == D and (B == 1 or t.stride(0) == S * t.stride(1))
                and (t.stride(1) * es) % 16 == 0 and t.data_ptr() % 16 == 0)

    def _launch(q, k, v, kv_len=None, causal=False, scale=None, tma=None, config=None):
        """tma: None = use TMA loads for K/V where the GPU and layout allow; config: a dict of BLOCK_M,
        BLOCK_N, num_warps, num_stages that bypasses autotuning (benchmark sweeps)."""
        B, Sq, H, D = q.shape
        Bk, Sk, Hk, Dk = k.shape
        assert k.shape == v.shape and Bk == B and Dk == D, (q.shape, k.shape, v.shape)
        assert H % Hk == 0, f"{H} query heads do not group over {Hk} key heads"
        assert q.dtype == k.dtype == v.dtype, (q.dtype, k.dtype, v.dtype)
        assert not causal or Sq <= Sk, "causal attention needs Sq <= Sk"
        q, k, v = (t if t.stride(3) == 1 else t.contiguous() for t in (q, k, v))  # D must be unit-stride
        if kv_len is not None:
            assert kv_len.shape == (B,), kv_len.shape
            kv_len = kv_len.to(device=q.device, dtype=torch.int32)
        BLOCK_D = max(16, triton.next_power_of_2(D))
        if tma is None:
            tma = (TensorDescriptor is not None and not _INTERPRET and q.is_cuda and BLOCK_D == D
                   and torch.cuda.get_device_capability(q.device)[0] >= 9 and _tma_ok(k, D) and _tma_ok(v, D))
        if tma:  # block_shape is set per config by _tma_block_shape
            desc_k = TensorDescriptor(k, [B * Sk, Hk * D], [k.stride(1), 1], [16, BLOCK_D])
            desc_v = TensorDescriptor(v, [B * Sk, Hk * D], [v.stride(1), 1], [16, BLOCK_D])
        else:
            desc_k, desc_v = k, v  # unused placeholders
        o = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)  # [B, Sq, H, D] contiguous
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        args = (q, k, v, o, kv_len if kv_len is not None else o, desc_k, desc_v, scale * _LOG2E,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
                H, H // Hk, Sq, Sk, triton.next_power_of_2(max(Sq, Sk)))
        meta = dict(HEAD_D=D, BLOCK_D=BLOCK_D, HAS_KV_LEN=kv_len is not None, CAUSAL=causal, USE_TMA=bool(tma))
        choice_key = _choice_key(q, args[-1], D, causal, tma)
        if config is None:
            config = _CHOICES.get(choice_key)
        if config is None:
            grid = lambda m: (triton.cdiv(Sq, m["BLOCK_M"]), B * H)  # noqa: E731
            _attn_fwd[grid](*args, **meta)
            _remember(choice_key, getattr(_attn_fwd, "best_config", None))
        else:
            cfg = dict(config)
            if tma:
                desc_k.block_shape = desc_v.block_shape = [cfg["BLOCK_N"], BLOCK_D]
            grid = (triton.cdiv(Sq, cfg["BLOCK_M"]), B * H)
            _attn_fwd_kernel[grid](*args, **meta, **cfg)
        return o

    # Autotuning times the configs in each process, so two processes may pick different block shapes and
    # sum the softmax in a different order (last-bit differences). remember_choices(path) keeps every pick
    # in a JSON file: later processes on the machine reuse it and give the same bits, with no autotuning.
    _CHOICES, _CHOICES_PATH = {}, [None]
    _CHOICE_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    _KERNEL_VERSION = 2  # bump when the kernel or its config space changes: stored picks then retune

    @functools.lru_cache(maxsize=None)
    def _device_name(index):
        return torch.cuda.get_device_name(index)

    def _choice_key(q, seq_bucket, D, causal, tma):
        where = _device_name(q.device.index) if q.is_cuda else "interpreter"
        return (f"{where}|triton {triton.__version__}|kernel {_KERNEL_VERSION}|S {seq_bucket}|D {D}"
                f"|causal {int(causal)}|tma {int(bool(tma))}")

    def _remember(key, cfg):
        if cfg is None:
            return
        _CHOICES[key] = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        path = _CHOICES_PATH[0]
        if path is None:
            return
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(_CHOICES, f, indent=1, sort_keys=True)
            os.replace(tmp, path)          # atomic: a concurrent reader sees the old or the new file
        except OSError:
            pass                           # a read-only cache folder costs only the reuse

    def remember_choices(path):
        """Reuse the block shapes picked earlier (stored at `path`), and store new picks there."""
        _CHOICES_PATH[0] = str(path)
        try:
            with open(path) as f:
                stored = json.load(f)
        except (OSError, ValueError):
            return
        for key, cfg in stored.items():
            if isinstance(cfg, dict) and set(_CHOICE_FIELDS) <= set(cfg):
                _CHOICES.setdefault(key, {k: int(cfg[k]) for k in _CHOICE_FIELDS})

    def attention(q, k, v, kv_len=None, causal=False, scale=None):
        """q [B, Sq, H, D]; k, v [B, Sk, Hk, D] (strided views fine, D unit-stride); kv_len int32 [B] >= 1
        or None. Returns softmax(q k^T * scale) v as [B, Sq, H, D] contiguous in q's dtype."""
        return _launch(q, k, v, kv_len=kv_len, causal=causal, scale=scale)

    def _supports(q, k, v, causal):
        dtypes = (torch.float16, torch.bfloat16) + ((torch.float32,) if _INTERPRET else ())
        D = q.shape[-1]
        return (q.dim() == 4 and k.dim() == 4 and k.shape == v.shape and q.dtype in dtypes
                and q.dtype == k.dtype == v.dtype and k.shape[-1] == D and 16 <= D <= 128 and D % 8 == 0
                and q.shape[0] == k.shape[0] and q.shape[2] % k.shape[2] == 0
                and (not causal or q.shape[1] <= k.shape[1]))

    attention.supports = _supports
