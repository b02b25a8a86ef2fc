"""engine/ops.py: the attention backend choice (timed once, remembered) and the per-row SDPA path.

CPU (CI): the per-row path through SDPA's math backend, and the choice logic with a fake timer.
GPU:      python -m pytest -q -m gpu tests/test_ops.py   (the cuDNN route against the reference, bf16)
"""
import json

import pytest
import torch
from torch.nn.attention import SDPBackend

from engine import ops
from kernels.attention import attention_ref


def _qkv(B, S, H, D, kv_host, device="cpu", dtype=torch.float32, seed=0):
    """q, k, v as strided views of one [B, S, 3, H, D] projection; keys past kv_host[b] are NaN."""
    g = torch.Generator(device).manual_seed(seed)
    qkv = torch.randn(B, S, 3, H, D, generator=g, device=device).to(dtype)
    for b, n in enumerate(kv_host):
        qkv[b, n:, 1:] = float("nan")
    q, k, v = qkv.unbind(2)
    return q, k, v, k.nan_to_num(0.0), v.nan_to_num(0.0)


@pytest.mark.parametrize("kv_host", [(37, 37), (37, 9), (20, 37)])
def test_sdpa_rows_masks_each_row(kv_host):
    q, k, v, k0, v0 = _qkv(2, 37, 3, 16, kv_host)
    out = ops.sdpa_rows(q, k, v, kv_host, backend=SDPBackend.MATH)
    ref = attention_ref(q, k0, v0, kv_len=torch.tensor(kv_host))
    assert out.shape == q.shape and out.is_contiguous() and not out.isnan().any()
    assert (out - ref).abs().max().item() < 1e-5


def test_fastest_is_timed_once_then_remembered(tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "_BACKENDS", {})
    monkeypatch.setattr(ops, "_BACKENDS_PATH", [None])
    ops.remember_kernel_choices(tmp_path)                  # nothing stored yet
    speed = {"ours": 2.0, "cudnn": 1.0}
    calls = []
    monkeypatch.setattr(ops, "_time_ms", lambda fn: speed[fn()])

    def run(name):
        return lambda: calls.append(name) or name

    assert ops._fastest("k1", run("ours"), run("cudnn")) == "cudnn"
    assert calls.count("ours") == calls.count("cudnn") == 4  # one warm-up and three timed rounds each
    speed.update(ours=0.5)                                  # a later change does not re-decide
    calls.clear()
    assert ops._fastest("k1", run("ours"), run("cudnn")) == "cudnn" and calls == []
    assert ops._fastest("k2", run("ours"), run("cudnn")) == "ours"
    assert json.loads((tmp_path / "attention_backends.json").read_text()) == {"k1": "cudnn", "k2": "ours"}
    # a "new process" reads the file back; a damaged entry is ignored
    monkeypatch.setattr(ops, "_BACKENDS", {})
    (tmp_path / "attention_backends.json").write_text(json.dumps({"k1": "cudnn", "k3": "flash"}))
    ops.remember_kernel_choices(tmp_path)
    assert ops._BACKENDS == {"k1": "cudnn"}


def test_a_failing_backend_loses(monkeypatch):
    monkeypatch.setattr(ops, "_BACKENDS", {})
    monkeypatch.setattr(ops, "_BACKENDS_PATH", [None])

    def broken():
        raise RuntimeError("cuDNN: no plan for these inputs")
    assert ops._fastest("k", lambda: None, broken) == "ours"


def test_cudnn_is_never_a_candidate_without_host_lengths_or_on_cpu():
    x = torch.zeros(1, 8, 2, 128, dtype=torch.bfloat16)
    assert not ops._cudnn_candidate(x, x, False, None, None)               # CPU tensors
    if torch.cuda.is_available():
        g = x.cuda()
        kv = torch.tensor([8], dtype=torch.int32, device="cuda")
        assert not ops._cudnn_candidate(g, g, False, kv, None)             # lengths only on the GPU
        assert not ops._cudnn_candidate(g, g, True, None, None)            # causal stays ours
        assert not ops._cudnn_candidate(g, g[:, :, :1], False, None, None)  # grouped heads stay ours


@pytest.mark.gpu
@pytest.mark.parametrize("kv_host", [(8552,), (8552, 8492)], ids=["b1_full", "b2_masked"])
def test_attention_routes_agree_on_the_gpu(kv_host, tmp_path, monkeypatch):
    """Both routes of ops.attention (our kernel, cuDNN per row) against the float32 reference, bf16 at the
    1024² edit's size; the choice is timed once, stored, and QIE_ATTENTION=triton bypasses it."""
    monkeypatch.setattr(ops, "_BACKENDS", {})
    monkeypatch.setattr(ops, "_BACKENDS_PATH", [None])
    ops.remember_kernel_choices(tmp_path)
    B, S, H, D = len(kv_host), 8552, 24, 128
    q, k, v, k0, v0 = _qkv(B, S, H, D, kv_host, device="cuda", dtype=torch.bfloat16, seed=1)
    kv_len = torch.tensor(kv_host, dtype=torch.int32, device="cuda")
    ref = attention_ref(q, k0, v0, kv_len=kv_len).float()
    outs = {"cudnn": ops.sdpa_rows(q, k, v, kv_host),
            "chosen": ops.attention(q, k, v, kv_len=kv_len, kv_host=kv_host)}
    monkeypatch.setenv("QIE_ATTENTION", "triton")
    outs["ours"] = ops.attention(q, k, v, kv_len=kv_len, kv_host=kv_host)
    for name, out in outs.items():
        err = ((out.float() - ref).norm() / ref.norm()).item()
        print(f"{kv_host} {name}: rel L2 {err:.2e}")
        assert not out.isnan().any() and err < 1e-2, (name, err)
    stored = json.loads((tmp_path / "attention_backends.json").read_text())
    assert len(stored) == 1 and list(stored.values())[0] in ("ours", "cudnn")
    print("chosen:", stored)
