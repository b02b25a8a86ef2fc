"""GPU: what the VRAM budget work relies on and the CPU cannot show.
Run on the device machine: python -m pytest -q -m gpu tests/test_gpu_budget.py
(Written after the last H100 session: these have not run on a GPU yet.)"""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import VAEConfig
from engine.vram.memory import activation_bytes
from engine.pipelines.common import image_to_tensor
from engine.models.vae import QwenImageVAE, to_device

pytestmark = pytest.mark.gpu
GiB = 2 ** 30


def _random_vae():
    vae = QwenImageVAE(VAEConfig()).to(torch.bfloat16)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.02)
    return to_device(vae, "cuda").eval()


def test_vae_encode_of_a_pipeline_image_stays_in_its_estimate():
    """An image as the pipeline makes it (a permuted HWC view) once sent SDPA down a path holding the
    1 GiB [HW, HW] score matrix: the encode must stay within the memory model, with no fallback warning."""
    vae = _random_vae()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    x = image_to_tensor(image, 1024, 1024).to("cuda", torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vae.encode(x)                                   # warm-up: cuDNN plans
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        vae.encode(x)
        torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - base
    assert used <= 1.05 * activation_bytes(vae.cfg, 128, 128, None, torch.bfloat16, encode=True), used / GiB


def test_attention_choices_are_reused(tmp_path, monkeypatch):
    """The autotuned block shape is stored with the GPU's name; a later process reuses it bit for bit."""
    import kernels.attention as A
    monkeypatch.setattr(A, "_CHOICES", {})
    monkeypatch.setattr(A, "_CHOICES_PATH", [None])
    path = tmp_path / "choices.json"
    A.remember_choices(path)
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 3000, 24, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    kv_len = torch.tensor([2800], device="cuda", dtype=torch.int32)
    first = A.attention(q, k, v, kv_len=kv_len)
    (key, cfg), = json.loads(path.read_text()).items()
    assert torch.cuda.get_device_name() in key and "|S 4096|D 128|" in key
    monkeypatch.setattr(A, "_CHOICES", {})
    A.remember_choices(path)

    class NoTuning:
        def __getitem__(self, grid):
            raise AssertionError("autotuned although a stored choice exists")

    monkeypatch.setattr(A, "_attn_fwd", NoTuning())
    assert torch.equal(A.attention(q, k, v, kv_len=kv_len), first)
