"""fp8 weights: the quantization rule and its error bound, FP8Linear models against the same model on the dequantized
weights, ComfyUI fp8 files (plain, scaled, mixed) against diffusers on their dequantized weights, --weights fp8/bf16,
a LoRA on an fp8 base, streaming, one-line refusals; the torch._scaled_mm call (on this torch's CPU build, and on a
GPU with -m gpu). CPU tests run float32 activations, so every difference from the reference is fp8's own."""
import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from engine import ops
from engine.models.mmdit import drop_modulation_weights, load_mmdit, modulation_table
from engine.transforms.fp8 import FP8Linear, fp8_layer_names, quantize_fp8
from engine.transforms.lora import fuse_loras
from engine.vram.offload import move_except, stream_blocks
from kernels import fp8_linear as k8
from loaders import Snapshot
from loaders.single_file import summary

from .conftest import make_transformer, write_snapshot
from .test_lora import layout, linear_shapes, random_lora
from .test_mmdit import ours_from, run_pair
from .test_single_file import COMFY, fail
from .test_pipeline_text import text_snapshot  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
SEED, LAYERS = 31, 2
SHAPES, LENS, L = [(1, 3, 4), (1, 4, 3)], [6, 4], 6
E4M3 = torch.float8_e4m3fn
BLOCK = fp8_layer_names(LAYERS)                                    # 24 Linears kept in fp8
MODS = [f"transformer_blocks.{i}.{m}_mod.1" for i in range(LAYERS) for m in ("img", "txt")]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- the quantization rule ----

def test_quantize_rows_error_bound():
    """e4m3fn keeps 3 mantissa bits: a value in a normal binade is off by at most half a step, 2^-4 of itself;
    below 2^-6 (subnormals, step 2^-9) by at most 2^-10. In a row scaled to amax 448 that is
    |W - W_dq| <= max(2^-4 |W|, 2^-10 · scale) <= 2^-4 · amax (plus ~2^-23 |W| for the float32 roundings of
    1/scale, W · (1/scale) and the dequantizing product), and random rows come close to it."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(67, 423, generator=g) * torch.logspace(-6, 4, 67)[:, None]  # rows from 1e-6 to 1e4
    w[5] = 0                                                                     # an all-zero row
    w[9, 17] = 3e3                                                               # an outlier
    q, scale = k8.quantize_rows(w)
    assert q.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == (67,)
    amax = w.abs().amax(1)
    nz = amax > 0
    assert torch.equal(scale[nz], amax[nz] / 448) and scale[5] > 0
    assert torch.equal(q.float().abs().amax(1)[nz], torch.full((int(nz.sum()),), 448.0))  # amax lands on 448
    dq = k8.dequantize_rows(q, scale)
    err = (dq - w).abs()
    assert torch.isfinite(dq).all() and torch.equal(dq[5], torch.zeros(423))
    bound = torch.maximum(2 ** -4 * w.abs(), 2 ** -10 * scale[:, None]) * (1 + 2 ** -18)
    assert (err <= bound).all(), (err - bound).max()
    per_row = (err.amax(1) / amax.clamp(min=1e-30))[nz]
    assert per_row.max() <= 2 ** -4
    normal = w.abs() >= 2 ** -6 * scale[:, None]
    worst = (err[normal] / w.abs()[normal]).max().item()
    assert 0.05 < worst <= 2 ** -4, worst   # the bound is nearly reached: rounding really happened


E4M3_MIDPOINTS = sorted({(1 + (2 * k + 1) / 16) * 2.0 ** e for e in range(-6, 9) for k in range(8)} |
                        {(2 * k + 1) * 2.0 ** -10 for k in range(8)})   # normal and subnormal rounding boundaries


def straddling_rows(device, amax=3.0):
    """A row [amax, v_1 .. v_n] (float32 on `device`) whose v_i · (1/scale) and v_i / scale (scale: quantize_rows' on
    that device) round to different e4m3 codes: the v_i lie within 16 float32 steps of e4m3 rounding midpoints
    times the scale, where the two float32 results can fall on either side of one.
    -> (row [1, 1 + n], row · (1/scale), row / scale), both clamped to ±448 as the rule clamps."""
    scale = k8.quantize_rows(torch.tensor([[amax]], device=device))[1]
    mids = torch.tensor([m for m in E4M3_MIDPOINTS if m < 448], device=device)
    near = ((torch.cat([mids, -mids]) * scale).view(torch.int32)[:, None]
            + torch.arange(-16, 17, device=device, dtype=torch.int32)).view(torch.float32).flatten()
    codes = lambda t: t.clamp(-448, 448).to(E4M3).view(torch.uint8)  # noqa: E731
    near = near[codes(near * scale.reciprocal()) != codes(near / scale)]
    assert near.numel() >= 8, near.numel()   # (66 on the CPU for amax 3)
    row = torch.cat([torch.tensor([amax], device=device), near])[None]
    return row, (row * scale.reciprocal()).clamp(-448, 448), (row / scale).clamp(-448, 448)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_quantize_rows_multiplies_by_the_reciprocal(device):
    """The rule is W · (1/scale) with 1/scale correctly rounded, not W / scale: on a row where the two round to
    different e4m3 codes, quantize_rows gives the first's, and its scale is still amax / 448 as torch computes it."""
    row, by_mul, by_div = straddling_rows(device)
    q, scale = k8.quantize_rows(row)
    assert torch.equal(scale, k8.quantize_rows(row[:, :1])[1])
    assert torch.equal(q.view(torch.uint8), by_mul.to(E4M3).view(torch.uint8))
    assert (q[:, 1:].view(torch.uint8) != by_div[:, 1:].to(E4M3).view(torch.uint8)).all()


def test_fp8_linear_ref_is_the_dequantized_matmul_and_within_the_bound():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3, 73, 96, generator=g), torch.randn(80, 96, generator=g), torch.randn(80, generator=g)
    q, s = k8.quantize_rows(w)
    got = ops.linear_fp8(x, q, s, b)
    assert torch.equal(got, torch.nn.functional.linear(x, q.float() * s[:, None], b))
    # per output: |Δy| = |ΔW x| <= Σ |ΔW| |x| <= 2^-4 (|W| |x|)
    exact = torch.nn.functional.linear(x, w, b)
    assert ((got - exact).abs() <= 2 ** -4 * (x.abs() @ w.abs().t()) + 1e-5).all()
    assert rel(got, exact) > 1e-3


def test_dispatch(monkeypatch):
    """ops.linear_fp8 takes the kernel where `supports` says so, the reference otherwise and under QIE_OPS=torch."""
    x, (q, s) = torch.randn(4, 32), k8.quantize_rows(torch.randn(16, 32))
    monkeypatch.setattr(k8, "supports", lambda *a: True)
    monkeypatch.setattr(k8, "fp8_linear", lambda *a: "kernel")
    assert ops.linear_fp8(x, q, s) == "kernel"
    monkeypatch.setenv("QIE_OPS", "torch")
    assert torch.equal(ops.linear_fp8(x, q, s), k8.fp8_linear_ref(x, q, s))
    monkeypatch.delenv("QIE_OPS")
    monkeypatch.undo()
    assert not k8.supports(x.bfloat16(), q) and torch.equal(ops.linear_fp8(x, q, s), k8.fp8_linear_ref(x, q, s))


def _scaled_mm_case(device, M, K, N, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).bfloat16().to(device)
    q, s = k8.quantize_rows(torch.randn(N, K, generator=g).to(device))
    b = torch.randn(N, generator=g).bfloat16().to(device)
    xq, sx = k8.quantize_rows(x)
    # what the GEMM computes: both operands dequantized, float32 products and sums, bias
    exact_q = k8.dequantize_rows(xq, sx) @ k8.dequantize_rows(q, s).t() + b.float()
    return x, q, s, b, exact_q


def test_scaled_mm_call_on_this_cpu_build():
    """The launcher's exact torch._scaled_mm call (operand layouts, [M, 1] / [1, N] scales, bias, out dtype) on
    this torch's CPU implementation, where it has one. cuBLASLt's own checks run only on a GPU (-m gpu)."""
    x, q, s, b, exact_q = _scaled_mm_case("cpu", 37, 96, 48)
    try:
        got = k8.fp8_linear(x[None], q, s, b)[0]
    except (RuntimeError, NotImplementedError) as e:
        # only a missing CPU kernel is a skip (torch builds before the CPU fp8 GEMM); a refused argument
        # layout is the failure this test is for
        if not any(m in str(e).lower() for m in ("not implemented", "could not run", "no kernel")):
            raise
        pytest.skip(f"no CPU torch._scaled_mm in this torch build: {str(e).splitlines()[0]}")
    assert got.dtype == torch.bfloat16 and got.shape == (37, 48)
    assert (got.float() - exact_q).abs().max() <= 2 ** -7 * exact_q.abs().max()   # bf16 output rounding
    ref = k8.fp8_linear_ref(x.float(), q, s, b.float())                          # no activation rounding
    assert 1e-3 < rel(got.float(), ref) < 0.04


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", [(4103, 3072, 3072), (333, 3072, 12288), (5, 12288, 3072)])
def test_scaled_mm_matches_reference_on_gpu(M, K, N):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 GEMMs need sm89+")
    x, q, s, b, exact_q = _scaled_mm_case("cuda", M, K, N)
    assert k8.supports(x, q, b)
    got = ops.linear_fp8(x, q, s, b)
    err = (got.float() - exact_q).abs().max().item()
    assert err <= 2 ** -7 * exact_q.abs().max().item(), err
    assert 1e-3 < rel(got.float(), k8.fp8_linear_ref(x.float(), q, s, b.float())) < 0.04


@pytest.mark.gpu
def test_fp8_model_on_gpu_runs_scaled_mm(monkeypatch):
    """The whole bf16 MMDiT on CUDA: every FP8Linear goes through torch._scaled_mm, and the output stays near the
    same model on the dequantized weights (the difference: activations rounded to e4m3 per token)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 GEMMs need sm89+")
    model = ours_from(make_transformer(seed=SEED)).to("cuda", torch.bfloat16)
    quantize_fp8(model)
    g = torch.Generator().manual_seed(1)
    x, txt, t = (torch.randn(2, 24, 64, generator=g), torch.randn(2, L, 48, generator=g), torch.rand(2, generator=g))

    def forward():
        with torch.no_grad():
            return model(*(v.to("cuda", torch.bfloat16) for v in (x, txt)), torch.tensor(LENS),
                         t.to("cuda", torch.bfloat16), SHAPES).float()
    calls, kernel = [], k8.fp8_linear
    monkeypatch.setattr(k8, "fp8_linear", lambda *a: calls.append(1) or kernel(*a))
    got = forward()
    assert len(calls) == len(BLOCK)
    monkeypatch.setattr(k8, "supports", lambda *a: False)        # the dequantized reference, same model
    want = forward()
    assert 1e-3 < rel(got, want) < 0.1, rel(got, want)


# ---- FP8Linear models ----

@pytest.fixture(scope="module")
def ref():
    return make_transformer(seed=SEED)


def dequantized_model(model):
    """Our float model on an fp8 model's dequantized weights (nn.Linear everywhere)."""
    out = ours_from(make_transformer(seed=SEED))
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            state[name + ".weight"] = m.dequantized()
    for k, v in model.state_dict().items():
        if not k.endswith(".weight_scale"):
            state.setdefault(k, v.float())
    out.load_state_dict(state)
    return out


def test_fp8_model_equals_dequantized_model_and_is_near_fp32(ref):
    base = ours_from(ref)
    model = copy.deepcopy(base)
    assert quantize_fp8(model) == len(BLOCK)
    for name, m in model.named_modules():
        if name in BLOCK:
            assert isinstance(m, FP8Linear) and m.weight.dtype == E4M3 and m.weight_scale.dtype == torch.float32
            assert m.bias.dtype == torch.float32 and m.weight_scale.shape == (m.weight.shape[0],)
        elif isinstance(m, nn.Linear):   # img_mod/txt_mod, img_in, txt_in, time embedding, norm_out, proj_out
            assert m.weight.dtype == torch.float32
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 2 * LAYERS + 6
    got = run_pair(ref, model, SHAPES, LENS, L, 2, seed=1)[0]
    assert torch.equal(got, run_pair(ref, dequantized_model(model), SHAPES, LENS, L, 2, seed=1)[0])
    fp32 = run_pair(ref, base, SHAPES, LENS, L, 2, seed=1)[0]
    # the weights' own relative error (RMS over the layers; 0.025 here, each element <= 2^-4) against the output's
    # (0.078): the tiny random model amplifies it through attention by 1-3x depending on the input (measured over
    # seeds). A scale on the wrong axis, a missing or doubled scale or a dropped layer gives errors near 1;
    # no quantization gives 0
    eps = (sum(rel(model.get_submodule(n).dequantized(), base.get_submodule(n).weight) ** 2 for n in BLOCK)
           / len(BLOCK)) ** 0.5
    assert 0.02 < eps < 2 ** -4 and eps / 4 < rel(got, fp32) < 4 * eps, (eps, rel(got, fp32))


def test_lora_on_fp8_base_is_requantized_per_channel(tmp_path, ref):
    model = ours_from(ref)
    quantize_fp8(model)
    lora = random_lora(linear_shapes(ours_from(ref)), seed=4)
    path = tmp_path / "lora.safetensors"
    save_file(layout("kohya", lora), str(path))
    before = {n: (m.weight.clone(), m.weight_scale.clone()) for n, m in model.named_modules()
              if isinstance(m, FP8Linear)}
    plain = run_pair(ref, model, SHAPES, LENS, L, 2, seed=3)[0]
    fuse_loras(model, [(path, 0.7)])
    for name, (q, s) in before.items():   # the independent rule: dequantize, add in float32, requantize
        down, up, alpha = lora[name]
        w = (q.float() * s[:, None]).addmm_(up, down, alpha=0.7 * (alpha / down.shape[0]))
        scale = w.abs().amax(1) / 448
        m = model.get_submodule(name)
        assert torch.equal(m.weight_scale, scale), name
        want = (w * scale.reciprocal()[:, None]).clamp(-448, 448).to(E4M3)
        assert torch.equal(m.weight.view(torch.uint8), want.view(torch.uint8))
        assert not torch.equal(m.weight_scale, s)   # new scales: the update moved every row's amax
    got = run_pair(ref, model, SHAPES, LENS, L, 2, seed=3)[0]
    assert torch.equal(got, run_pair(ref, dequantized_model(model), SHAPES, LENS, L, 2, seed=3)[0])
    assert rel(got, plain) > 0.2                          # the LoRA counts


def test_streamed_fp8_model_equals_resident():
    ts = torch.tensor([0.9, 0.4])
    model = ours_from(make_transformer(seed=SEED, num_layers=5, zero_cond_t=True))
    quantize_fp8(model)
    table = modulation_table(model, ts)
    drop_modulation_weights(model)
    g = torch.Generator().manual_seed(0)
    x, txt, txt_len, shapes = torch.randn(2, 18, 64, generator=g), torch.randn(2, 7, 48, generator=g), \
        torch.tensor([7, 4]), [(1, 3, 4), (1, 2, 3)]

    def steps(m):
        with torch.inference_mode():
            return [m(x, txt, txt_len, t.expand(2), shapes, mods=mod) for t, mod in zip(ts, table)]
    want = steps(model)
    streamed = copy.deepcopy(model)
    handle = stream_blocks(streamed.transformer_blocks, "cpu", 0)
    move_except(streamed, "cpu", streamed.transformer_blocks)
    dtypes = {dtype for _, _, dtype, _ in handle.layout.entries}
    assert {E4M3, torch.float32} <= dtypes and handle.bytes_streamed_per_forward > 0
    for a, b in zip(steps(streamed), want):
        assert torch.equal(a, b)
    blk = streamed.transformer_blocks[3]
    assert blk.attn.to_q.weight.dtype == E4M3 and blk.attn.to_q.weight_scale.dtype == torch.float32
    handle.remove()


# ---- ComfyUI files ----

def per_tensor(w):
    s = w.abs().max() / 448
    return (w / s).clamp(-448, 448).to(E4M3), s


def per_channel(w):
    s = w.abs().amax(1, keepdim=True) / 448      # [out, 1]
    return (w / s).clamp(-448, 448).to(E4M3), s


def comfy_file(path, state, kind):
    """`state` (float32, our names) written as ComfyUI does for `kind`, the other tensors in bf16; quantized here by
    the plain rules above. -> (dequantized float32 state, info the loader should report)."""
    tensors, dq, meta, layers = {}, {}, None, {}
    quantized = BLOCK + (MODS if kind in ("plain", "scaled") else []) + (["img_in"] if kind == "plain" else [])
    if kind == "mixed_metadata":
        quantized = [n for n in BLOCK if "txt_mlp" not in n]   # a mixed file: the text MLPs stay bf16
    for k, v in state.items():
        tensors[k] = v.bfloat16()
        dq[k] = v.bfloat16().float()
    for i, name in enumerate(quantized):
        w = state[name + ".weight"]
        if kind == "plain":
            q, s = w.to(E4M3), None
        elif kind in ("scaled", "comfy_quant"):
            q, s = per_tensor(w)
        else:
            q, s = per_channel(w)
        tensors[name + ".weight"] = q
        dq[name + ".weight"] = q.float() * (1 if s is None else s)
        if kind in ("scaled", "scaled_channel"):
            tensors[name + ".scale_weight"] = s
            tensors[name + ".scale_input"] = torch.ones(())
        elif kind == "comfy_quant":
            tensors[name + ".weight_scale"] = s
            tensors[name + ".input_scale"] = torch.ones(())
            tensors[name + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                          dtype=torch.uint8)
        elif kind == "mixed_metadata":
            tensors[name + ".weight_scale"] = s.reshape(-1)                       # [out]
            if i % 2:
                tensors[name + ".weight"] = q.view(torch.uint8)                   # uint8 container
            layers[COMFY + name] = {"format": "float8_e4m3fn" if i % 3 else "float8_e4m3fn_rowwise"}
    if kind.startswith("scaled"):
        tensors["scaled_fp8"] = torch.empty(0, dtype=E4M3)
    if layers:
        meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file({COMFY + k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    kept = [n for n in quantized if n in BLOCK]
    return dq, dict(layout={"plain": "plain", "scaled": "scaled", "scaled_channel": "scaled"}.get(kind, "mixed"),
                    kept=kept, dequantized=len(quantized) - len(kept),
                    input_scales=len(quantized) if kind in ("scaled", "scaled_channel", "comfy_quant") else 0)


@pytest.fixture(scope="module")
def snap(tmp_path_factory, ref):
    root = write_snapshot(tmp_path_factory.mktemp("config_only"), transformer=ref)
    for f in (root / "transformer").glob("*.safetensors*"):
        f.unlink()
    return Snapshot(root)


def reference_on(dq):
    want = make_transformer(seed=SEED)
    want.load_state_dict(dq)
    return want


@pytest.mark.parametrize("kind", ["plain", "scaled", "scaled_channel", "comfy_quant", "mixed_metadata"])
def test_comfy_file_loads_fp8_and_runs_as_its_dequantized_weights(tmp_path, ref, snap, kind):
    dq, info = comfy_file(tmp_path / f"qwen_image_{kind}.safetensors", ref.state_dict(), kind)
    ours = load_mmdit(snap, torch.float32, "cpu", file=tmp_path / f"qwen_image_{kind}.safetensors")
    for name, m in ours.named_modules():   # in memory: fp8 where the file is, model dtype elsewhere
        if name in info["kept"]:
            assert type(m) is FP8Linear and m.weight.dtype == E4M3 and m.weight_scale.dtype == torch.float32
        elif isinstance(m, (nn.Linear, FP8Linear)):
            assert type(m) is nn.Linear and m.weight.dtype == torch.float32, name
    fp8 = ours.source["fp8"]
    assert (fp8["layout"], fp8["kept"], len(fp8["dequantized"]), fp8["input_scales"]) == \
        (info["layout"], len(info["kept"]), info["dequantized"], info["input_scales"])
    assert ours.source["tensors"] == len(ref.state_dict())
    line = summary(ours.source)
    assert f"fp8 ({info['layout']}): {len(info['kept'])} block Linears kept in float8_e4m3fn" in line, line

    want_model = reference_on(dq)
    got, want = run_pair(want_model, ours, SHAPES, LENS, L, 2, seed=5)
    assert (got - want).abs().max() <= 2e-5 * want.abs().max()          # diffusers on the dequantized weights
    assert torch.equal(got, run_pair(want_model, ours_from(want_model), SHAPES, LENS, L, 2, seed=5)[0])
    assert rel(want, run_pair(ref, ours_from(ref), SHAPES, LENS, L, 2, seed=5)[0]) > 5e-3   # the file is fp8


def test_weights_bf16_dequantizes_an_fp8_file(tmp_path, ref, snap):
    file = tmp_path / "qwen_image_fp8_scaled.safetensors"
    comfy_file(file, ref.state_dict(), "scaled")
    kept = load_mmdit(snap, torch.float32, "cpu", file=file)
    wide = load_mmdit(snap, torch.float32, "cpu", file=file, weights="bf16")
    assert all(p.dtype == torch.float32 for p in wide.parameters())
    assert not any(isinstance(m, FP8Linear) for m in wide.modules())
    assert wide.source["fp8"]["kept"] == 0 and len(wide.source["fp8"]["dequantized"]) == len(BLOCK) + len(MODS)
    assert torch.equal(run_pair(ref, wide, SHAPES, LENS, L, 2, seed=6)[0], run_pair(ref, kept, SHAPES, LENS, L, 2, seed=6)[0])


def test_load_models_weights_fp8_quantizes_after_lora(tmp_path, tiny_snapshot):
    from engine.pipelines.load import load_models
    root, t, _ = tiny_snapshot
    lora = tmp_path / "lora.safetensors"
    save_file(layout("bare_alpha", random_lora(linear_shapes(ours_from(t)), seed=9)), str(lora))
    models = load_models(root, "cpu", "float32", loras=[(lora, 0.5)], weights="fp8")
    mm = models.transformer
    assert sum(isinstance(m, FP8Linear) for m in mm.modules()) == len(fp8_layer_names(len(mm.transformer_blocks)))
    assert any("block Linears quantized to float8_e4m3fn on load" in n for n in models.source["notes"])
    want = ours_from(t)
    fuse_loras(want, [(lora, 0.5)])   # into the float weights, then quantized: the order load_models promises
    quantize_fp8(want)
    for (n, a), b in zip(mm.state_dict().items(), want.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype == E4M3 else a,
                                                  b.view(torch.uint8) if b.dtype == E4M3 else b), n


# ---- refusals: one line naming the file and what it holds ----

def bad_file(tmp_path, ref, change):
    tensors = {k: v.bfloat16() for k, v in ref.state_dict().items()}
    meta = change(tensors)
    path = tmp_path / "bad.safetensors"
    save_file({COMFY + k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


Q = "transformer_blocks.0.attn.to_q"
CONF = lambda fmt: torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)  # noqa: E731
BAD = {
    "e5m2": (lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"].float().to(torch.float8_e5m2)}),
             "tensor(s) of a quantized or non-float dtype this engine does not read, e.g. "
             f"{Q}.weight is float8_e5m2; only float8_e4m3fn fp8 files are read"),
    "e4m3fnuz": (lambda t: t.update({"proj_out.weight": t["proj_out.weight"].float().to(torch.float8_e4m3fnuz)}),
                 "proj_out.weight is float8_e4m3fnuz"),
    "int8": (lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"].float().mul(100).to(torch.int8)}),
             f"{Q}.weight is int8"),
    "e5m2_marker": (lambda t: t.update({"scaled_fp8": torch.empty(0, dtype=torch.float8_e5m2)}),
                    "its scaled_fp8 marker is float8_e5m2, so its weights are float8_e5m2"),
    "comfy_quant_int8": (lambda t: t.update({f"{Q}.comfy_quant": CONF("int8_blockwise"),
                                             f"{Q}.weight_scale": torch.ones(2, 2)}),
                         f"layer(s) of a quantization format this engine does not read: {Q} is 'int8_blockwise' "
                         f"(in {Q}.comfy_quant)"),
    "metadata_mxfp8": (lambda t: {"_quantization_metadata": json.dumps({"layers": {COMFY + Q: {"format": "mxfp8"}}})},
                       f"{Q} is 'mxfp8' (in _quantization_metadata)"),
    "nvfp4_scales": (lambda t: t.update({f"{Q}.weight_scale_2": torch.ones(())}),
                     f"scale tensor(s) of another quantization recipe, e.g. {Q}.weight_scale_2"),
    "block_scale": (lambda t: t.update({f"{Q}.weight_scale": torch.ones(4, 4)}),
                    f"{Q}.weight_scale is float32 [4, 4]: a weight scale is one float or one per output channel"),
    "no_scale": (lambda t: t.update({f"{Q}.comfy_quant": CONF("float8_e4m3fn")}),
                 f"1 layer(s) named float8_e4m3fn ({Q}.comfy_quant) have no weight_scale: {Q}"),
    "bad_metadata": (lambda t: {"_quantization_metadata": "{not json"},
                     "its _quantization_metadata is not the JSON ComfyUI writes"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_refused_in_one_line(tmp_path, ref, snap, case):
    change, want = BAD[case]
    msg = fail(bad_file(tmp_path, ref, change), snap)
    assert want in msg, msg


def test_cli_weights_flag(tmp_path, tiny_snapshot, monkeypatch, capsys):
    """`--weights fp8` quantizes the snapshot on load; an fp8 --transformer file stays fp8 by default and
    `--weights bf16` dequantizes it, which changes no pixel (the same numbers, held wider)."""
    import numpy as np
    from PIL import Image

    import cli
    import engine.pipelines.spec as spec_mod
    from loaders import write_tensors
    from .test_pipeline import SMALL_AREA
    monkeypatch.setenv("QIE_CACHE", str(tmp_path / "cache"))
    orig = spec_mod.condition_size   # the CLI's 1 MP condition area is slow on a CPU: shrunk as in test_cli_plus
    monkeypatch.setattr(spec_mod, "condition_size",
                        lambda w, h, area=1024 * 1024: orig(w, h, SMALL_AREA if area == 1024 * 1024 else area))
    root, t, _ = tiny_snapshot
    Image.new("RGB", (64, 48), (200, 30, 90)).save(tmp_path / "in.png")
    write_tensors({"prompt_embeds": torch.randn(1, 5, 48, generator=torch.Generator().manual_seed(0))},
                  tmp_path / "e.safetensors")
    comfy_file(tmp_path / "qwen_image_fp8_scaled.safetensors", t.state_dict(), "scaled")

    def edit(name, *extra):
        out = tmp_path / f"{name}.png"
        rc = cli.main(["edit", "--model", str(root), "--image", str(tmp_path / "in.png"), "--prompt-embeds",
                       str(tmp_path / "e.safetensors"), "--steps", "2", "--cfg", "1", "--device", "cpu",
                       "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert rc == 0, err
        return np.asarray(Image.open(out)).astype(int), err
    plain, _ = edit("plain")
    quantized, err = edit("fp8", "--weights", "fp8")
    assert "note: fp8: 24 block Linears quantized to float8_e4m3fn on load" in err, err
    assert 0 < np.abs(quantized - plain).max()
    kept, err = edit("file", "--transformer", str(tmp_path / "qwen_image_fp8_scaled.safetensors"))
    assert "fp8 (scaled): 24 block Linears kept in float8_e4m3fn, 4 fp8 tensors dequantized to float32" in err, err
    wide, err = edit("file_bf16", "--transformer", str(tmp_path / "qwen_image_fp8_scaled.safetensors"),
                     "--weights", "bf16")
    assert "fp8 (scaled): 0 block Linears kept" in err and np.array_equal(wide, kept), err


def test_mixed_blocks_refused_under_a_plan(tmp_path):
    """A file with one block Linear in fp8 and the rest bf16 cannot stream (identical blocks share the slots):
    under a plan, one line naming the flags that make the blocks alike; without a plan it loads."""
    import dataclasses

    from engine.pipelines.budget import make_plan
    from engine.pipelines.load import load_models
    from loaders import LoadError
    from tests.conftest import make_transformer, make_vae, write_snapshot
    from tests.test_pipeline import SMALL_AREA
    root = write_snapshot(tmp_path / "s", make_transformer(seed=3), make_vae())
    state = make_transformer(seed=3).state_dict()
    key = "transformer_blocks.1.attn.to_q.weight"
    state[key] = state[key].to(torch.float8_e4m3fn)
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in state.items()}, str(tmp_path / "mixed.safetensors"))
    plan = make_plan(root, (64, 48), None, None, 1, False, 8 * 2 ** 30, "stream", "float32", area=SMALL_AREA)
    with pytest.raises(LoadError, match="mix fp8 and bf16 Linears.*--weights fp8"):
        load_models(root, "cpu", "float32", plan=dataclasses.replace(plan, mmdit_resident=0),
                    transformer_file=tmp_path / "mixed.safetensors")
    load_models(root, "cpu", "float32", transformer_file=tmp_path / "mixed.safetensors")
    load_models(root, "cpu", "float32", plan=dataclasses.replace(plan, mmdit_resident=0), weights="fp8",
                transformer_file=tmp_path / "mixed.safetensors")


def test_text_encoder_fp8_is_its_dequantized_self(text_snapshot, tmp_path):
    """--text-weights fp8: the language model's 7 Linears per layer become FP8Linear (the vision tower stays); the
    prompt embeddings equal those of the same model holding the dequantized weights in plain Linears (the CPU runs
    the dequantized math) and differ from the unquantized model's by fp8 error only; `encode --text-weights fp8`
    writes exactly those embeddings."""
    import cli
    from engine.models.text_encoder import load_text_encoder
    from engine.pipelines.text import encode_text, run_text_encoder
    from engine.text.processor import load_processor
    from engine.transforms.fp8 import TEXT_LINEARS, FP8Linear, quantize_text_encoder_fp8
    from loaders import Snapshot, read_tensors
    from PIL import Image

    from tests.test_processor import random_image
    snap = Snapshot(text_snapshot)
    image = random_image(64, 48, seed=3)
    prompts = ["make the sky green", " "]
    te = load_text_encoder(snap, torch.float32, "cpu")
    assert quantize_text_encoder_fp8(te) == len(te.layers) * len(TEXT_LINEARS)
    assert not any(isinstance(m, FP8Linear) for m in te.visual.modules())
    ref, plain = (load_text_encoder(snap, torch.float32, "cpu") for _ in range(2))
    for name, m in te.named_modules():
        if isinstance(m, FP8Linear):     # the same layer as a plain Linear over the dequantized weight
            ref.get_submodule(name).weight = nn.Parameter(m.dequantized(torch.float32), requires_grad=False)
    processor = load_processor(snap)
    got, want, base = (run_text_encoder(processor, m, [(image, prompts)], "cpu")[0] for m in (te, ref, plain))
    for (g, gm), (w, wm), (b, _) in zip(got, want, base):
        assert torch.equal(gm, wm) and torch.equal(g, w)
        moved = ((g - b).norm() / b.norm()).item()
        assert 1e-4 < moved < 0.1, moved
    rows = encode_text(text_snapshot, image, prompts, text_weights="fp8")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rows, got))
    image.save(tmp_path / "in.png")
    common = ["encode", "--model", str(text_snapshot), "--image", str(tmp_path / "in.png"), "--prompt", prompts[0],
              "--device", "cpu"]
    assert cli.main(common + ["--text-weights", "fp8", "--out", str(tmp_path / "q.safetensors")]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "b.safetensors")]) == 0
    q, b = read_tensors(tmp_path / "q.safetensors"), read_tensors(tmp_path / "b.safetensors")
    want_q = encode_text(text_snapshot, Image.open(tmp_path / "in.png"), prompts, text_weights="fp8")
    assert torch.equal(q["prompt_embeds"], want_q[0][0]) and not torch.equal(q["prompt_embeds"], b["prompt_embeds"])
