"""fp8 activations from our kernels (kernels/quant_fp8.py, kernels/modulation.py's fp8 mode) and the engine's fp8 path.

CPU (CI):  python -m pytest -q tests/test_fp8_kernels.py          kernels under the Triton interpreter, fp16/fp32
GPU:       python -m pytest -q -m gpu tests/test_fp8_kernels.py   real sizes, bf16, e4m3, torch._scaled_mm

The promise: a kernel's fp8 output equals kernels/fp8_linear.quantize_rows (scale = amax / 448, row · (1/scale)
rounded to e4m3) applied to what its plain (model-dtype) output would have been, bit for bit; for gelu_quantize, to
its own GELU rounded to the model dtype (returned with return_gelu=True), which is torch's tanh GELU to one step of
that dtype. The interpreter rounds float32 -> bf16 toward zero and float32 -> e4m3 wrongly near the top of a binade,
so on the CPU the kernels run fp16/fp32 inputs with q_dtype=float32 (row · (1/scale), clamped: the value that rounds
to e4m3) and that value and the scale are checked exactly; the e4m3 store itself is checked against the
interpreter's own cast of the same values, and against torch's rounding on the GPU.
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
from .test_fp8 import straddling_rows  # noqa: E402
from .test_mmdit import ours_from  # noqa: E402

DEV = "cuda" if _GPU else "cpu"
E4M3 = torch.float8_e4m3fn
gpu = pytest.mark.gpu


def pre_round(ref, value):
    """The value that rounds to ref.q: value · (1 / ref.scale) clamped to ±448, in float32 (torch's reciprocal)."""
    return (value.float() * ref.scale.reciprocal()[..., None]).clamp(-448.0, 448.0)


def steps_apart(a, b):
    """How many representable values of their (same, 16- or 32-bit float) dtype lie between a and b, elementwise:
    0 equal, 1 neighbours (±0 count as one value)."""
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]

    def key(t):   # sign-magnitude bits -> an integer line on which neighbours differ by 1
        i = t.contiguous().view(ints).long()
        return torch.where(i >= 0, i, -(i & (2 ** (8 * t.element_size() - 1) - 1)))
    return (key(a) - key(b)).abs()


def check_gelu(g, y, what, exact=None):
    """g: a kernel's rounded GELU of y. Within one step of y's 16-bit dtype of F.gelu(y, approximate="tanh") (float32:
    4 steps, both being a few roundings of the same function), except where F.gelu's 1 + tanh u cancels (x << 0):
    there within its own float32 error, 2^-23 |x|. exact (16-bit y only): the GELU in float64 rounded to y's dtype,
    within one step of it everywhere (2^-120 absolute where it underflows: x below about -9.8).
    Returns (differing from F.gelu, differing from exact) counts."""
    ref = torch.nn.functional.gelu(y, approximate="tanh")
    apart, steps = steps_apart(g, ref), 1 if y.element_size() == 2 else 4
    cancel = (g.float() - ref.float()).abs() <= 2 ** -23 * y.float().abs()
    assert ((apart <= steps) | cancel).all(), f"{what}: {int(((apart > steps) & ~cancel).sum())} GELU values off F.gelu"
    off = 0
    if exact is not None:
        e_apart = steps_apart(g, exact)
        tiny = (g.double() - exact.double()).abs() <= 2 ** -120
        assert ((e_apart <= 1) | tiny).all(), f"{what}: {int(((e_apart > 1) & ~tiny).sum())} GELU values off exact"
        off = int((e_apart > 0).sum())
    return int((apart > 0).sum()), off


def exact_gelu(y):
    """x · sigmoid(2u) in float64, rounded to y's dtype: the tanh GELU without float32 rounding or cancellation."""
    x = y.double()
    return (x / (1 + torch.exp(-2 * Q8.GELU_BETA * (x + Q8.GELU_KAPPA * x ** 3)))).to(y.dtype)


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


def test_kernels_multiply_by_the_reciprocal():
    """A row whose values v · (1/scale) and v / scale round to different e4m3 codes (tests/test_fp8.py): the kernel
    stores the first (q_dtype=float32: that float32 product; on the GPU its e4m3 codes too)."""
    row, by_mul, by_div = straddling_rows(DEV)
    got = Q8.quantize(row, q_dtype=torch.float32)
    assert torch.equal(got.scale, k8.quantize_rows(row)[1])
    assert torch.equal(got.q, by_mul) and (got.q[:, 1:] != by_div[:, 1:]).all()
    if _GPU:
        codes = Q8.quantize(row).q.view(torch.uint8)
        assert torch.equal(codes, by_mul.to(E4M3).view(torch.uint8))


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


def gelu_input(shape, dtype, seed):
    """3 · randn rows, the last all <= 0 and (with 5+ rows) the third from last 0.02 · randn with one -0.75 (its
    amax, gelu(-0.75) = -0.17): rows whose max x is below ~0.27, so their amax need not be gelu(max x) and their
    program takes the GELU in pass 1 too."""
    y = _rand(shape, dtype, seed, spread=False) * 3
    y[..., -1, :] = -y[..., -1, :].abs()
    if shape[-2] >= 5:
        y[..., -3, :] *= 0.02
        y[..., -3, 5] = -0.75
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [(1, 3, 48), (2, 5, 423), (7, 1024)], ids=lambda c: "x".join(map(str, c)))
def test_gelu_quantize_kernel(case, dtype):
    y = gelu_input(case, dtype, zlib.crc32(repr(case).encode()) + 1)
    rows, g = Q8.gelu_quantize(y, q_dtype=torch.float32, return_gelu=True)
    check_rows(rows, g, None, f"gelu {case}")      # exactly the rule applied to its own rounded GELU
    alone = Q8.gelu_quantize(y, q_dtype=torch.float32)
    assert torch.equal(alone.q, rows.q) and torch.equal(alone.scale, rows.scale)
    for max_x in (None, False):    # the two-pass loop: pass 1 from max x (fp16) or the GELU itself
        chunked = Q8.gelu_quantize(y, q_dtype=torch.float32, block_k=32, max_x=max_x)
        assert torch.equal(chunked.q, rows.q) and torch.equal(chunked.scale, rows.scale), max_x
    # gelu_ref computes the same float32 expression (torch's exp here, numpy's in the interpreter: an ulp apart)
    ref = Q8.gelu_ref(y)
    assert (steps_apart(g, ref) <= (1 if dtype == torch.float16 else 4)).all()
    check_gelu(g, y, f"gelu {case}")
    assert (g.float() - y.float()).abs().max() > 0.1      # the GELU really ran


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if _GPU else []))   # interpreter: no bf16
def test_gelu_order_behind_the_max_x_pass(dtype):
    """gelu_quantize's max-x pass 1 rests on two properties of its rounded GELU, checked here on every finite value
    of the 16-bit dtype: non-decreasing over x >= 0 (so gelu(max x) is the largest value of x >= 0), and
    |gelu(x)| < GELU_NEG_MAX over x <= 0 (so where gelu(max x) reaches it, no negative x's value exceeds it)."""
    x = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x[torch.isfinite(x)]
    pos, neg = x[x >= 0].float().sort().values.to(dtype), x[x <= 0]
    _, g_pos = Q8.gelu_quantize(pos.to(DEV)[None], q_dtype=torch.float32, return_gelu=True)
    _, g_neg = Q8.gelu_quantize(neg.to(DEV)[None], q_dtype=torch.float32, return_gelu=True)
    assert (g_pos.float().diff() >= 0).all() and (g_pos >= 0).all()
    assert g_neg.float().abs().max() < Q8.GELU_NEG_MAX, g_neg.float().abs().max()
    assert g_neg.float().abs().max() > 0.169                # the bound is nearly reached: -0.75 is in there


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
    same(ops.gelu_fp8(x), Q8.quantize_ref(Q8.gelu_ref(x)))


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


def torch_gelu_quantize(y, reciprocal=None):
    """gelu_quantize_ref with F.gelu's GELU: what the unfused MLP quantizes (F.gelu, then quantize_rows)."""
    return Q8.quantize_ref(torch.nn.functional.gelu(y, approximate="tanh"), reciprocal)


def fused_forwards(model, monkeypatch, dtype=torch.float32):
    """(fused forward, the same with the fused MLP GELU replaced by F.gelu's). The fused MLP hidden is
    gelu_quantize_ref's x · sigmoid(2u), the unfused one F.gelu's 0.5 x (1 + tanh u): the same function, rounded
    differently, so their e4m3 codes and scales agree but for rare flips; with F.gelu in both the fused path
    quantizes exactly the unfused values."""
    fused = forward(model, dtype)
    with monkeypatch.context() as m:
        m.setattr(Q8, "gelu_quantize_ref", torch_gelu_quantize)
        return fused, forward(model, dtype)


def test_engine_fp8_path_on_cpu(fp8_model, monkeypatch):
    """CPU, float32, the GEMM emulated (dequantize both operands, matmul): where fp8 GEMMs "run" (supports
    patched) every block Linear gets FP8Rows from our ops and none quantizes in torch; with the same GELU the
    result equals the unfused path (each Linear quantizing its own input: the same rule on the same values) bit
    for bit, with the fused GELU it is as near as rounding allows, and both are near the model on dequantized
    weights. Where they do not run, the output is the dequantized model's, as before."""
    model = fp8_model
    n_linears = 12 * len(model.transformer_blocks)
    before = forward(model)                         # CPU as shipped: no fp8 GEMM, no FP8Rows anywhere
    calls = []
    monkeypatch.setattr(k8, "supports", lambda x, w, b=None: True)
    monkeypatch.setattr(k8, "fp8_linear", emulated_scaled_mm(calls))
    fused, fused_torch_gelu = fused_forwards(model, monkeypatch)
    assert calls == ["FP8Rows"] * 2 * n_linears, calls
    calls.clear()
    monkeypatch.setenv("QIE_FP8_QUANT", "torch")
    unfused = forward(model)
    assert calls == ["Tensor"] * n_linears, calls
    assert torch.equal(fused_torch_gelu, unfused)
    assert rel(fused, unfused) <= 0.1 * rel(unfused, before), (rel(fused, unfused), rel(unfused, before))
    calls.clear()
    monkeypatch.undo()
    again = forward(model)
    assert calls == [] and torch.equal(again, before)
    # the activations' own rounding: e4m3 per token, a few percent through two blocks, never zero
    assert 1e-3 < rel(fused, before) < 0.1, rel(fused, before)


def test_engine_fp8_path_bf16_with_cpu_scaled_mm(fp8_model, monkeypatch):
    """The same in bf16 through torch's own CPU torch._scaled_mm (where this torch build has one): FP8Rows from our
    ops go straight into the real GEMM call, and (with F.gelu's GELU: see fused_forwards) equal the unfused
    launcher's torch quantization bit for bit."""
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
    fused, fused_torch_gelu = fused_forwards(model, monkeypatch, torch.bfloat16)
    assert calls == ["FP8Rows"] * 2 * 12 * len(model.transformer_blocks)
    monkeypatch.setenv("QIE_FP8_QUANT", "torch")
    unfused = forward(model, torch.bfloat16)
    assert torch.equal(fused_torch_gelu, unfused)
    monkeypatch.undo()
    dequantized = forward(model, torch.bfloat16)
    assert 1e-3 < rel(fused, dequantized) < 0.1
    assert rel(fused, unfused) <= 0.1 * rel(unfused, dequantized), (rel(fused, unfused), rel(unfused, dequantized))


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
    """Exactly the rule on its own bf16 GELU. Rows 0-127 and 131 have max x < 0.27, so their programs take the GELU
    in pass 1 too (130-131: one such row beside an ordinary one; 64-127: rows whose amax is a negative x's GELU); the
    default also equals max_x=False (the GELU in both passes). The GELU (float32 with the GPU's approximate exp and
    division, rounded to bf16) is within one bf16 step of the float64 GELU everywhere, correctly rounded in all but
    1e-3 of the values, and within one step of F.gelu except where F.gelu cancels (check_gelu)."""
    torch.manual_seed(5)
    y = torch.randn(8552, 12288, device="cuda", dtype=torch.bfloat16) * 2
    y[:64] = -y[:64].abs()
    y[64:128] *= 0.02
    y[64:128, 7] = -0.75       # the amax of those rows: |gelu(-0.75)| = 0.17 > gelu(max x)
    y[131] *= 0.02
    rows, g = Q8.gelu_quantize(y, return_gelu=True, block_k=block_k)
    _assert_equal_rows(rows, Q8.quantize_ref(g), "gelu_quantize vs its own GELU")
    if block_k is None:
        full, g_full = Q8.gelu_quantize(y, return_gelu=True, max_x=False)
        assert torch.equal(g_full, g)
        _assert_equal_rows(full, rows, "pass 1 from max x vs from the GELU")
    off_torch, off_exact = check_gelu(g, y, "gelu_quantize", exact_gelu(y))
    off_ref = int((g != Q8.gelu_ref(y)).sum())
    print(f"\ngelu of {y.numel()}: {off_exact} not correctly rounded, {off_torch} differ from F.gelu (one step, or "
          f"where it cancels), {off_ref} from gelu_ref on this GPU")
    assert off_exact <= 1e-3 * y.numel()


@gpu
def test_gpu_full_width_blocks_fused_vs_unfused_vs_bf16(monkeypatch):
    """The full-width 3-block model (3072, 24 heads, zero_cond_t) with fp8 block Linears: every Linear takes FP8Rows
    from our kernels (fused), or quantizes in torch (QIE_FP8_QUANT=torch); both against the bf16 model.
    fp8 rounding is discontinuous: the few values the modulation kernels' e4m3 output rounds the other way (see
    MOD_Q_FRAC) perturb the next GEMMs, whose outputs then cross other e4m3 boundaries, block after block, and so
    do the MLP hiddens whose fused GELU (x · sigmoid(2u)) rounds to the other bf16 neighbour of F.gelu's. So the
    two fp8 runs differ by a fair part of their distance to bf16 (both equally far from it); with the modulation
    kernels' fp8 output replaced by quantize_rows of their bf16 output, and the fused GELU by F.gelu quantized by
    our rows kernel, fused equals unfused bit for bit."""
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
        monkeypatch.setattr(ops, "gelu_fp8", lambda y: Q8.quantize(torch.nn.functional.gelu(y, approximate="tanh")))
        calls.clear()
        exact = fp8(*args, **kw).float()
        assert calls == ["FP8Rows"] * 36, calls
    e_fused, e_unfused, e_between = rel(fused, want), rel(unfused, want), rel(fused, unfused)
    print(f"\nrel L2 vs bf16: fused {e_fused:.3e}, unfused {e_unfused:.3e}; fused vs unfused {e_between:.3e}")
    assert torch.isfinite(fused).all()
    assert 1e-3 < e_unfused < 0.1 and e_fused <= 1.05 * e_unfused and e_between < e_unfused
    assert torch.equal(exact, unfused)   # the quantize kernel and the wiring: exactly the unfused quantization
