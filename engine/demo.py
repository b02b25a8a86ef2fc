"""A tiny random-weight snapshot written by the engine itself, in the layout diffusers saves, plus a sample
image: `python cli.py demo` runs the whole edit with no download. The weights are random: the output is
noise-like by design; the demo shows the pipeline, its timings and its memory, not image quality."""
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from loaders import save_component, write_tensors
from loaders.vae_layout import to_3d

from engine.config import MMDiTConfig, VAEConfig
from engine.models.mmdit import MMDiT
from engine.models.vae import QwenImageVAE

DEMO_MMDIT = MMDiTConfig(num_layers=2, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                         axes_dims_rope=(8, 12, 12))
DEMO_VAE = VAEConfig(base_dim=16, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
DEMO_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                      max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                      stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                      use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)
VERSION = "1"  # bump when the demo snapshot's contents change


def _config_dict(cfg, class_name):
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    return {"_class_name": class_name, **d}


def write_demo_snapshot(root, seed=0):
    """Write the demo snapshot to `root` (through a temporary folder renamed at the end)."""
    root = Path(root)
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    mmdit = MMDiT(DEMO_MMDIT)
    save_component(tmp / "transformer", mmdit.state_dict(), _config_dict(DEMO_MMDIT, "QwenImageTransformer2DModel"),
                   shard_bytes=2_000_000)
    vae = QwenImageVAE(DEMO_VAE)
    save_component(tmp / "vae", to_3d(vae.state_dict(), DEMO_VAE), _config_dict(DEMO_VAE, "AutoencoderKLQwenImage"))
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", **DEMO_SCHEDULER}, indent=2))
    g = torch.Generator().manual_seed(seed + 1)
    dim = DEMO_MMDIT.joint_attention_dim
    write_tensors({"prompt_embeds": torch.randn(1, 24, dim, generator=g),
                   "prompt_embeds_mask": torch.ones(1, 24, dtype=torch.int64),
                   "negative_prompt_embeds": torch.randn(1, 9, dim, generator=g),
                   "negative_prompt_embeds_mask": torch.ones(1, 9, dtype=torch.int64)},
                  tmp / "demo_prompt.safetensors")
    (tmp / "model_index.json").write_text(json.dumps(
        {"_class_name": "QwenImageEditPipeline", "_demo_version": VERSION,
         "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
         "transformer": ["diffusers", "QwenImageTransformer2DModel"],
         "vae": ["diffusers", "AutoencoderKLQwenImage"]}, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root


def demo_snapshot(cache_dir):
    """The cached demo snapshot under cache_dir, written on first use."""
    root = Path(cache_dir) / "demo-snapshot"
    index = root / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("_demo_version") == VERSION:
        return root, False
    return write_demo_snapshot(root), True


def sample_image(width=768, height=512):
    """A made-up scene (sky, hill, sun, house) so the demo needs no file."""
    img = Image.new("RGB", (width, height), (120, 170, 230))
    d = ImageDraw.Draw(img)
    d.rectangle([0, int(height * 0.62), width, height], fill=(70, 140, 60))
    d.ellipse([int(width * 0.72), int(height * 0.08), int(width * 0.88), int(height * 0.32)], fill=(250, 220, 90))
    x0, y0 = int(width * 0.2), int(height * 0.42)
    d.rectangle([x0, y0, x0 + int(width * 0.22), int(height * 0.72)], fill=(190, 90, 60))
    d.polygon([(x0 - 20, y0), (x0 + int(width * 0.11), y0 - int(height * 0.16)), (x0 + int(width * 0.22) + 20, y0)],
              fill=(110, 50, 40))
    return img
