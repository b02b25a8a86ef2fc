"""q/k RMSNorm (with weight) + rotary embedding in Qwen-Image's interleaved-pair form.

Pairs (x[2i], x[2i+1]) rotate by angle theta_i: (a, b) -> (a cos - b sin, a sin + b cos).
"""
import torch


def rms_norm_rope_ref(x, weight, cos, sin, eps=1e-6):
    """x [B, S, H, D]; weight [D]; cos, sin [S, D/2] float32. Returns [B, S, H, D] in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    a, b = xf.unflatten(-1, (-1, 2)).unbind(-1)  # [B, S, H, D/2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)
