"""Exact tiled VAE: tiled encode/decode equal the untiled ones (no blending, no seams)."""
import pytest
import torch

from engine.config import VAEConfig
from engine.models.vae import QwenImageVAE, decoder_halo, encoder_halo, tiled
from tests.test_vae import _randomize

TOL = 1e-4     # max abs diff at float32; reached <= 3.5e-6 (conv algorithms differ with the crop size)


pytestmark = pytest.mark.usefixtures("one_thread")


def _vae(num_res_blocks, dtype=torch.float32):
    cfg = VAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 2, 4, 4), num_res_blocks=num_res_blocks,
                    latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    return _randomize(QwenImageVAE(cfg), seed=5).to(dtype).eval()


@pytest.fixture(scope="module")
def vae():
    return _vae(2)      # Qwen-Image's structure: halos 13 (decoder) and 9 (encoder) latent px


def _diff(a, b):
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_halo_of_qwen_image():
    cfg = VAEConfig()
    assert (decoder_halo(cfg), encoder_halo(cfg)) == (13, 9)
    small = VAEConfig(num_res_blocks=1)
    assert (decoder_halo(small), encoder_halo(small)) == (9, 5)


# (batch, h, w, tile) in latent px: odd sizes, tiles that do not divide them, and sizes past tile + halo
# so that tiles have cut (non-image) edges inside their context, on both sides and in both axes.
@pytest.mark.parametrize("b,h,w,tile", [(1, 29, 31, 14), (1, 29, 17, 9), (2, 15, 33, 16)])
def test_decode_tiled_equals_untiled(vae, b, h, w, tile):
    z = torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(1))
    err = _diff(vae.decode(z, tile=tile), vae.decode(z))
    assert err <= TOL, f"tile {tile}: max abs diff {err:.3g}"


@pytest.mark.parametrize("b,h,w,tile", [(1, 23, 21, 10), (2, 11, 23, 12)])
def test_encode_tiled_equals_untiled(vae, b, h, w, tile):
    x = torch.rand(b, 3, 8 * h, 8 * w, generator=torch.Generator().manual_seed(2)) * 2 - 1
    err = _diff(vae.encode(x, tile=tile), vae.encode(x))
    assert err <= TOL, f"tile {tile}: max abs diff {err:.3g}"


def _two_tiles(fn, x, halo, in_scale, out_scale):
    """A strip 2 * halo + 2 latent px long cut into two tiles of halo + 1: each has a cut edge exactly
    `halo` px past its end (first tile) or before its start (second tile) when run with halo - 1."""
    return [tiled(fn, x, halo + 1, hh, in_scale, out_scale) for hh in (halo, halo - 1)]


def test_halo_is_exact_and_tight():
    """At float64: with the computed halo the tiled path equals the whole one to rounding (~2e-14);
    with one latent px less it does not. The far tail of the receptive field is small (3e-11 for the
    decoder, 2e-6 for the encoder), which float32 rounding would hide. (With 1 res block, halos 9 / 5,
    the same holds: 7e-7 / 2e-2 at one px less.)"""
    vae, g = _vae(2, torch.float64), torch.Generator().manual_seed(3)
    with torch.inference_mode():
        h = decoder_halo(vae.cfg)
        feats = vae.decoder.latent_path(torch.randn(1, 4, 2 * h + 2, 2, generator=g, dtype=torch.float64))
        whole = vae.decoder.up_path(feats)
        exact, short = _two_tiles(vae.decoder.up_path, feats, h, 1, 8)
        assert _diff(exact, whole) < 1e-13 < 1e-12 < _diff(short, whole)

        h = encoder_halo(vae.cfg)
        x = torch.rand(1, 3, 8 * (2 * h + 2), 16, generator=g, dtype=torch.float64) * 2 - 1
        whole = vae.encoder.down_path(x)
        exact, short = _two_tiles(vae.encoder.down_path, x, h, 8, 1)
        assert _diff(exact, whole) < 1e-13 < 1e-12 < _diff(short, whole)


def test_bytes_estimate():
    with torch.device("meta"):
        vae = QwenImageVAE(VAEConfig())
    from engine.vram.memory import activation_bytes
    est = lambda tile, dtype=torch.bfloat16: activation_bytes(vae.cfg, 128, 128, tile, dtype)
    whole = est(None)
    assert whole > est(64) > est(32) > 0
    assert est(200) == whole
    assert est(None, torch.float32) == 2 * whole
    # peaks measured on an H200, bf16, batch 1, random weights (GiB): (h, w, tile) -> decode, encode
    measured = {(128, 128, None): (1.328, 1.135), (128, 128, 64): (0.496, 0.389), (128, 128, 32): (0.290, 0.193),
                (384, 512, None): (15.938, 13.617), (384, 512, 64): (1.131, 1.125)}
    for (h, w, tile), (dec, enc) in measured.items():
        assert abs(activation_bytes(vae.cfg, h, w, tile) / 2 ** 30 / dec - 1) < 0.1, (h, w, tile)
        assert abs(activation_bytes(vae.cfg, h, w, tile, encode=True) / 2 ** 30 / enc - 1) < 0.1, (h, w, tile)
