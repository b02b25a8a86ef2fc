"""Tiny random snapshots saved by the reference libraries' own save_pretrained, in the layout users download."""
import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run under the interpreter on CPU-only machines (CI)
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_MMDIT = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                  num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(8, 12, 12))
TINY_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True])
SCHEDULER = dict(  # the published Qwen-Image-Edit scheduler config
    base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192, max_shift=0.9,
    num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False,
    time_shift_type="exponential", use_beta_sigmas=False, use_dynamic_shifting=True,
    use_exponential_sigmas=False, use_karras_sigmas=False)


def randomize_(module, seed, scale=0.2):
    """Random weights everywhere, norm weights too (ones would hide a missing norm weight)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() <= 1 and ("norm" in name or "gamma" in name):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return module


def make_transformer(seed=0, **overrides):
    from diffusers import QwenImageTransformer2DModel
    return randomize_(QwenImageTransformer2DModel(**{**TINY_MMDIT, **overrides}), seed).eval()


def make_vae(seed=1, scale=0.1):
    """scale 0.2 makes the decoded image follow its latents visibly (at 0.05 two unrelated latents decode
    within 8/255 of each other), for tests that must see conditioning move the pixels."""
    from diffusers import AutoencoderKLQwenImage
    g = torch.Generator().manual_seed(seed + 100)
    stats = dict(latents_mean=(0.5 * torch.randn(16, generator=g)).tolist(),
                 latents_std=(1 + torch.rand(16, generator=g)).tolist())
    return randomize_(AutoencoderKLQwenImage(**TINY_VAE, **stats), seed, scale=scale).eval()


def write_snapshot(root, transformer=None, vae=None):
    """Save components with diffusers' save_pretrained; the transformer sharded so the index path runs."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    if transformer is not None:
        transformer.save_pretrained(root / "transformer", max_shard_size="300KB")
    if vae is not None:
        vae.save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory):
    root = tmp_path_factory.mktemp("snap")
    t, v = make_transformer(), make_vae()
    write_snapshot(root, t, v)
    return root, t, v


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: one thread is as fast, and 2 OpenMP threads on a shared 2-core machine
    run 5-10x slower while a neighbour holds a core. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
