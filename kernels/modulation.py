"""LayerNorm (no affine) + adaptive modulation, and the gated residual, for the MMDiT blocks.

Modulation parameters are [B, C] (one set per batch row) or [B, 2, C] with `split`: tokens [0, split) take
set 0 and tokens [split, S) take set 1 (zero_cond_t models: the condition-image tokens use the t=0 set).
The *_ref functions are the float32 torch references.
"""
import torch


def _per_token(p, seq_len, split):
    """[B, C] -> [B, 1, C]; [B, 2, C] with split -> [B, S, C] float32."""
    p = p.float()
    if p.dim() == 2:
        return p[:, None, :]
    idx = (torch.arange(seq_len, device=p.device) >= split).long()  # [S]
    return p[:, idx, :]


def norm_modulate_ref(x, shift, scale, split=None, eps=1e-6):
    """x [B, S, C] -> LayerNorm(x) * (1 + scale) + shift, in x's dtype."""
    S = x.shape[1]
    xf = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (xf * (1 + _per_token(scale, S, split)) + _per_token(shift, S, split)).to(x.dtype)


def gated_residual_ref(x, gate, y, split=None):
    """x + gate * y, x and y [B, S, C]."""
    return (x.float() + _per_token(gate, x.shape[1], split) * y.float()).to(x.dtype)


def gated_residual_norm_modulate_ref(x, gate, y, shift, scale, split=None, eps=1e-6):
    """(x + gate * y, norm_modulate(x + gate * y)): the residual and the next sub-block's input."""
    h = gated_residual_ref(x, gate, y, split)
    return h, norm_modulate_ref(h, shift, scale, split, eps)
