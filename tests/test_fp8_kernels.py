"""fp8 activations from our kernels (kernels/quant_fp8.py, kernels/modulation.py's fp8 mode) and the engine's fp8 path.

CPU (CI):  python -m pytest -q tests/test_fp8_kernels.py          kernels under the Triton interpreter, fp16/fp32
GPU:       python -m pytest -q -m gpu tests/test_fp8_kernels.py   real sizes, bf16, e4m3, torch._scaled_mm

The promise: a kernel's fp8 output equals kernels/fp8_linear.quantize_rows applied to what its plain (model-dtype)
output would have been, bit for bit. The interpreter rounds float32 -> bf16 toward zero and float32 -> e4m3 wrongly
near the top of a binade, so on the CPU the kernels run fp16/fp32 inputs with q_dtype=float32 (row / scale, clamped:
the value that rounds to e4m3) and that value and the scale are checked exactly; the e4m3 store itself is checked
against the interpreter's own cast of the same values, and against torch's rounding on the GPU.
"""
import os
import zlib

import pytest
import torch

_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not _GPU:  # tests/conftest.py sets this before any test module imports triton
    assert os.environ.get("TRITON_INTERPRET") == "1", "run from the repo root so tests/conftest.py loads first"
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import kernels.fp8_linear as k8  # noqa: E402
import kernels.modulation as M  # noqa: E402
import kernels.quant_fp8 as Q8  # noqa: E402
from engine import ops  # noqa: E402
from engine.transforms.fp8 import FP8Linear, quantize_fp8  # noqa: E402

from .conftest import make_transformer  # noqa: E402
from .test_mmdit import ours_from  # noqa: E402

DEV = "cuda" if _GPU else "cpu"
E4M3 = torch.float8_e4m3fn
gpu = pytest.mark.gpu


def pre_round(ref, value):
    """The value that rounds to ref.q: value / ref.scale clamped to ±448, in float32 (torch's division)."""
    return (value.float() / ref.scale[..., None]).clamp(-448.0, 448.0)


def check_rows(got, value, reciprocal=None, what=""):
    """got: FP8Rows from a kernel run with q_dtype=float32; value: the model-dtype tensor it stands for."""
    ref = Q8.quantize_ref(value, reciprocal)
    assert got.dtype == value.dtype and got.q.shape == value.shape and got.scale.shape == value.shape[:-1], what
    assert torch.equal(got.scale, ref.scale), f"{what}: scales differ in {(got.scale != ref.scale).sum()} rows"
    want = pre_round(ref, value)
    assert torch.equal(got.q, want), f"{what}: {(got.q != want).sum()} values differ, max {(got.q - want).abs().max()}"
    assert torch.equal(want.to(E4M3).view(torch.uint8), ref.q.view(torch.uint8))   # the reference's own e4m3


@triton.jit
def _cast_kernel(X, Y, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < n).to(Y.dtype.element_ty), mask=i < n)


def triton_cast(x, dtype):
    """x cast by Triton's own conversion (the interpreter's on the CPU)."""
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x.contiguous(), y, x.numel(), BLOCK=1024)
    return y


def _rand(shape, dtype, seed, spread=True):
    """Rows of very different sizes (1e-3 to 1e2), an all-zero row and an outlier (20x the row), as a strided
    view; finite in fp16."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape[:-1], shape[-1] + 5, generator=g)
    if spread:
        x = x * torch.logspace(-3, 2, shape[-2])[:, None]
        x[..., 0, :] = 0
        x[..., -1, 3] = 20 * x[..., -1, :].abs().amax(-1)
    return x.to(dtype).to(DEV)[..., :shape[-1]]


QUANT_CASES = [(1, 1, 16), (2, 37, 423), (1, 73, 48), (5, 96)]


# ---- CPU: the kernels under the interpreter ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", QUANT_CASES, ids=lambda c: "x".join(map(str, c)))
def test_quantize_kernel_equals_quantize_rows(case, dtype):
    x = _rand(case, dtype, zlib.crc32(repr(case).encode()))
    for reciprocal in (None, True):        # the rule of torch on x's device, and torch-on-CUDA's
        check_rows(Q8.quantize(x, q_dtype=torch.float32, reciprocal=reciprocal), x, reciprocal, f"{case} {reciprocal}")
    two_pass = Q8.quantize(x, q_dtype=torch.float32, block_k=16)          # rows walked in chunks of 16
    check_rows(two_pass, x, None, f"{case} two-pass")
    if case[-2] > 1:
        flat = x.reshape(-1, case[-1]).float()
        assert (two_pass.scale.reshape(-1)[0] == torch.finfo(torch.float32).tiny) and not two_pass.q[..., 0, :].any()
        # the two scale rules really differ on these rows (1/448 is not a float32): the reciprocal flag matters
        assert not torch.equal(flat.abs().amax(-1) / 448, flat.abs().amax(-1) * torch.tensor(Q8.INV_E4M3_MAX))


def test_reciprocal_is_torch_on_cuda_rule():
    """reciprocal=True reproduces what quantize_rows computes on CUDA; on a GPU that is checked against it."""
    x = _rand((3, 64, 3072), torch.float32, 5)
    ref = Q8.quantize_ref(x, reciprocal=True)
    amax = x.float().abs().amax(-1)
    assert torch.equal(ref.scale, (amax * torch.tensor(1 / 448, dtype=torch.float32)).clamp(min=1.1754943508222875e-38))
    if _GPU:
        assert torch.equal(ref.scale.reshape(-1), k8.quantize_rows(x.reshape(-1, 3072))[1])


def test_e4m3_store_path():
    """With q_dtype=e4m3 the kernels store Triton's e4m3 cast of exactly the checked values (the interpreter's
    cast on the CPU, the hardware's RNE on the GPU), and the same scales."""
    x = _rand((2, 37, 423), torch.float16, 7)
    ref = Q8.quantize_ref(x)
    got = Q8.quantize(x)
    assert got.q.dtype == E4M3 and torch.equal(got.scale, ref.scale)
    assert torch.equal(got.q.view(torch.uint8), triton_cast(pre_round(ref, x), E4M3).view(torch.uint8))
    shift, scale = (torch.randn(2, 423, device=DEV) * 0.5 for _ in range(2))
    out = M.norm_modulate(x, shift, scale)
    got = M.norm_modulate(x, shift, scale, q_dtype=E4M3)
    ref = Q8.quantize_ref(out)
    assert got.q.dtype == E4M3 and torch.equal(got.scale, ref.scale)
    assert torch.equal(got.q.view(torch.uint8), triton_cast(pre_round(ref, out), E4M3).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [(1, 3, 48), (2, 5, 423), (7, 1024)], ids=lambda c: "x".join(map(str, c)))
def test_gelu_quantize_kernel(case, dtype):
    y = _rand(case, dtype, zlib.crc32(repr(case).encode()) + 1, spread=False) * 3
    rows, g = Q8.gelu_quantize(y, q_dtype=torch.float32, return_gelu=True)
    check_rows(rows, g, None, f"gelu {case}")      # exactly the rule applied to its own rounded GELU
    alone = Q8.gelu_quantize(y, q_dtype=torch.float32)
    assert torch.equal(alone.q, rows.q) and torch.equal(alone.scale, rows.scale)
    chunked = Q8.gelu_quantize(y, q_dtype=torch.float32, block_k=64)       # the two-pass loop
    assert torch.equal(chunked.q, rows.q) and torch.equal(chunked.scale, rows.scale)
    # torch's GELU: the same function up to float32 rounding (torch's 1 + tanh(u) cancels for x << 0: ~1e-7
    # absolute, which fp16 subnormals show), then one rounding to y's dtype each (fp16: one step apart at most)
    ref = Q8.gelu_ref(y).float()
    rtol, atol = (1e-5 if dtype == torch.float32 else 2 ** -10), 1e-6
    err = (g.float() - ref).abs() - rtol * ref.abs()
    assert (err <= atol).all(), err.max()
    assert (g.float() - y.float()).abs().max() > 0.1      # the GELU really ran


MOD_CASES = [(1, 1, 48, None), (2, 37, 423, None), (2, 37, 423, 10), (1, 73, 48, 0), (2, 3, 48, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", MOD_CASES, ids=lambda c: "B{}_S{}_C{}_split{}".format(*c))
def test_modulation_fp8_equals_quantized_plain_output(case, dtype):
    B, S, C, split = case
    g = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    x = torch.randn(B, S, C + 5, generator=g).to(dtype).to(DEV)[..., :C]
    y = torch.randn(B, S, C, generator=g).to(dtype).to(DEV)
    shape = (B, 2, C) if split is not None else (B, C)
    gate, shift, scale = (torch.randn(shape, generator=g).to(DEV) * 0.5 for _ in range(3))
    for reciprocal in (None, True):
        out = M.norm_modulate(x, shift, scale, split=split)
        check_rows(M.norm_modulate(x, shift, scale, split=split, q_dtype=torch.float32, reciprocal=reciprocal),
                   out, reciprocal, f"norm_modulate {case}")
        h, out = M.gated_residual_norm_modulate(x, gate, y, shift, scale, split=split)
        h8, rows = M.gated_residual_norm_modulate(x, gate, y, shift, scale, split=split, q_dtype=torch.float32,
                                                  reciprocal=reciprocal)
        assert torch.equal(h8, h)
        check_rows(rows, out, reciprocal, f"gated_residual_norm_modulate {case}")


def test_ops_fallbacks_quantize_the_reference_outputs():
    """Without kernels (CPU tensors, QIE_OPS=triton) the fp8 ops are the references, quantized by quantize_rows."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 9, 64, generator=g), torch.randn(2, 9, 64, generator=g)
    gate, shift, scale = (torch.randn(2, 64, generator=g) for _ in range(3))

    def same(a, b):
        assert a.dtype == b.dtype and torch.equal(a.q.view(torch.uint8), b.q.view(torch.uint8))
        assert torch.equal(a.scale, b.scale)
    same(ops.norm_modulate(x, shift, scale, fp8=True), Q8.quantize_ref(ops.norm_modulate(x, shift, scale)))
    h, rows = ops.gated_residual_norm_modulate(x, gate, y, shift, scale, fp8=True)
    h_ref, out = ops.gated_residual_norm_modulate(x, gate, y, shift, scale)
    assert torch.equal(h, h_ref)
    same(rows, Q8.quantize_ref(out))
    same(ops.quantize_fp8(x[:, 2:]), Q8.quantize_ref(x[:, 2:]))
    same(ops.gelu_fp8(x), Q8.quantize_ref(torch.nn.functional.gelu(x, approximate="tanh")))


# ---- CPU: the engine takes the fp8 path where, and only where, it should ----

SHAPES, LENS, L = [(1, 3, 4), (1, 4, 3)], [6, 4], 6


@pytest.fixture(scope="module")
def fp8_model():
    model = ours_from(make_transformer(seed=31, zero_cond_t=True))
    quantize_fp8(model)
    return model


def forward(model, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, txt = torch.randn(2, 24, 64, generator=g), torch.randn(2, L, 48, generator=g)
    t = torch.rand(2, generator=g)
    with torch.no_grad():
        return model(x.to(dtype), txt.to(dtype), torch.tensor(LENS), t.to(dtype), SHAPES).float()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def emulated_scaled_mm(calls):
    """k8.fp8_linear as a CPU emulation of the GEMM: plain activations quantized by quantize_rows (as the unfused
    launcher does), FP8Rows as they come; then dequantize and matmul in float32. Records each input's kind."""
    def fp8_linear(x, weight, scale, bias=None):
        calls.append(type(x).__name__)
        rows = x if isinstance(x, k8.FP8Rows) else Q8.quantize_ref(x)
        return k8.fp8_linear_ref(rows, weight, scale, bias)
    return fp8_linear


def test_takes_fp8_rows(fp8_model, monkeypatch):
    blk = fp8_model.transformer_blocks[0]
    x = torch.randn(2, 5, 64)
    assert not ops.takes_fp8_rows(x, blk.attn.to_q)               # CPU: no fp8 GEMM here
    monkeypatch.setattr(k8, "supports", lambda x, w, b=None: True)
    assert ops.takes_fp8_rows(x, blk.attn.to_q, blk.attn.to_k) and ops.takes_fp8_rows(x, blk.img_mlp.net[2])
    assert not ops.takes_fp8_rows(x, blk.attn.to_q, blk.img_mod[1])    # one bf16 consumer: no
    assert not ops.takes_fp8_rows(x, FP8Linear(*k8.quantize_rows(torch.randn(16, 40))))  # K not a multiple of 16
    for env, value in (("QIE_OPS", "torch"), ("QIE_FP8_QUANT", "torch")):
        monkeypatch.setenv(env, value)
        assert not ops.takes_fp8_rows(x, blk.attn.to_q)
        monkeypatch.delenv(env)


def test_engine_fp8_path_on_cpu(fp8_model, monkeypatch):
    """CPU, float32, the GEMM emulated (dequantize both operands, matmul): where fp8 GEMMs "run" (supports
    patched) every block Linear gets FP8Rows from our ops and none quantizes in torch; the result equals the
    unfused path (each Linear quantizing its own input: the same rule on the same values) bit for bit, and is near
    the model on dequantized weights. Where they do not run, the output is the dequantized model's, as before."""
    model = fp8_model
    n_linears = 12 * len(model.transformer_blocks)
    before = forward(model)                         # CPU as shipped: no fp8 GEMM, no FP8Rows anywhere
    calls = []
    monkeypatch.setattr(k8, "supports", lambda x, w, b=None: True)
    monkeypatch.setattr(k8, "fp8_linear", emulated_scaled_mm(calls))
    fused = forward(model)
    assert calls == ["FP8Rows"] * n_linears, calls
    calls.clear()
    monkeypatch.setenv("QIE_FP8_QUANT", "torch")
    unfused = forward(model)
    assert calls == ["Tensor"] * n_linears, calls
    assert torch.equal(fused, unfused)
    calls.clear()
    monkeypatch.undo()
    again = forward(model)
    assert calls == [] and torch.equal(again, before)
    # the activations' own rounding: e4m3 per token, a few percent through two blocks, never zero
    assert 1e-3 < rel(fused, before) < 0.1, rel(fused, before)


def test_engine_fp8_path_bf16_with_cpu_scaled_mm(fp8_model, monkeypatch):
    """The same in bf16 through torch's own CPU torch._scaled_mm (where this torch build has one): FP8Rows from our
    ops go straight into the real GEMM call, and equal the unfused launcher's torch quantization bit for bit."""
    model = ours_from(make_transformer(seed=31, zero_cond_t=True)).to(torch.bfloat16)
    quantize_fp8(model)          # (Module.to(bf16) would turn e4m3 weights into bf16: quantize after)
    try:
        k8.fp8_linear(torch.randn(4, 64).bfloat16(), *k8.quantize_rows(torch.randn(16, 64)))
    except (RuntimeError, NotImplementedError) as e:
        if not any(m in str(e).lower() for m in ("not implemented", "could not run", "no kernel")):
            raise
        pytest.skip(f"no CPU torch._scaled_mm in this torch build: {str(e).splitlines()[0]}")
    calls, kernel = [], k8.fp8_linear
    monkeypatch.setattr(k8, "supports", lambda x, w, b=None: x.dtype == torch.bfloat16)
    monkeypatch.setattr(k8, "fp8_linear", lambda x, *a: calls.append(type(x).__name__) or kernel(x, *a))
    fused = forward(model, torch.bfloat16)
    assert calls == ["FP8Rows"] * 12 * len(model.transformer_blocks)
    monkeypatch.setenv("QIE_FP8_QUANT", "torch")
    assert torch.equal(fused, forward(model, torch.bfloat16))
    monkeypatch.undo()
    dequantized = forward(model, torch.bfloat16)
    assert 1e-3 < rel(fused, dequantized) < 0.1


# ---- GPU: real sizes, e4m3, bf16 ----

def _assert_equal_rows(got, ref, what, q_frac=0.0, s_frac=0.0):
    """got == ref (FP8Rows), or differing in at most q_frac of the values, each one e4m3 step (neighbouring codes,
    same sign), and s_frac of the scales, each by at most one bf16 step of the row's amax."""
    bad_s = got.scale != ref.scale
    a, b = got.q.view(torch.uint8).int(), ref.q.view(torch.uint8).int()
    bad_q = a != b
    print(f"\n{what}: {int(bad_s.sum())} of {ref.scale.numel()} scales and {int(bad_q.sum())} of {ref.q.numel()} "
          "values differ")
    assert bad_s.sum() <= s_frac * bad_s.numel() and bad_q.sum() <= q_frac * bad_q.numel(), what
    assert ((got.scale - ref.scale).abs() <= 2 ** -7 * ref.scale).all(), what
    same_scale = ~bad_s[..., None].expand_as(bad_q)
    near = ((a - b).abs() == 1) & ((a ^ b) & 0x80 == 0)
    assert (near | ~bad_q | ~same_scale).all(), f"{what}: a value differs by more than one e4m3 step"


# e4m3-output compiles of the modulation kernel: the LayerNorm statistics may sum in another order than in the
# bf16 compile (Triton lays the registers out for a 1-byte store), so a normalised value may round to the other
# bf16 neighbour; a flip of that value's e4m3 rounding then needs it near an e4m3 rounding boundary (1 in ~16), and
# the row scale moves only if the flipped value is the row's amax. Bound: 1e-5 of the values, 1e-3 of the scales.
MOD_Q_FRAC, MOD_S_FRAC = 1e-5, 1e-3


@gpu
@pytest.mark.parametrize("split", [None, 4096])
def test_gpu_modulation_fp8_vs_quantized_bf16_output(split):
    """q, scale vs quantize_rows(the bf16 kernel's own output), at 1024² edit sizes: the float32-output mode (row /
    scale before the e4m3 rounding) is bit-exact; the e4m3 output within MOD_Q_FRAC / MOD_S_FRAC (see above)."""
    torch.manual_seed(3)
    B, S, C = 2, 8552, 3072
    x, y = (torch.randn(B, S, C, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    shape = (B, 2, C) if split is not None else (B, C)
    gate, shift, scale = (torch.randn(shape, device="cuda").bfloat16() * 0.5 for _ in range(3))
    out = M.norm_modulate(x, shift, scale, split)
    check_rows(M.norm_modulate(x, shift, scale, split, q_dtype=torch.float32), out, None, "norm_modulate f32")
    _assert_equal_rows(M.norm_modulate(x, shift, scale, split, q_dtype=E4M3), Q8.quantize_ref(out), "norm_modulate",
                       MOD_Q_FRAC, MOD_S_FRAC)
    h, out = M.gated_residual_norm_modulate(x, gate, y, shift, scale, split)
    h8, rows = M.gated_residual_norm_modulate(x, gate, y, shift, scale, split, q_dtype=E4M3)
    assert torch.equal(h8, h)
    check_rows(M.gated_residual_norm_modulate(x, gate, y, shift, scale, split, q_dtype=torch.float32)[1], out, None,
               "gated_residual_norm_modulate f32")
    _assert_equal_rows(rows, Q8.quantize_ref(out), "gated_residual_norm_modulate", MOD_Q_FRAC, MOD_S_FRAC)
    # and the reference really is quantize_rows on this device (the scale rule: amax · fl32(1/448) on CUDA)
    q, s = k8.quantize_rows(out.reshape(-1, C))
    ref = Q8.quantize_ref(out)
    assert torch.equal(ref.scale.reshape(-1), s) and torch.equal(ref.q.reshape(-1, C).view(torch.uint8),
                                                                q.view(torch.uint8))


@gpu
def test_gpu_quantize_bit_exact():
    torch.manual_seed(4)
    out = torch.randn(2, 8552, 3072, device="cuda", dtype=torch.bfloat16) * torch.rand(2, 8552, 1, device="cuda")
    _assert_equal_rows(Q8.quantize(out[:, :8192]), Q8.quantize_ref(out[:, :8192]), "quantize (strided img rows)")
    _assert_equal_rows(Q8.quantize(out[:, 8192:]), Q8.quantize_ref(out[:, 8192:]), "quantize (txt rows)")


@gpu
@pytest.mark.parametrize("block_k", [None, 16384])   # two passes of 4096 (default); the row in one pass
def test_gpu_gelu_quantize(block_k):
    """Exactly the rule on its own bf16 GELU; against torch's F.gelu on the same bf16 input, the GELU may round
    differently to bf16 where libdevice and torch's tanhf or their FMA contraction differ: allowed in at most 1e-4
    of the elements (then one bf16 step each), which moves at most that many q values and scales."""
    torch.manual_seed(5)
    y = torch.randn(8552, 12288, device="cuda", dtype=torch.bfloat16) * 2
    rows, g = Q8.gelu_quantize(y, return_gelu=True, block_k=block_k)
    _assert_equal_rows(rows, Q8.quantize_ref(g), "gelu_quantize vs its own GELU")
    ref_g = Q8.gelu_ref(y)
    bad_g = (g != ref_g).sum().item()
    step = ((g.float() - ref_g.float()).abs() / ref_g.float().abs().clamp(min=1e-30)).max().item()
    ref = Q8.gelu_quantize_ref(y)
    bad_q = (rows.q.view(torch.uint8) != ref.q.view(torch.uint8)).sum().item()
    bad_s = (rows.scale != ref.scale).sum().item()
    print(f"\ngelu vs torch: {bad_g} bf16 values differ (max rel {step:.2e}), {bad_q} q values, {bad_s} scales")
    assert bad_g <= 1e-4 * y.numel() and step <= 2 ** -7 and bad_q <= bad_g and bad_s <= bad_g


@gpu
def test_gpu_full_width_blocks_fused_vs_unfused_vs_bf16(monkeypatch):
    """The full-width 3-block model (3072, 24 heads, zero_cond_t) with fp8 block Linears: every Linear takes FP8Rows
    from our kernels (fused), or quantizes in torch (QIE_FP8_QUANT=torch); both against the bf16 model.
    fp8 rounding is discontinuous: the few values the modulation kernels' e4m3 output rounds the other way (see
    MOD_Q_FRAC) perturb the next GEMMs, whose outputs then cross other e4m3 boundaries, block after block. So the
    two fp8 runs differ by a fair part of their distance to bf16 (both equally far from it); with the modulation
    kernels' fp8 output replaced by quantize_rows of their bf16 output, fused equals unfused bit for bit."""
    from benchmarks.bench_fp8 import full_width_models, model_inputs
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 GEMMs need sm89+")
    bf16, fp8 = full_width_models(layers=3)
    args, kw = model_inputs(bf16)
    calls, kernel = [], k8.fp8_linear
    monkeypatch.setattr(k8, "fp8_linear", lambda x, *a: calls.append(type(x).__name__) or kernel(x, *a))
    with torch.inference_mode():
        want = bf16(*args, **kw).float()
        fused = fp8(*args, **kw).float()
        assert calls == ["FP8Rows"] * 36, calls
        calls.clear()
        monkeypatch.setenv("QIE_FP8_QUANT", "torch")
        unfused = fp8(*args, **kw).float()
        assert calls == ["Tensor"] * 36, calls
        monkeypatch.delenv("QIE_FP8_QUANT")
        nm, grnm = ops.norm_modulate, ops.gated_residual_norm_modulate

        def nm_ref(x, shift, scale, split=None, eps=1e-6, fp8=False):
            out = nm(x, shift, scale, split, eps)
            return Q8.quantize_ref(out) if fp8 else out

        def grnm_ref(x, gate, y, shift, scale, split=None, eps=1e-6, fp8=False):
            h, out = grnm(x, gate, y, shift, scale, split, eps)
            return (h, Q8.quantize_ref(out)) if fp8 else (h, out)
        monkeypatch.setattr(ops, "norm_modulate", nm_ref)
        monkeypatch.setattr(ops, "gated_residual_norm_modulate", grnm_ref)
        calls.clear()
        exact = fp8(*args, **kw).float()
        assert calls == ["FP8Rows"] * 36, calls
    e_fused, e_unfused, e_between = rel(fused, want), rel(unfused, want), rel(fused, unfused)
    print(f"\nrel L2 vs bf16: fused {e_fused:.3e}, unfused {e_unfused:.3e}; fused vs unfused {e_between:.3e}")
    assert torch.isfinite(fused).all()
    assert 1e-3 < e_unfused < 0.1 and e_fused <= 1.05 * e_unfused and e_between < e_unfused
    assert torch.equal(exact, unfused)   # GELU/quantize kernels and the wiring: exactly the unfused quantization
