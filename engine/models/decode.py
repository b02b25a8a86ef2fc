"""Greedy decoding with Qwen2.5-VL (the Layered pipeline's automatic caption), on our text encoder.

As transformers' generate does for this model: a prefill over prompt + image (M-RoPE as in the prefill
path), then one token at a time with a per-layer KV cache; generated tokens take the same position on all
three M-RoPE axes, continuing from the prompt's largest position + 1 (transformers' rope_deltas:
position = cache index + max(prompt positions) + 1 - prompt length). Logits are lm_head(final norm) in
float32 (the head is embed_tokens when tie_word_embeddings). The snapshot's generation_config.json is
honoured as transformers honours it for a deterministic choice: repetition_penalty (every id seen so far,
prompt included: score / p where positive, score * p where negative), eos_token_id(s) stop. Sampling with
top_k = 1 (the published Qwen2.5-VL config: do_sample, temperature 0.1, top_p 0.001, top_k 1) keeps only
the top token after the penalty, so it is this greedy argmax; other sampling settings are decoded greedily.
"""
import torch
import torch.nn.functional as F

from engine import ops
from engine.models.text_encoder import mrope_positions
from engine.models.vision import rotate_half


def generation_settings(d, config=None):
    """generation_config.json (dict or None) [+ config.json] -> (repetition_penalty, eos ids, greedy_exact)."""
    d, config = d or {}, config or {}
    eos = d.get("eos_token_id", config.get("eos_token_id", (config.get("text_config") or {}).get("eos_token_id")))
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    penalty = float(d.get("repetition_penalty") or 1.0)
    exact = not d.get("do_sample", False) or d.get("top_k") == 1
    return penalty, eos, exact


def _embed(model, ids, pixel_values, image_grid_thw):
    device = model.norm.weight.device
    x = model.embed_tokens(ids.to(model.embed_tokens.weight.device)).to(device)   # [1, L, D]
    is_image = ids.to(device) == model.cfg.image_token_id
    if pixel_values is not None:
        x[is_image] = model.visual(pixel_values, image_grid_thw).to(x.dtype)
    merge = model.visual.cfg.spatial_merge_size
    grids = [tuple(g) for g in image_grid_thw.tolist()] if image_grid_thw is not None else []
    pos = mrope_positions(ids.cpu(), torch.tensor([ids.shape[1]]), model.cfg.image_token_id, grids, False, merge)
    return x, pos


def _step(model, x, pos, cache):
    """x [1, S, D] at positions [3, 1, S]; cache: list of (k, v) per layer (appended to) -> hidden [1, S, D]."""
    cos, sin = model.rope(pos, x.dtype)
    c, s = cos[:, :, None], sin[:, :, None]
    for i, layer in enumerate(model.layers):
        a = layer.self_attn
        h = layer.input_layernorm(x)
        B, S, _ = h.shape
        q = a.q_proj(h).view(B, S, a.heads, -1)
        k = a.k_proj(h).view(B, S, a.kv_heads, -1)
        v = a.v_proj(h).view(B, S, a.kv_heads, -1)
        q, k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
        if i < len(cache):
            k, v = torch.cat([cache[i][0], k], 1), torch.cat([cache[i][1], v], 1)
            cache[i] = (k, v)
        else:
            cache.append((k, v))
        kv_len = torch.full((B,), k.shape[1], dtype=torch.int32, device=x.device)
        out = ops.attention(q, k, v, kv_len=kv_len, causal=S > 1)    # S = 1: the one query sees every key
        x = x + a.o_proj(out.reshape(B, S, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.norm(x)


def _logits(model, hidden):
    return F.linear(hidden, model.lm_head_weight()).float()             # [1, vocab]


def _choose(logits, seen, penalty):
    if penalty != 1.0:
        idx = torch.tensor(seen, device=logits.device)[None]
        score = logits.gather(1, idx)
        logits = logits.scatter(1, idx, torch.where(score < 0, score * penalty, score / penalty))
    return int(logits.argmax(-1))


@torch.no_grad()
def greedy_decode(model, input_ids, pixel_values=None, image_grid_thw=None, max_new_tokens=512, eos=(),
                  repetition_penalty=1.0, use_cache=True):
    """input_ids [1, L] (no padding) -> the generated ids (list, the eos token included when reached).
    use_cache=False re-runs the whole prefill for every token (a check of the cache and the positions)."""
    if input_ids.shape[0] != 1:
        raise ValueError("greedy_decode takes one row")
    seen, out = input_ids[0].tolist(), []
    if use_cache:
        x, pos = _embed(model, input_ids, pixel_values, image_grid_thw)
        cache = []
        hidden = _step(model, x, pos, cache)[:, -1]
        nxt = int(pos.max()) + 1
    for t in range(max_new_tokens):
        if not use_cache:
            ids = torch.tensor([seen])
            hidden = model.forward_packed(ids, torch.tensor([len(seen)]), pixel_values, image_grid_thw)[:, -1]
        token = _choose(_logits(model, hidden), seen, repetition_penalty)
        seen.append(token)
        out.append(token)
        if token in eos or t == max_new_tokens - 1:
            break
        if use_cache:
            x = model.embed_tokens(torch.tensor([[token]], device=model.embed_tokens.weight.device))
            pos = torch.full((3, 1, 1), nxt + t, dtype=torch.long)
            hidden = _step(model, x.to(model.norm.weight.device), pos, cache)[:, -1]
    return out
