"""Attention over [B, S, H, D] tensors with a per-batch valid key length.

attention_ref is the float32 torch reference; the Triton kernel and its launcher sit beside it.
"""
import torch
import torch.nn.functional as F


def attention_ref(q, k, v, kv_len=None, causal=False, scale=None):
    """q [B, Sq, H, D]; k, v [B, Sk, Hk, D] with H % Hk == 0 (grouped heads); kv_len int [B] or None:
    keys at index >= kv_len[b] are ignored. Returns [B, Sq, H, D] in q's dtype."""
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    qt, kt, vt = (t.transpose(1, 2).float() for t in (q, k, v))  # [B, H, S, D]
    if Hk != H:
        kt = kt.repeat_interleave(H // Hk, dim=1)
        vt = vt.repeat_interleave(H // Hk, dim=1)
    mask = None
    if kv_len is not None:
        keep = torch.arange(Sk, device=q.device)[None, :] < kv_len.to(q.device)[:, None]  # [B, Sk]
        mask = keep[:, None, None, :]
    if causal:
        tri = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
        mask = tri if mask is None else (mask & tri)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).to(q.dtype)
