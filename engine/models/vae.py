"""Qwen-Image VAE, image path, as a plain 2D conv net.

The checkpoint is a causal 3D (video) VAE. An image is one frame: causal zero padding leaves each 3x3x3
conv only its last time slice, and the temporal resample convs are skipped on the first frame, so the
image path is 2D convs with weight[:, :, -1] (loaders/vae_layout.py converts the checkpoint).

Parameter names equal the checkpoint keys (minus time_conv). Norms are per pixel (RMS over channels);
the only global op is the single-head attention of each mid block, which runs at latent resolution.
"""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.config import VAEConfig
from loaders import assign
from loaders.vae_layout import to_2d


class RMSNorm(nn.Module):
    """x / ||x||_C * sqrt(C) * gamma, per pixel of [B, C, H, W]; 16-bit inputs normalize in float32."""

    def __init__(self, dim):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x):
        xn = F.normalize(x.float() if x.element_size() < 4 else x, dim=1).to(x.dtype)
        return xn * self.scale * self.gamma


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = RMSNorm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = RMSNorm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)))
        return self.conv2(F.silu(self.norm2(x))) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W pixels, head dim = C."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)   # [B, HW, 3C]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)                   # [B, 1, HW, C] each
        o = _attention(q, k, v)                                       # [B, 1, HW, C]
        o = o.reshape(b, h, w, c).permute(0, 3, 1, 2)                 # [B, C, H, W] (channels_last view)
        return self.proj(o) + x


def _attention(q, k, v):
    """SDPA held to the memory-efficient kernel on CUDA: left to choose, SDPA took a path that held the
    [HW, HW] float32 scores for an image from the pipeline (1 GiB at 1024^2 on an H100; it would need
    144 GiB at 4096x3072). If the kernel refuses the views (strides), it gets contiguous copies; only then
    SDPA's own choice, with a warning."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        for args in ((q, k, v), (q.contiguous(), k.contiguous(), v.contiguous())):
            try:
                return F.scaled_dot_product_attention(*args)
            except torch.OutOfMemoryError:
                raise           # a budget problem, not a kernel choice: no silent fallback
            except RuntimeError:   # "No available kernel"
                pass
    warnings.warn("VAE attention: the memory-efficient SDPA kernel refused these inputs; using SDPA's own "
                  "choice, which may hold the full [HW, HW] score matrix", stacklevel=2)
    return F.scaled_dot_product_attention(q, k, v)


class Resample(nn.Module):
    """up: nearest x2 then 3x3 conv C -> C/2. down: zero pad right/bottom by 1, 3x3 stride-2 conv C -> C."""

    def __init__(self, dim, up):
        super().__init__()
        if up:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))

    def forward(self, x):
        return self.resample(x)


class MidBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(dim, dim), ResBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttnBlock(dim)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class UpBlock(nn.Module):
    def __init__(self, cin, cout, num_res_blocks, up):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(cin if j == 0 else cout, cout) for j in range(num_res_blocks + 1)])
        self.upsamplers = nn.ModuleList([Resample(cout, up=True)]) if up else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


def _encoder_dims(cfg):
    return [cfg.base_dim * m for m in (1,) + tuple(cfg.dim_mult)]


def _decoder_dims(cfg):
    mult = tuple(cfg.dim_mult)
    return [cfg.base_dim * m for m in (mult[-1],) + mult[::-1]]


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dims, n = _encoder_dims(cfg), len(cfg.dim_mult)
        self.conv_in = nn.Conv2d(cfg.input_channels, dims[0], 3, padding=1)
        blocks = []
        for i in range(n):                       # block i: num_res_blocks resnets, then /2 unless last
            cin = dims[i]
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cin, dims[i + 1]))
                cin = dims[i + 1]
            if i != n - 1:
                blocks.append(Resample(dims[i + 1], up=False))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def down_path(self, x):
        """[B, 3, H, W] -> [B, C, H/8, W/8]; spatially local, so it may run in tiles."""
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return x

    def latent_path(self, x):
        """[B, C, h, w] -> [B, 2z, h, w]; holds the attention, so it runs whole."""
        return self.conv_out(F.silu(self.norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dims, n = _decoder_dims(cfg), len(cfg.dim_mult)
        self.conv_in = nn.Conv2d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        # block i >= 1 takes dims[i] // 2 channels: the previous block's upsample conv halves them
        self.up_blocks = nn.ModuleList([
            UpBlock(dims[i] if i == 0 else dims[i] // 2, dims[i + 1], cfg.num_res_blocks, up=i != n - 1)
            for i in range(n)])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = nn.Conv2d(dims[-1], cfg.input_channels, 3, padding=1)

    def latent_path(self, z):
        """[B, z, h, w] -> [B, C, h, w]; holds the attention, so it runs whole."""
        return self.mid_block(self.conv_in(z))

    def up_path(self, x):
        """[B, C, h, w] -> [B, 3, 8h, 8w]; spatially local, so it may run in tiles."""
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


def decoder_halo(cfg):
    """Latent px of context the decoder's up path needs past a tile edge for an exact result: 13 for
    Qwen-Image (dim_mult 4 long, 2 res blocks). Walk back from the output: conv_out needs 1 px; each up
    block's resnets 2 x (num_res_blocks + 1) 3x3 convs, +1 px each; an upsample's 3x3 conv +1 px at its
    high resolution, then nearest x2 maps h px past an even-aligned edge onto ceil(h / 2) low-res px.
    1 -> +6 = 7 -> (8 -> 4) +6 = 10 -> (11 -> 6) +6 = 12 -> (13 -> 7) +6 = 13."""
    n, h = len(cfg.dim_mult), 1
    for i in reversed(range(n)):
        if i != n - 1:
            h = (h + 2) // 2                     # ceil((h + 1) / 2)
        h += 2 * (cfg.num_res_blocks + 1)
    return h


def encoder_halo(cfg):
    """Latent px of context the encoder's down path needs past a tile edge: 9 for Qwen-Image. Walk back
    from its latent output: each block's resnets 2 x num_res_blocks convs, +1 px each; a downsample
    output range [a, b] reads its (0,1,0,1)-padded input [2a, 2b + 2], so h -> 2h + 1; conv_in +1.
    4 -> 9 +4 = 13 -> 27 +4 = 31 -> 63 +4 = 67, +1 = 68 px at full resolution = ceil(68 / 8) = 9 latent px.
    Tile inputs start on multiples of 8 px, so every stride-2 conv keeps the untiled sampling grid."""
    n, h = len(cfg.dim_mult), 0
    for i in reversed(range(n)):
        if i != n - 1:
            h = 2 * h + 1
        h += 2 * cfg.num_res_blocks
    return -(-(h + 1) // cfg.scale_factor)     # + conv_in, then ceil to latent px


def _memory_format(t):
    return torch.channels_last if t.is_cuda else torch.contiguous_format


def tiled(fn, x, tile, halo, in_scale, out_scale):
    """fn(x) for a spatially local `fn`, computed in tiles of `tile` x `tile` latent px. Each tile reads
    `halo` latent px of context on every side (clipped at the image border, where fn zero-pads exactly
    as untiled) and its output is cropped back to the tile: no blending, equal to fn(x) when `halo`
    covers fn's receptive field. x has `in_scale` px per latent px, fn's output `out_scale`."""
    lh, lw = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    if tile is not None and tile < 1:
        raise ValueError(f"tile must be a positive number of latent px, got {tile}")
    if tile is None or (tile >= lh and tile >= lw):
        return fn(x)
    out, s = None, out_scale
    for y0 in range(0, lh, tile):
        for x0 in range(0, lw, tile):
            y1, x1 = min(y0 + tile, lh), min(x0 + tile, lw)
            a0, a1 = max(y0 - halo, 0), min(y1 + halo, lh)        # context rows, latent px
            b0, b1 = max(x0 - halo, 0), min(x1 + halo, lw)        # context columns
            part = fn(x[:, :, a0 * in_scale:a1 * in_scale, b0 * in_scale:b1 * in_scale])
            if out is None:
                out = torch.empty(*part.shape[:2], lh * s, lw * s, dtype=part.dtype, device=part.device,
                                  memory_format=_memory_format(part))
            out[:, :, y0 * s:y1 * s, x0 * s:x1 * s] = part[:, :, (y0 - a0) * s:(y1 - a0) * s,
                                                              (x0 - b0) * s:(x1 - b0) * s]
    return out


class QwenImageVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        z = cfg.z_dim
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        self.decoder = Decoder(cfg)

    def _prep(self, x, multiple):
        if x.dim() != 4 or x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(f"expected [B, C, H, W] with H, W multiples of {multiple}, got {tuple(x.shape)}")
        # a fresh tensor in the canonical layout: views (an image permuted from HWC) keep odd strides on
        # size-1 dims, which follow the activations down to the attention
        return x.to(self.quant_conv.weight.dtype).clone(memory_format=_memory_format(x))

    @torch.inference_mode()
    def encode(self, image, tile=None):
        """image [B, 3, H, W] in [-1, 1] -> posterior mean [B, z, H/8, W/8] (raw, not normalized).
        tile: down-path tile size in latent px (None = whole image)."""
        f = self.cfg.scale_factor
        x = tiled(self.encoder.down_path, self._prep(image, f), tile, encoder_halo(self.cfg), f, 1)
        moments = self.quant_conv(self.encoder.latent_path(x))       # [B, 2z, h, w]: mean, logvar
        return moments[:, :self.cfg.z_dim].contiguous()

    @torch.inference_mode()
    def decode(self, z, tile=None):
        """z [B, z, h, w] raw latents -> image [B, 3, 8h, 8w] in [-1, 1].
        tile: up-path tile size in latent px (None = whole image)."""
        x = self.decoder.latent_path(self.post_quant_conv(self._prep(z, 1)))
        x = tiled(self.decoder.up_path, x, tile, decoder_halo(self.cfg), 1, self.cfg.scale_factor)
        return x.clamp_(-1.0, 1.0).contiguous()

    def _stats(self, z):
        # as QwenImageEditPipeline: float32 tensors from the config lists, then cast to z's dtype
        shape = (1, -1) + (1,) * (z.dim() - 2)
        mean = torch.tensor(self.cfg.latents_mean).view(shape).to(z.device, z.dtype)
        std = torch.tensor(self.cfg.latents_std).view(shape).to(z.device, z.dtype)
        return mean, std

    def normalize(self, z):
        """Raw latents -> the MMDiT's latent space (the pipeline's _encode_vae_image)."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z):
        """MMDiT latents -> raw latents; divides by 1/std (in z's dtype) as the pipeline does."""
        mean, std = self._stats(z)
        return z / (1.0 / std) + mean


def load_vae(snapshot, dtype=torch.float32, device="cpu"):
    """The VAE of a loaders.Snapshot: config -> 2D module on meta -> checked assign -> device, eval."""
    cfg = VAEConfig.from_dict(snapshot.config("vae"))
    state = to_2d(snapshot.weights("vae", dtype=dtype))
    with torch.device("meta"):
        vae = QwenImageVAE(cfg)
    assign(vae, state, "vae")
    return to_device(vae, device).eval()


def to_device(vae, device):
    """Move the VAE; on CUDA its conv weights go channels-last like its activations (no per-call copies)."""
    vae = vae.to(device)
    if torch.device(device).type == "cuda":
        vae = vae.to(memory_format=torch.channels_last)
    return vae
