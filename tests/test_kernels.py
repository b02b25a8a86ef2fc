"""Triton kernels (kernels/*.py) against their float32 torch references.

CPU (CI):  python -m pytest -q tests/test_kernels.py          tiny, odd shapes under the Triton interpreter
GPU:       python -m pytest -q -m gpu tests/test_kernels.py   real sizes in bf16/fp16 (device machine)

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton (Triton reads it
when a function is decorated, its own tl.* helpers included). With a GPU the same CPU tests run compiled
on CUDA tensors. bf16 is not tested on the CPU: tl.dot in bf16 is broken
under the interpreter.
"""
import os
import zlib

import pytest
import torch

_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not _GPU:  # tests/conftest.py sets this before any test module imports triton
    assert os.environ.get("TRITON_INTERPRET") == "1", "run from the repo root so tests/conftest.py loads first"
import triton  # noqa: E402,F401  (a runtime dependency: missing means broken, not skipped)

import kernels.attention as A  # noqa: E402
import kernels.modulation as M  # noqa: E402
import kernels.qk_rope as R  # noqa: E402

DEV = "cuda" if _GPU else "cpu"
ATOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # absolute, on O(1) outputs
gpu = pytest.mark.gpu  # deselected by default (pyproject addopts); run with -m gpu on the device machine


def _poison(shape, dtype):
    """Fill the allocator's next block of this size with NaN, so a launcher's torch.empty output that a
    kernel fails to write shows up as NaN (reliable on CUDA's caching allocator, harmless elsewhere)."""
    torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def _check(out, ref, atol, what):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    assert not out.isnan().any(), f"{what}: NaN in output"
    diff = (out.float() - ref.float()).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol:.3g}"


def _rel_l2(out, ref, what, tol=1e-2):
    assert not out.isnan().any(), f"{what}: NaN in output"
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err <= tol, f"{what}: relative L2 error {err:.3g} > {tol}"
    return err


def _qkv(B, Sq, Sk, H, Hk, D, dtype, kv=None, fused=False):
    """Random q [B, Sq, H, D], k/v [B, Sk, Hk, D]; with kv, rows past kv[b] of k and v are NaN. Also the
    reference's inputs (padding zeroed: the reference would turn 0 * NaN into NaN). fused: q, k, v are
    strided views of one [B, S, 3, H, D] projection output."""
    if fused:
        qkv = torch.randn(B, Sq, 3, H, D, device=DEV).to(dtype)
        q, k, v = qkv.unbind(2)
    else:
        q = torch.randn(B, Sq, H, D, device=DEV).to(dtype)
        k = torch.randn(B, Sk, Hk, D, device=DEV).to(dtype)
        v = torch.randn(B, Sk, Hk, D, device=DEV).to(dtype)
    kv_len = None
    if kv is not None:
        kv_len = torch.tensor(kv, dtype=torch.int32, device=DEV)
        for b, n in enumerate(kv):
            k[b, n:] = float("nan")
            v[b, n:] = float("nan")
    return q, k, v, kv_len, k.nan_to_num(0.0), v.nan_to_num(0.0)


# (B, Sq, Sk, H, Hk, D, kv_len, causal)
ATTN_CASES = [
    (1, 1, 1, 2, 2, 128, None, False),
    (1, 3, 3, 2, 1, 80, None, False),           # GQA, D padded to 128
    (2, 37, 37, 3, 3, 128, [37, 5], False),     # row 1: 32 NaN padding rows
    (2, 73, 73, 2, 2, 80, [60, 73], False),
    (2, 37, 53, 2, 2, 128, [53, 20], False),    # Sq != Sk
    (1, 37, 37, 4, 2, 128, None, True),         # causal + GQA
    (2, 73, 73, 2, 1, 128, [73, 50], True),     # causal + kv_len
    (1, 16, 37, 2, 2, 128, None, True),         # causal, Sq < Sk: bottom-right diagonal
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "B{}_Sq{}_Sk{}_H{}_Hk{}_D{}_kv{}_causal{}".format(*c))
def test_attention(case, dtype):
    B, Sq, Sk, H, Hk, D, kv, causal = case
    if _GPU and dtype == torch.float32:
        pytest.skip("float32 attention runs only under the interpreter (supports() says no on the GPU)")
    torch.manual_seed(zlib.crc32(repr(case).encode()))
    q, k, v, kv_len, k0, v0 = _qkv(B, Sq, Sk, H, Hk, D, dtype, kv)
    assert A.attention.supports(q, k, v, causal)
    _poison((B, Sq, H, D), dtype)
    out = A.attention(q, k, v, kv_len=kv_len, causal=causal)
    _check(out, A.attention_ref(q, k0, v0, kv_len=kv_len, causal=causal), ATOL[dtype], f"attention {case} {dtype}")


@pytest.mark.parametrize("path", ["pointer", "tma"])
@pytest.mark.parametrize("case", [(2, 37, 37, 2, 2, 128, [37, 9], False), (1, 41, 41, 4, 2, 128, [30], True),
                                  (2, 50, 50, 2, 2, 128, None, False)], ids=["kv_len", "causal_gqa", "full"])
def test_attention_fused_qkv_views(case, path):
    """q, k, v as strided views of one projection output, through each K/V load path with explicit blocks:
    TMA descriptors read past a batch's rows into the next batch and rely on the boundary masks."""
    B, Sq, Sk, H, Hk, D, kv, causal = case
    if path != "pointer" and _GPU and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm90+")
    torch.manual_seed(1)
    q, k, v, kv_len, k0, v0 = _qkv(B, Sq, Sk, H, H, D, torch.float16, kv, fused=True)
    k, v, k0, v0 = (t[:, :, :Hk] for t in (k, v, k0, v0))  # GQA: fewer key heads, still strided views
    cfg = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2)
    out = A._launch(q, k, v, kv_len=kv_len, causal=causal, tma=path == "tma", config=cfg)
    _check(out, A.attention_ref(q, k0, v0, kv_len=kv_len, causal=causal), ATOL[torch.float16], f"views {case}")


def test_attention_supports():
    x = torch.zeros(1, 4, 2, 128, dtype=torch.float16)
    assert A.attention.supports(x, x, x, False)
    assert not A.attention.supports(x, x, x[:, :3], False)                         # k/v shapes differ
    assert not A.attention.supports(x, x[:, :, :, :64], x[:, :, :, :64], False)    # head dims differ
    wide = torch.zeros(1, 4, 2, 256, dtype=torch.float16)
    assert not A.attention.supports(wide, wide, wide, False)                       # D = 256 > 128
    assert not A.attention.supports(x.bfloat16(), x, x, False)                     # mixed dtypes
    assert not A.attention.supports(x, x[:, :3], x[:, :3], True)                   # causal with Sq > Sk


def _params(B, C, two):
    shape = (B, 2, C) if two else (B, C)
    return [torch.randn(shape, device=DEV) * 0.5 for _ in range(3)]  # gate, shift, scale (float32)


# (B, S, C, split)
MOD_CASES = [(1, 1, 48, None), (2, 37, 423, None), (2, 37, 423, 10), (1, 73, 48, 0), (2, 3, 48, 3),
             (1, 37, 48, 36)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", MOD_CASES, ids=lambda c: "B{}_S{}_C{}_split{}".format(*c))
def test_modulation(case, dtype):
    B, S, C, split = case
    torch.manual_seed(zlib.crc32(repr(case).encode()))
    big = torch.randn(B, S, C + 5, device=DEV).to(dtype)
    x = big[..., :C]  # rows strided: a view, as a slice of a wider tensor would be
    y = torch.randn(B, S, C, device=DEV).to(dtype)
    gate, shift, scale = _params(B, C, split is not None)
    atol = 1e-4 if dtype == torch.float32 else 1e-2  # fp16 rounding of outputs up to ~5
    what = f"{case} {dtype}"
    _poison((B, S, C), dtype)
    _check(M.norm_modulate(x, shift, scale, split=split), M.norm_modulate_ref(x, shift, scale, split=split),
           atol, "norm_modulate " + what)
    _poison((B, S, C), dtype)
    _check(M.gated_residual(x, gate, y, split=split), M.gated_residual_ref(x, gate, y, split=split),
           atol, "gated_residual " + what)
    _poison((B, S, C), dtype)
    h, out = M.gated_residual_norm_modulate(x, gate, y, shift, scale, split=split)
    h_ref, out_ref = M.gated_residual_norm_modulate_ref(x, gate, y, shift, scale, split=split)
    _check(h, h_ref, atol, "fused residual " + what)
    _check(out, out_ref, atol, "fused norm_modulate " + what)


def _rope_inputs(B, S, H, D, dtype):
    """x as the k slice of a fused [B, S, 3*H*D] projection (strided [B, S, H, D] view), weight, cos, sin."""
    qkv = torch.randn(B, S, 3 * H * D, device=DEV).to(dtype)
    x = qkv[..., H * D:2 * H * D].unflatten(-1, (H, D))
    angle = torch.rand(S, D // 2, device=DEV) * 20
    return x, torch.rand(D, device=DEV) + 0.5, angle.cos(), angle.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [(1, 1, 2, 16), (2, 37, 3, 32), (1, 73, 3, 16), (2, 3, 2, 128), (1, 5, 3, 80)],
                         ids=lambda c: "B{}_S{}_H{}_D{}".format(*c))
def test_rms_norm_rope(case, dtype):
    torch.manual_seed(zlib.crc32(repr(case).encode()))
    x, w, cos, sin = _rope_inputs(*case, dtype)
    _poison(x.shape, dtype)
    out = R.rms_norm_rope(x, w, cos, sin)
    assert out.is_contiguous()
    _check(out, R.rms_norm_rope_ref(x, w, cos, sin), 1e-4 if dtype == torch.float32 else 8e-3, f"rope {case}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_rope_into_joint_slices(dtype):
    """out= views: image and text parts written into one [B, N + L, H, D] buffer, nothing else touched."""
    torch.manual_seed(7)
    xi, w, ci, si = _rope_inputs(2, 5, 3, 16, dtype)
    xt, _, ct, st = _rope_inputs(2, 3, 3, 16, dtype)
    joint = torch.full((2, 9, 3, 16), float("nan"), dtype=dtype, device=DEV)
    R.rms_norm_rope(xi, w, ci, si, out=joint[:, :5])
    R.rms_norm_rope(xt, w, ct, st, out=joint[:, 5:8])
    tol = 1e-4 if dtype == torch.float32 else 8e-3
    _check(joint[:, :5], R.rms_norm_rope_ref(xi, w, ci, si), tol, "image part")
    _check(joint[:, 5:8], R.rms_norm_rope_ref(xt, w, ct, st), tol, "text part")
    assert joint[:, 8].isnan().all(), "wrote past its slice"


# ---- GPU: real sizes, relative L2 error vs the float32 reference ----

@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_attention_mmdit(dtype):
    """B2 H24 D128 S8552: the CFG batch with a shorter uncond prompt (NaN in its padded K/V rows)."""
    torch.manual_seed(0)
    q, k, v, kv_len, k0, v0 = _qkv(2, 8552, 8552, 24, 24, 128, dtype, kv=[8552, 8552 - 1337])
    _poison(q.shape, dtype)
    out = A.attention(q, k, v, kv_len=kv_len)
    print("rel L2", _rel_l2(out, A.attention_ref(q, k0, v0, kv_len=kv_len), f"mmdit {dtype}"))


@gpu
@pytest.mark.parametrize("kv", [None, [3000]])
def test_gpu_attention_causal_gqa(kv):
    """The VL language model's prefill: 28 query heads over 4 key heads, causal, S 4096."""
    torch.manual_seed(1)
    q, k, v, kv_len, k0, v0 = _qkv(1, 4096, 4096, 28, 4, 128, torch.bfloat16, kv=kv)
    _poison(q.shape, torch.bfloat16)
    out = A.attention(q, k, v, kv_len=kv_len, causal=True)
    ref = A.attention_ref(q, k0, v0, kv_len=kv_len, causal=True)
    print("rel L2", _rel_l2(out, ref, "causal gqa"))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_attention_vision(dtype):
    """Vision tower: 16 heads of 80, one ~1 MP image (5476 patches), q/k/v as views of the qkv Linear."""
    torch.manual_seed(2)
    q, k, v, _, _, _ = _qkv(1, 5476, 5476, 16, 16, 80, dtype, fused=True)
    assert A.attention.supports(q, k, v, False)
    _poison(q.shape, dtype)
    print("rel L2", _rel_l2(A.attention(q, k, v), A.attention_ref(q, k, v), f"vision {dtype}"))


@gpu
@pytest.mark.parametrize("split", [None, 4096])
def test_gpu_modulation(split):
    torch.manual_seed(3)
    B, S, C = 2, 8552, 3072
    x = torch.randn(B, S, C, device=DEV, dtype=torch.bfloat16)
    y = torch.randn(B, S, C, device=DEV, dtype=torch.bfloat16)
    gate, shift, scale = (p.bfloat16() for p in _params(B, C, split is not None))
    _poison((B, S, C), torch.bfloat16)
    _rel_l2(M.norm_modulate(x, shift, scale, split), M.norm_modulate_ref(x, shift, scale, split), "norm_mod")
    _poison((B, S, C), torch.bfloat16)
    _rel_l2(M.gated_residual(x, gate, y, split), M.gated_residual_ref(x, gate, y, split), "residual")
    _poison((B, S, C), torch.bfloat16)
    h, out = M.gated_residual_norm_modulate(x, gate, y, shift, scale, split)
    h_ref, out_ref = M.gated_residual_norm_modulate_ref(x, gate, y, shift, scale, split)
    _rel_l2(h, h_ref, "fused h")
    _rel_l2(out, out_ref, "fused out")


@gpu
def test_gpu_rms_norm_rope():
    torch.manual_seed(4)
    x, w, cos, sin = _rope_inputs(2, 8552, 24, 128, torch.bfloat16)
    w = w.bfloat16()
    _poison(x.shape, torch.bfloat16)
    _rel_l2(R.rms_norm_rope(x, w, cos, sin), R.rms_norm_rope_ref(x, w, cos, sin), "rope")


def test_attention_remembers_its_block_shapes(tmp_path, monkeypatch):
    """The block shape autotuning picks is stored and reused by a later process (same bits, no retuning)."""
    import json
    monkeypatch.setattr(A, "_CHOICES", {})
    monkeypatch.setattr(A, "_CHOICES_PATH", [None])
    path = tmp_path / "choices.json"
    A.remember_choices(path)                     # no file yet: nothing to reuse
    q, k, v, qr, kr, vr = _qkv(1, 37, 37, 2, 2, 32, torch.float32)
    first = A.attention(q, k, v)
    stored = json.loads(path.read_text())
    assert len(stored) == 1
    (key, cfg), = stored.items()
    assert "|S 64|D 32|causal 0|" in key and set(cfg) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
    # a "new process": empty memory, the file read back, the autotuner never consulted
    monkeypatch.setattr(A, "_CHOICES", {})
    A.remember_choices(path)
    assert A._CHOICES == {key: cfg}

    class NoTuning:
        def __getitem__(self, grid):
            raise AssertionError("autotuned although a stored choice exists")

    monkeypatch.setattr(A, "_attn_fwd", NoTuning())
    assert torch.equal(A.attention(q, k, v), first)
    path.write_text("{not json")                 # a damaged file is ignored, not fatal
    monkeypatch.setattr(A, "_CHOICES", {})
    A.remember_choices(path)
    assert A._CHOICES == {}
