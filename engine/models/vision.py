"""Qwen2.5-VL vision tower: flattened patches -> merged image tokens for the language model.

Patches arrive in merge-block order (each run of m*m = 4 rows is one 2x2 block). They are reordered so
each attention window (window_size 112 px = 4x4 merged tokens = 8x8 patches) is contiguous; windowed
blocks attend within windows, the blocks at fullatt_block_indexes across each whole image. Segments of
different lengths run as one padded batch through ops.attention with a per-row kv_len. The merger
RMS-normalizes, concatenates each 2x2 block into one vector and projects it to the LM width; the
window order is undone at the end.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from loaders import LoadError

from engine import ops


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    hidden_act: str = "silu"

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, d, where="text_encoder/config.json vision_config"):
        kwargs = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kwargs["fullatt_block_indexes"] = tuple(kwargs.get("fullatt_block_indexes", cls.fullatt_block_indexes))
        if "in_channels" not in d and "in_chans" in d:
            kwargs["in_channels"] = d["in_chans"]
        rope = d.get("rope_parameters") or {}
        kwargs["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", cls.rope_theta)))
        cfg = cls(**kwargs)
        if cfg.hidden_act != "silu":
            raise LoadError(f"{where}: hidden_act {cfg.hidden_act!r} is not Qwen2.5-VL's silu")
        if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
            raise LoadError(f"{where}: hidden_size/num_heads must be a multiple of 4")
        return cfg


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # statistics in float32, the scale applied in the input dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Segments:
    """Consecutive segments of a packed sequence (boundaries `cu` [S+1]) gathered into a padded batch
    [S, Lmax] so one ops.attention call with kv_len = segment lengths runs them all."""

    def __init__(self, cu):
        lengths = cu[1:] - cu[:-1]                                   # [S]
        offsets = torch.arange(int(lengths.max()), device=cu.device)
        self.valid = offsets[None] < lengths[:, None]                # [S, Lmax]
        self.index = torch.where(self.valid, cu[:-1, None] + offsets[None], 0)
        self.lengths = lengths.to(torch.int32)

    def attend(self, q, k, v):
        """q, k, v [N, H, D] -> [N, H, D]; tokens attend only within their segment."""
        if self.index.shape[0] == 1:
            return ops.attention(q[None], k[None], v[None])[0]
        out = ops.attention(q[self.index], k[self.index], v[self.index], kv_len=self.lengths)
        return out[self.valid]  # padded rows dropped; row-major order is the packed order


class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x, cos, sin, segments):
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.heads, -1).unbind(1)  # [N, H, hd]
        c, s = cos[:, None], sin[:, None]                           # [N, 1, hd] float32
        q = (q.float() * c + rotate_half(q.float()) * s).to(x.dtype)
        k = (k.float() * c + rotate_half(k.float()) * s).to(x.dtype)
        return self.proj(segments.attend(q, k, v).reshape(N, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, cfg.out_hidden_size))

    def forward(self, x):  # [N, D] -> [N/m², out]: each run of m² rows is one merge block
        x = self.ln_q(x)
        return self.mlp(x.reshape(-1, self.mlp[0].in_features))


def patch_positions(grids, m):
    """(row, col) of every patch [N, 2] in merge-block order, frames repeated."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        pos = torch.stack([rows, cols], -1).reshape(h // m, m, w // m, m, 2).transpose(1, 2).reshape(-1, 2)
        out.append(pos.repeat(t, 1))
    return torch.cat(out)


def window_order(grids, m, window):
    """Merge-block permutation that makes each window of `window`x`window` blocks contiguous, and the
    boundaries of the windows in patches. Windows are cut per frame, row-major, edge windows partial."""
    order, cu, offset = [], [0], 0
    for t, h, w in grids:
        gh, gw = h // m, w // m
        idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
        idx = F.pad(idx, (0, -gw % window, 0, -gh % window), value=-1)
        nh, nw = idx.shape[1] // window, idx.shape[2] // window
        idx = idx.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
        for count in (idx >= 0).sum(-1).tolist():  # padding < window, so no window is empty
            cu.append(cu[-1] + count * m * m)
        order.append(idx[idx >= 0] + offset)
        offset += t * gh * gw
    return torch.cat(order), torch.tensor(cu)


class VisionTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        patch = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        self.patch_embed = nn.Linear(patch, cfg.hidden_size, bias=False)  # the Conv3d, kernel == stride
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def rope(self, grids, device):
        """cos, sin [N, hd] float32: half the rotary frequencies follow the row, half the column."""
        dim = self.cfg.head_dim // 2
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        pos = patch_positions(grids, self.cfg.spatial_merge_size)
        freqs = (pos[..., None].float() * inv_freq).flatten(1)  # [N, hd/2]: row freqs, then column freqs
        emb = torch.cat([freqs, freqs], -1).to(device)
        return emb.cos(), emb.sin()

    @torch.no_grad()
    def forward(self, pixel_values, grid_thw):
        """pixel_values [N, C*T*P*P] (processor order), grid_thw [I, 3] -> [N/m², out_hidden_size]."""
        cfg, m2 = self.cfg, self.cfg.spatial_merge_size ** 2
        grids = [tuple(g) for g in grid_thw.tolist()]
        device = self.patch_embed.weight.device
        x = self.patch_embed(pixel_values.to(device, self.patch_embed.weight.dtype))  # [N, D]
        blocks, cu_windows = window_order(grids, cfg.spatial_merge_size,
                                          cfg.window_size // cfg.spatial_merge_size // cfg.patch_size)
        order = (blocks[:, None] * m2 + torch.arange(m2)).flatten().to(device)  # patch permutation
        cos, sin = self.rope(grids, device)
        x, cos, sin = x[order], cos[order], sin[order]
        frames = torch.tensor([0] + [h * w for t, h, w in grids for _ in range(t)]).cumsum(0)
        full, windows = Segments(frames.to(device)), Segments(cu_windows.to(device))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if i in cfg.fullatt_block_indexes else windows)
        return self.merger(x)[torch.argsort(blocks).to(device)]
