"""Kernel benchmarks on pytest-benchmark: attention providers, the block's GEMMs in bf16 and fp8, the memory-bound
kernels and the fp8-emitting fused ones. One test per (op, size, provider); a group holds one op at one size.

    python -m pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results/bench_kernels_h200.json
    python -m benchmarks.report                  # RESULTS.md gets a section per bench_*.json in results/
    python -m pytest benchmarks/ --benchmark-only --benchmark-autosave               # keep this run ...
    python -m pytest benchmarks/ --benchmark-only --benchmark-compare                # ... and diff the next one
    python -m pytest benchmarks/ --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:10%
    QIE_BENCH_SIZE=tiny python -m pytest -q benchmarks/ --benchmark-only --benchmark-disable-gc   # CI's smoke run

Full sizes (CUDA): attention B1 H24 D128 at S = 8552 (1024² edit) and 53608 (4K edit), `mask` = the last 200 keys
padding; GEMMs at 8552 tokens; memory-bound kernels at 8552 and 53608 tokens, C = 3072. Tiny sizes (the CPU, under
the Triton interpreter): a few dozen tokens, fp16 where a Triton kernel runs, fp8 GEMMs through their torch
reference. The rows for ops that do not exist yet (ops.attention_fp8, norm_modulate(fp8=True), gelu_fp8,
quantize_fp8) skip, saying so, until they land. Memory-bound bytes = every input read once + every output
written once; attention flops = 4·B·H·S·S_valid·D; GEMM flops = 2·M·N·K.
"""
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.conftest import CUDA, DEVICE, MODE
from engine import ops
from kernels import attention as A
from kernels import fp8_linear as Q
from kernels import modulation as M
from kernels import qk_rope as R

TINY = MODE == "tiny"
B = 1
H, D = (2, 32) if TINY else (24, 128)
C = H * D                                     # 3072 at full size
MLP = 4 * C                                   # 12288
SEQS = (48,) if TINY else (8552, 53608)       # attention and memory-bound rows
TOKENS = 40 if TINY else 8552                 # GEMM rows, gelu/quantize rows
TEXT_PAD = 8 if TINY else 200
KDTYPE = torch.float16 if not CUDA else torch.bfloat16  # Triton kernels: the interpreter has no bf16 tl.dot
GDTYPE = torch.bfloat16                       # GEMMs: fp8 rowwise output is bf16


def _nbytes(*tensors):
    """Bytes of every tensor in (possibly nested tuples of) tensors; views count their own elements."""
    total = 0
    for t in tensors:
        if isinstance(t, (tuple, list)):
            total += _nbytes(*t)
        elif isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def _skip(benchmark, why):
    benchmark.skipped = True  # no "fixture was not used" warning
    pytest.skip(why)


def _pending(benchmark, fn, *args, **kwargs):
    """A callable for an op another change is adding: skip while it is missing or takes other arguments."""
    if fn is None:
        _skip(benchmark, "not in engine.ops yet")
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        _skip(benchmark, f"{fn.__name__} takes other arguments than this row passes ({e}): wire it here")
    return lambda: fn(*args, **kwargs)


# ---------------------------------------------------------------- attention

def _sdpa(backend, q, k, v, mask):
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # SDPA's own [B, H, S, D] layout

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return run


# ops.attention_fp8 variants, provider: (qk, pv). fp8 = e4m3 Q·K and P·V; *_pvbf16 = a bf16 P·V (V not quantized)
FP8_ATTN = {"fp8": ("fp8", "fp8"), "fp8_pvbf16": ("fp8", "bf16"), "int8_pvbf16": ("int8", "bf16")}
ATTN = [(p, m) for m in (False, True)
        for p in ("ours", *FP8_ATTN, "sdpa_cudnn") + (() if m else ("sdpa_flash",))]


@pytest.mark.parametrize("S", SEQS, ids=lambda s: f"S{s}")
@pytest.mark.parametrize("provider,masked", ATTN, ids=[f"{p}-{'mask' if m else 'full'}" for p, m in ATTN])
def test_attention(bench, benchmark, provider, masked, S):
    g = torch.Generator(DEVICE).manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device=DEVICE, generator=g).to(KDTYPE) for _ in range(3))  # [B, S, H, D]
    valid = S - TEXT_PAD if masked else S
    kv_len = torch.full((B,), valid, device=DEVICE, dtype=torch.int32) if masked else None
    mask = (torch.arange(S, device=DEVICE) < valid)[None, None, None, :] if masked else None
    ceiling = "matmul_bf16"
    if provider == "ours":
        fn = lambda: A.attention(q, k, v, kv_len=kv_len)  # noqa: E731
    elif provider in FP8_ATTN:  # held to the fp8 peak, also the _pvbf16 rows (half their flops are bf16 dots)
        qk, pv = FP8_ATTN[provider]
        fn = _pending(benchmark, getattr(ops, "attention_fp8", None), q, k, v, kv_len=kv_len, qk=qk, pv=pv)
        ceiling = "matmul_fp8"
    else:
        backend = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}[provider]
        fn = _sdpa(backend, q, k, v, mask)
        try:
            fn()
        except RuntimeError as e:  # the backend is not built for this device, dtype or mask
            _skip(benchmark, f"{provider} refuses these inputs here: {str(e)[:120]}")
    bench(fn, op="attention", provider=provider, shape=f"S={S} {'mask' if masked else 'full'}", ceiling=ceiling,
          baseline="sdpa_cudnn", flops=4 * B * H * S * valid * D, B=B, H=H, D=D, S=S, kv_len=valid,
          dtype=str(KDTYPE))


# ---------------------------------------------------------------- GEMMs

GEMMS = {"attn_proj": (C, C), "mlp_up": (C, MLP), "mlp_down": (MLP, C)}  # (K, N): q/k/v/out share attn_proj
FP8Rows = getattr(Q, "FP8Rows", None)  # an activation quantized already, as fp8_linear takes it (where it exists)


def _scaled_mm_rowwise(x_q, x_scale, w_q, w_scale, bias):
    """fp8_linear's GEMM alone (for a kernels/fp8_linear.py without FP8Rows), for an activation that arrives
    quantized: x_q [M, K] e4m3 with x_scale [M], w_q [N, K] e4m3 with w_scale [N] -> [M, N] bf16
    (mat2 = w_q.t() column-major, rowwise scales)."""
    y = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale[:, None], scale_b=w_scale[None, :], bias=bias,
                         out_dtype=torch.bfloat16)
    return y[0] if isinstance(y, tuple) else y


@pytest.mark.parametrize("provider", ["bf16", "fp8_torch_quant", "fp8_prequant"])
@pytest.mark.parametrize("name", list(GEMMS))
def test_gemm(bench, provider, name):
    K, N = GEMMS[name]
    g = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(TOKENS, K, device=DEVICE, generator=g).to(GDTYPE)
    w = (torch.randn(N, K, device=DEVICE, generator=g) * 0.02).to(GDTYPE)
    b = (torch.randn(N, device=DEVICE, generator=g) * 0.02).to(GDTYPE)
    w_q, w_s = Q.quantize_rows(w)
    fp8_gemm = Q.supports(x, w_q, b)  # an fp8 GEMM on this device; else the rows time the reference
    impl = "torch._scaled_mm rowwise" if fp8_gemm else "reference (dequantized F.linear)"
    ceiling = "matmul_fp8" if fp8_gemm else "matmul_bf16"  # the reference is a bf16 GEMM
    if provider == "bf16":
        fn, ceiling, impl = (lambda: F.linear(x, w, b)), "matmul_bf16", "F.linear"
    elif provider == "fp8_torch_quant":  # the activation quantized in plain torch inside the timed call
        fn = (lambda: Q.fp8_linear(x, w_q, w_s, b)) if fp8_gemm else (lambda: Q.fp8_linear_ref(x, w_q, w_s, b))
    else:  # what a fused producer (norm_modulate / gelu emitting fp8) leaves the GEMM: quantized outside the timer
        x_q, x_s = Q.quantize_rows(x)
        if FP8Rows is not None:  # the engine's own call: fp8_linear takes the quantized rows as they are
            rows = FP8Rows(x_q, x_s, GDTYPE)
            fn = ((lambda: Q.fp8_linear(rows, w_q, w_s, b)) if fp8_gemm
                  else (lambda: Q.fp8_linear_ref(rows, w_q, w_s, b)))
        else:
            x_dq = Q.dequantize_rows(x_q, x_s, GDTYPE)
            fn = ((lambda: _scaled_mm_rowwise(x_q, x_s, w_q, w_s, b)) if fp8_gemm
                  else (lambda: Q.fp8_linear_ref(x_dq, w_q, w_s, b)))
    bench(fn, op="gemm", provider=provider, shape=f"{name} M={TOKENS} N={N} K={K}", ceiling=ceiling,
          baseline="bf16", flops=2 * TOKENS * N * K, M=TOKENS, N=N, K=K, impl=impl)


@pytest.mark.parametrize("provider", ["ours", "torch_eager"])
def test_linear_gelu(bench, provider):
    g = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(TOKENS, C, device=DEVICE, generator=g).to(GDTYPE)
    w = (torch.randn(MLP, C, device=DEVICE, generator=g) * 0.02).to(GDTYPE)
    b = (torch.randn(MLP, device=DEVICE, generator=g) * 0.02).to(GDTYPE)
    fn = ((lambda: ops.linear_gelu(x, w, b)) if provider == "ours"
          else (lambda: F.gelu(F.linear(x, w, b), approximate="tanh")))
    bench(fn, op="linear_gelu", provider=provider, shape=f"mlp_up M={TOKENS} N={MLP} K={C}", ceiling="matmul_bf16",
          baseline="torch_eager", flops=2 * TOKENS * MLP * C, M=TOKENS, N=MLP, K=C)


# ---------------------------------------------------------------- memory-bound kernels

def _block_inputs(S):
    """x, y [B, S, C]; gate, shift, scale [B, 2, C] split at S // 2 (zero_cond_t: second half the t=0 set)."""
    g = torch.Generator(DEVICE).manual_seed(0)
    x, y = (torch.randn(B, S, C, device=DEVICE, generator=g).to(KDTYPE) for _ in range(2))
    gate, shift, scale = ((torch.randn(B, 2, C, device=DEVICE, generator=g) * 0.1).to(KDTYPE) for _ in range(3))
    return x, y, gate, shift, scale, S // 2


def _eager_mod(h, shift, scale, split):
    """What a plain torch block does: LayerNorm, then the per-token parameter set gathered."""
    idx = (torch.arange(h.shape[1], device=h.device) >= split).long()
    return F.layer_norm(h, (C,), eps=1e-6) * (1 + scale[:, idx]) + shift[:, idx]


def _eager_res(x, gate, y, split):
    idx = (torch.arange(x.shape[1], device=x.device) >= split).long()
    return x + gate[:, idx] * y


MEMORY = {  # op: (ours(inputs), torch eager or reference(inputs), the inputs it reads)
    "norm_modulate": (lambda x, y, g, sh, sc, sp: M.norm_modulate(x, sh, sc, sp),
                      lambda x, y, g, sh, sc, sp: _eager_mod(x, sh, sc, sp), lambda x, y, g, sh, sc: (x, sh, sc)),
    "gated_residual": (lambda x, y, g, sh, sc, sp: M.gated_residual(x, g, y, sp),
                       lambda x, y, g, sh, sc, sp: _eager_res(x, g, y, sp), lambda x, y, g, sh, sc: (x, y, g)),
    "gated_residual_norm_modulate": (
        lambda x, y, g, sh, sc, sp: M.gated_residual_norm_modulate(x, g, y, sh, sc, sp),
        lambda x, y, g, sh, sc, sp: (lambda h: (h, _eager_mod(h, sh, sc, sp)))(_eager_res(x, g, y, sp)),
        lambda x, y, g, sh, sc: (x, y, g, sh, sc)),
}


@pytest.mark.parametrize("provider", ["ours", "torch_eager"])
@pytest.mark.parametrize("S", SEQS, ids=lambda s: f"S{s}")
@pytest.mark.parametrize("op", list(MEMORY))
def test_modulation(bench, op, S, provider):
    x, y, gate, shift, scale, split = _block_inputs(S)
    ours, eager, reads = MEMORY[op]
    args = (x, y, gate, shift, scale, split)
    nbytes = _nbytes(reads(*args[:5]), ours(*args))
    fn = (lambda: ours(*args)) if provider == "ours" else (lambda: eager(*args))
    bench(fn, op=op, provider=provider, shape=f"S={S} C={C}", ceiling="copy", baseline="torch_eager",
          nbytes=nbytes, S=S, C=C, split=split, dtype=str(KDTYPE))


@pytest.mark.parametrize("provider", ["ours", "torch_ref"])
@pytest.mark.parametrize("S", SEQS, ids=lambda s: f"S{s}")
def test_rms_norm_rope(bench, provider, S):
    g = torch.Generator(DEVICE).manual_seed(0)
    qkv = torch.randn(B, S, 3 * C, device=DEVICE, generator=g).to(KDTYPE)
    k = qkv[..., C:2 * C].unflatten(-1, (H, D))  # [B, S, H, D] strided view of the fused projection
    w = torch.rand(D, device=DEVICE, generator=g).to(KDTYPE) + 0.5
    ang = torch.rand(S, D // 2, device=DEVICE, generator=g) * 6
    cos, sin = ang.cos(), ang.sin()             # [S, D/2] float32
    ours = lambda: R.rms_norm_rope(k, w, cos, sin)  # noqa: E731
    fn = ours if provider == "ours" else (lambda: R.rms_norm_rope_ref(k, w, cos, sin))
    bench(fn, op="rms_norm_rope", provider=provider, shape=f"S={S} H={H} D={D}", ceiling="copy",
          baseline="torch_ref", nbytes=_nbytes(k, w, cos, sin, ours()), S=S, H=H, D=D, dtype=str(KDTYPE))


# ---------------------------------------------------------------- kernels that emit fp8 (+ per-token scales)

def _quant_rows(t):
    """The plain torch pass the fused kernels replace: t [..., C] -> (e4m3 [R, C], float32 scale [R])."""
    return Q.quantize_rows(t.reshape(-1, t.shape[-1]))


def _fp8_row(bench, benchmark, op, provider, shape, unfused, pending, reads, **info):
    """unfused: ours bf16 kernel (or torch) + the torch quantization; pending: (ops function, args, kwargs)."""
    nbytes = _nbytes(reads, unfused())  # what the fused kernel must move: its inputs, the fp8 values, the scales
    fn = unfused if provider == "unfused" else _pending(benchmark, pending[0], *pending[1], **pending[2])
    bench(fn, op=op, provider=provider, shape=shape, ceiling="copy", baseline="unfused", nbytes=nbytes, **info)


@pytest.mark.parametrize("provider", ["ours_fp8", "unfused"])
@pytest.mark.parametrize("S", SEQS, ids=lambda s: f"S{s}")
@pytest.mark.parametrize("op", ["norm_modulate", "gated_residual_norm_modulate"])
def test_modulation_fp8(bench, benchmark, op, S, provider):
    x, y, gate, shift, scale, split = _block_inputs(S)
    if op == "norm_modulate":
        unfused = lambda: _quant_rows(M.norm_modulate(x, shift, scale, split))  # noqa: E731
        pending = (getattr(ops, "norm_modulate"), (x, shift, scale, split), {"fp8": True})
        reads = (x, shift, scale)
    else:
        def unfused():
            h, out = M.gated_residual_norm_modulate(x, gate, y, shift, scale, split)
            return h, _quant_rows(out)
        pending = (getattr(ops, "gated_residual_norm_modulate"), (x, gate, y, shift, scale, split), {"fp8": True})
        reads = (x, y, gate, shift, scale)
    _fp8_row(bench, benchmark, op + "->fp8", provider, f"S={S} C={C}", unfused, pending, reads, S=S, C=C)


@pytest.mark.parametrize("provider", ["ours_fp8", "unfused"])
def test_gelu_fp8(bench, benchmark, provider):
    g = torch.Generator(DEVICE).manual_seed(0)
    h = torch.randn(TOKENS, MLP, device=DEVICE, generator=g).to(GDTYPE)  # the MLP's pre-activation
    unfused = lambda: _quant_rows(F.gelu(h, approximate="tanh"))  # noqa: E731
    _fp8_row(bench, benchmark, "gelu->fp8", provider, f"M={TOKENS} N={MLP}", unfused,
             (getattr(ops, "gelu_fp8", None), (h,), {}), (h,), M=TOKENS, N=MLP)


@pytest.mark.parametrize("provider", ["ours_fp8", "unfused"])
@pytest.mark.parametrize("width", [C, MLP])
def test_quantize_fp8(bench, benchmark, provider, width):
    g = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(TOKENS, width, device=DEVICE, generator=g).to(GDTYPE)  # e.g. the attention output
    _fp8_row(bench, benchmark, "quantize_fp8", provider, f"M={TOKENS} N={width}", lambda: _quant_rows(x),
             (getattr(ops, "quantize_fp8", None), (x,), {}), (x,), M=TOKENS, N=width)
