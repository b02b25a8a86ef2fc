"""engine/vae.py and loaders/vae_layout.py against diffusers' AutoencoderKLQwenImage on random weights."""
import json

import pytest
import torch

from engine.models.vae import QwenImageVAE, load_vae
from loaders import LoadError, Snapshot, save_component
from loaders.vae_layout import to_2d, to_3d

import diffusers  # the reference, a test dependency: missing means a broken install, not a skip

# Real structure (dim_mult 4 long, 2 res blocks, temporal flags as Qwen-Image), tiny widths.
CONFIG = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
              temperal_downsample=[False, True, True], dropout=0.0, input_channels=3,
              latents_mean=[-0.75, 0.1, 0.97, -0.29], latents_std=[2.8, 1.45, 0.62, 1.9])
RTOL = 2e-5   # max |ours - ref| / max |ref|, float32. Reached: encode ~6e-7, decode ~1.1e-5, where diffusers
# itself is 5.6e-6 from a float64 run (the deep decoder sits at the float32 noise floor).


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(model, seed):
    """Every parameter random (gammas around 1, not ones; biases non-zero; the unused first time slices
    and time_conv too, so the test sees whether they leak in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() // (p.shape[2] if p.dim() == 5 else 1)
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model


def make_snapshot(root, config=CONFIG, seed=0):
    """A diffusers VAE with random weights, saved by its own save_pretrained into root/vae."""
    ref = _randomize(diffusers.AutoencoderKLQwenImage(**config), seed).eval()
    ref.save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    return ref


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("snap")
    ref = make_snapshot(root)
    return ref, load_vae(Snapshot(root), dtype=torch.float32), root


def _check(ours, ref, what):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= RTOL * scale, f"{what}: max abs diff {err:.3g} (ref max {scale:.3g})"


def _ref_encode(ref, x):
    with torch.no_grad():
        return ref.encode(x.unsqueeze(2)).latent_dist.mode()[:, :, 0]


def _ref_decode(ref, z):
    with torch.no_grad():
        return ref.decode(z.unsqueeze(2)).sample[:, :, 0]


@pytest.mark.parametrize("hw", [(64, 64), (40, 72)])
def test_encode_matches_diffusers(models, hw):
    ref, vae, _ = models
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1)) * 2 - 1
    _check(vae.encode(x), _ref_encode(ref, x), f"encode {hw}")


@pytest.mark.parametrize("hw", [(8, 8), (5, 9)])
def test_decode_matches_diffusers(models, hw):
    ref, vae, _ = models
    z = torch.randn(2, CONFIG["z_dim"], *hw, generator=torch.Generator().manual_seed(2))
    want = _ref_decode(ref, z)
    assert (want.abs() < 1).float().mean() > 0.5, "reference output mostly clamped; test would be weak"
    _check(vae.decode(z), want, f"decode {hw}")


def test_bf16_no_worse_than_diffusers_bf16(models):
    """bf16 cannot match bit for bit (3D vs 2D conv accumulation), but our bf16 run must be as close to
    the float32 reference as diffusers' own bf16 run is (random deep nets amplify bf16 rounding to ~10%)."""
    ref, _, root = models
    vae = load_vae(Snapshot(root), dtype=torch.bfloat16)
    ref16 = diffusers.AutoencoderKLQwenImage.from_pretrained(root / "vae", torch_dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(5)
    x, z = torch.rand(2, 3, 40, 72, generator=g) * 2 - 1, torch.randn(2, CONFIG["z_dim"], 5, 9, generator=g)

    def rel(a, b):
        return ((a.float() - b).abs().max() / b.abs().max()).item()

    for ours, theirs, want, what in [(vae.encode(x), _ref_encode(ref16, x.bfloat16()), _ref_encode(ref, x), "encode"),
                                     (vae.decode(z), _ref_decode(ref16, z.bfloat16()), _ref_decode(ref, z), "decode")]:
        assert ours.dtype == torch.bfloat16
        assert rel(ours, want) <= 1.5 * rel(theirs, want) + 1e-3, f"{what}: ours {rel(ours, want):.3g}, " \
            f"diffusers {rel(theirs, want):.3g} off float32"


def test_layout_round_trip_loads_strictly_into_diffusers(models):
    ref, vae, _ = models
    ours = vae.state_dict()
    assert set(ours) == {k for k in ref.state_dict() if "time_conv" not in k}
    back = to_3d(to_2d(ref.state_dict()), CONFIG)
    fresh = diffusers.AutoencoderKLQwenImage(**CONFIG).eval()
    fresh.load_state_dict(back, strict=True)
    # zeroed first time slices and time_conv change nothing for an image
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z = torch.randn(1, CONFIG["z_dim"], 4, 6, generator=torch.Generator().manual_seed(4))
    _check(_ref_encode(fresh, x), _ref_encode(ref, x), "round-trip encode")
    _check(_ref_decode(fresh, z), _ref_decode(ref, z), "round-trip decode")
    # and from our own module's state (what the demo writer saves)
    diffusers.AutoencoderKLQwenImage(**CONFIG).load_state_dict(to_3d(ours, CONFIG), strict=True)


def _broken_snapshot(root, models, edit):
    _, _, good = models
    state = Snapshot(good).weights("vae")
    edit(state)
    save_component(root / "vae", state, json.loads((good / "vae" / "config.json").read_text()))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    return Snapshot(root)


def test_wrong_shape_and_missing_key_raise(models, tmp_path):
    key = "decoder.up_blocks.1.resnets.0.conv1.weight"

    def shrink(s):
        s[key] = s[key][:-1]

    with pytest.raises(LoadError, match=key.replace(".", r"\.")):
        load_vae(_broken_snapshot(tmp_path / "a", models, shrink))
    missing = "encoder.mid_block.attentions.0.to_qkv.weight"
    with pytest.raises(LoadError, match=missing.replace(".", r"\.")):
        load_vae(_broken_snapshot(tmp_path / "b", models, lambda s: s.pop(missing)))


def test_full_size_builds_on_meta_with_checkpoint_shapes():
    from engine.config import VAEConfig
    with torch.device("meta"):
        vae = QwenImageVAE(VAEConfig())                       # Qwen-Image's own config
        ref = diffusers.AutoencoderKLQwenImage()
    want = {k: tuple(v.shape) for k, v in to_2d(ref.state_dict()).items()}
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_normalize_bit_equal_to_pipeline(models, dtype):
    _, vae, _ = models
    z = (torch.randn(2, CONFIG["z_dim"], 1, 5, 9) * 3).to(dtype)   # pipeline layout [B, C, T, h, w]
    c = CONFIG["z_dim"]
    # QwenImageEditPipeline._encode_vae_image
    mean = torch.tensor(CONFIG["latents_mean"]).view(1, c, 1, 1, 1).to(z.device, z.dtype)
    std = torch.tensor(CONFIG["latents_std"]).view(1, c, 1, 1, 1).to(z.device, z.dtype)
    assert torch.equal(vae.normalize(z[:, :, 0]), ((z - mean) / std)[:, :, 0])
    # QwenImageEditPipeline.__call__, before vae.decode
    inv_std = 1.0 / torch.tensor(CONFIG["latents_std"]).view(1, c, 1, 1, 1).to(z.device, z.dtype)
    assert torch.equal(vae.denormalize(z[:, :, 0]), (z / inv_std + mean)[:, :, 0])
