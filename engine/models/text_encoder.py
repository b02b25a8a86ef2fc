"""Qwen2.5-VL prefill for Qwen-Image-Edit: prompt + image -> last hidden state after the final norm.

Rows are packed valid-tokens-first (whatever side the tokenizer padded), so causal attention with a
per-row kv_len is the whole mask. Image tokens take the vision tower's merged features; M-RoPE gives
text tokens one position on all three axes and image tokens (t, row, col) offsets from where the image
starts, text after an image resuming at start + max(rows, cols). Layers are a ModuleList of blocks so a
streaming offloader can move them one at a time.

Positions are M-RoPE as transformers' get_rope_index computes them, which is what the model was trained
with. Note diffusers <= 0.42.1 with transformers 5 does not pass mm_token_type_ids to the text encoder, so
the stock pipeline silently runs 1-D positions instead (diffusers issue #14194, PR #14189); we match the
pipeline with that fix applied.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from loaders import LoadError, Snapshot, assign, torch_dtype
from loaders.text_encoder_layout import convert_text_encoder_state

from engine import ops
from engine.text.processor import TEMPLATE_DROP, Processor
from engine.text.tokenizer import Tokenizer
from engine.models.embedding import embedding
from engine.models.vision import RMSNorm, SwiGLU, VisionConfig, VisionTower, rotate_half


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple = (16, 24, 24)
    image_token_id: int = 151655

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


def read_config(d, where="text_encoder/config.json"):
    """config.json -> (TextConfig, VisionConfig). transformers 5 nests the LM under text_config; older
    snapshots keep it at the top level (with rope_scaling/rope_theta instead of rope_parameters)."""
    text = d.get("text_config") or {}

    def get(key, default):
        return text.get(key, d.get(key, default))

    rope = get("rope_parameters", None) or get("rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise LoadError(f"{where}: rope type {rope_type!r} is not supported (Qwen2.5-VL uses plain M-RoPE)")
    if get("use_sliding_window", False):
        raise LoadError(f"{where}: use_sliding_window=true is not supported")
    if get("hidden_act", "silu") != "silu":
        raise LoadError(f"{where}: hidden_act {get('hidden_act', None)!r} is not Qwen2.5-VL's silu")
    kv_heads = get("num_key_value_heads", None) or get("num_attention_heads", TextConfig.num_attention_heads)
    cfg = TextConfig(
        vocab_size=get("vocab_size", TextConfig.vocab_size), hidden_size=get("hidden_size", TextConfig.hidden_size),
        intermediate_size=get("intermediate_size", TextConfig.intermediate_size),
        num_hidden_layers=get("num_hidden_layers", TextConfig.num_hidden_layers),
        num_attention_heads=get("num_attention_heads", TextConfig.num_attention_heads), num_key_value_heads=kv_heads,
        rms_norm_eps=get("rms_norm_eps", TextConfig.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", get("rope_theta", TextConfig.rope_theta))),
        mrope_section=tuple(rope.get("mrope_section", TextConfig.mrope_section)),
        image_token_id=d.get("image_token_id", TextConfig.image_token_id))
    if 2 * sum(cfg.mrope_section) != cfg.head_dim:
        raise LoadError(f"{where}: mrope_section {cfg.mrope_section} must sum to head_dim/2 = {cfg.head_dim // 2}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise LoadError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
    return cfg, VisionConfig.from_dict(d.get("vision_config") or {}, where + " vision_config")


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(self.heads * hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, kv_len):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.heads, -1)                # [B, L, H, hd]
        k = self.k_proj(x).view(B, L, self.kv_heads, -1)             # [B, L, Hk, hd]
        v = self.v_proj(x).view(B, L, self.kv_heads, -1)
        c, s = cos[:, :, None], sin[:, :, None]                      # [B, L, 1, hd] in x's dtype
        q, k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
        out = ops.attention(q, k, v, kv_len=kv_len, causal=True)
        return self.o_proj(out.reshape(B, L, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, cos, sin, kv_len):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


def mrope_positions(ids, lengths, image_token_id, grids, shared, merge):
    """ids [B, L] packed valid-first, lengths [B] -> positions [3, B, L] (t, row, col); pads get 0.
    Image spans take their (t, h, w) patch grids in order: every row from the start of `grids` when the
    images are shared by all rows, else one running sequence over the batch."""
    B, L = ids.shape
    pos = torch.zeros(3, B, L, dtype=torch.long)
    every = iter(grids)
    for b in range(B):
        n = int(lengths[b])
        is_image = (ids[b, :n] == image_token_id).cpu()
        cuts = (torch.nonzero(is_image[1:] != is_image[:-1]).flatten() + 1).tolist()
        row_grids, current = iter(grids) if shared else every, 0
        for s, e in zip([0] + cuts, cuts + [n]):
            if not is_image[s]:
                pos[:, b, s:e] = torch.arange(current, current + e - s)
                current += e - s
                continue
            t, h, w = next(row_grids)
            gh, gw = h // merge, w // merge
            if e - s != t * gh * gw:
                raise ValueError(f"row {b}: an image span of {e - s} tokens does not match its grid {(t, h, w)}")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            pos[:, b, s:e] = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + current
            current += max(gh, gw)
    return pos


class TextEncoder(nn.Module):
    def __init__(self, cfg, vision_cfg):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(vision_cfg)
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def rope(self, pos, dtype):
        """positions [3, B, L] -> cos, sin [B, L, hd]: frequency band i takes its angle from axis i % 3
        of the mrope_section split (t, row, col)."""
        hd = self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
        freqs = pos[..., None].float() * inv_freq                   # [3, B, L, hd/2]
        chunks = freqs.split(list(self.cfg.mrope_section), dim=-1)
        freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1).to(self.norm.weight.device)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @torch.no_grad()
    def forward_packed(self, ids, lengths, pixel_values=None, image_grid_thw=None):
        """ids [B, L] with each row's valid tokens first, lengths [B] -> hidden [B, L, D] after the final
        norm (pad rows hold finite junk). One image grid for all rows is shared by every row; otherwise
        grids are consumed by the image spans in row-major order, as transformers does."""
        device = self.norm.weight.device                             # the embedding table may stay on the host
        x = self.embed_tokens(ids.to(self.embed_tokens.weight.device)).to(device)   # [B, L, D]
        ids, lengths = ids.to(device), lengths.to(device)
        grids = [tuple(g) for g in image_grid_thw.tolist()] if image_grid_thw is not None else []
        valid = torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]
        is_image = (ids == self.cfg.image_token_id) & valid
        per_row, shared = is_image.sum(1), False
        if pixel_values is not None:
            feats = self.visual(pixel_values, image_grid_thw).to(x.dtype)  # [tokens of all grids, D]
            shared = len(ids) > 1 and bool((per_row == feats.shape[0]).all())
            if shared:
                feats = feats.repeat(len(ids), 1)
            if feats.shape[0] != int(per_row.sum()):
                raise ValueError(f"{int(per_row.sum())} image tokens in the prompts but {feats.shape[0]} features")
            x[is_image] = feats
        elif bool(is_image.any()):
            raise ValueError("the prompts hold image tokens but no pixel_values were given")
        merge = self.visual.cfg.spatial_merge_size
        pos = mrope_positions(ids, lengths, self.cfg.image_token_id, grids, shared, merge)
        cos, sin = self.rope(pos, x.dtype)
        kv_len = lengths.to(torch.int32)
        for layer in self.layers:
            x = layer(x, cos, sin, kv_len)
        return self.norm(x)

    def lm_head_weight(self):
        """[vocab, D]: needs load_text_encoder(..., lm_head=True)."""
        if getattr(self, "lm_head", None) is None:
            raise LoadError("this text encoder was loaded without its LM head (load_text_encoder(lm_head=True))")
        return self.lm_head.weight

    def forward(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None):
        """Processor outputs (either padding side) -> hidden [B, L, D] in the input's layout."""
        ids, lengths, order = pack_rows(input_ids, attention_mask)
        hidden = self.forward_packed(ids, lengths, pixel_values, image_grid_thw)
        order = order.to(hidden.device)[..., None].expand_as(hidden)
        return torch.zeros_like(hidden).scatter_(1, order, hidden)


def pack_rows(input_ids, attention_mask):
    """Move each row's valid tokens to the front, order kept: (ids, lengths, order) with ids = gather(order)."""
    keep = attention_mask.bool()
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    return input_ids.gather(1, order), keep.sum(1), order


def text_encoder_shapes(snapshot):
    """{parameter: shape} of the snapshot's text encoder (text_encoder/config.json), built on the meta device."""
    with torch.device("meta"):
        return {k: v.shape for k, v in TextEncoder(*read_config(snapshot.config("text_encoder"))).state_dict().items()}


def load_text_encoder(snapshot, dtype=torch.bfloat16, device="cpu", lm_head=False, file=None, weights=None):
    """Build on the meta device, assign the checkpoint (either key layout), move to device. lm_head=True
    (for decoding: engine.models.decode) adds `lm_head`, the embedding itself when tie_word_embeddings;
    otherwise lm_head is dropped. file: the weights from that one .safetensors (loaders.text_encoder_file:
    ComfyUI's qwen_2.5_vl_7b*.safetensors) instead of text_encoder/*.safetensors, which then needs only
    config.json; its fp8 language-model Linears stay fp8 (engine.transforms.fp8.FP8Linear) unless
    weights="bf16", which dequantizes them to `dtype` on load. model.source: None, or the file's load info."""
    snapshot = snapshot if isinstance(snapshot, Snapshot) else Snapshot(snapshot)
    dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    if weights not in (None, "bf16", "fp8"):
        raise LoadError(f"unknown text weights {weights!r}; use bf16 or fp8")
    config = snapshot.config("text_encoder")
    cfg, vision_cfg = read_config(config)
    with torch.device("meta"):
        model = TextEncoder(cfg, vision_cfg)
    index = snapshot.tensor_index("text_encoder", device) if file is None else None
    source = None
    if file is not None:
        from loaders.text_encoder_file import read_text_encoder_file
        from engine.transforms.fp8 import text_fp8_layer_names, use_fp8_linears
        allowed = text_fp8_layer_names(cfg.num_hidden_layers)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        state, source = read_text_encoder_file(file, dtype, expected, () if weights == "bf16" else allowed, lm_head)
        head = state.pop("lm_head.weight", None)
        use_fp8_linears(model, [k[:-len(".weight_scale")] for k in state if k.endswith(".weight_scale")], allowed)
        assign(model, state, str(file))
    elif index is not None:     # straight to `device`: allocated there, then filled by loaders.fast_read
        model, head = _read_placed(snapshot, model, index, dtype, device, lm_head)
    else:
        state = convert_text_encoder_state(snapshot.weights("text_encoder", dtype=dtype), keep_lm_head=lm_head)
        head = state.pop("lm_head.weight", None)
        assign(model, state, "text_encoder")
    model.source = source
    if lm_head:
        tied = (config.get("text_config") or {}).get("tie_word_embeddings", config.get("tie_word_embeddings", False))
        if not tied and head is None:
            raise LoadError(f"{file or 'text_encoder'}: lm_head.weight is missing and tie_word_embeddings is false "
                            "(the caption decodes with the LM head)")
        model.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
        model.lm_head.weight = model.embed_tokens.weight if tied else nn.Parameter(head, requires_grad=False)
    return model.requires_grad_(False).eval().to(device)


def _read_placed(snapshot, model, index, dtype, device, lm_head):
    """The meta-built model allocated on `device` and its checkpoint read into it (each file key renamed as
    convert_text_encoder_state renames it; the patch embedding read through a view in the file's shape).
    Returns (model, lm_head weight or None)."""
    from loaders import check_keys
    renamed = {}                                    # engine key -> (file key, meta tensor in the engine's shape)
    for key, info in index.items():
        meta = torch.empty(info.shape, dtype=info.dtype, device="meta")
        for new, t in convert_text_encoder_state({key: meta}, keep_lm_head=lm_head).items():
            renamed[new] = (key, t)
    head_entry = renamed.pop("lm_head.weight", None)
    model = model.to(dtype)                         # every tensor is floating: all `dtype`, as weights() casts
    check_keys({k: v.shape for k, v in model.state_dict().items()}, {k: t for k, (_, t) in renamed.items()},
               "text_encoder")
    model.to_empty(device=device)
    placed = model.state_dict()
    dests = {key: placed[new].view(index[key].shape) for new, (key, _) in renamed.items()}
    head = None
    if head_entry is not None:
        head = torch.empty(head_entry[1].shape, dtype=dtype, device=device)
        dests[head_entry[0]] = head
    snapshot.read_into(index, dests)
    return model, head


@torch.no_grad()
def encode_prompts(processor, text_encoder, prompts, images, template=None):
    """prompts (list of str) + the already-resized prompt image(s) -> (embeds [B, L, D], mask [B, L] int64),
    as the edit pipelines' _get_qwen_prompt_embeds: each row's valid hidden states minus the first 64
    template tokens, right-padded with zeros to the longest row. template: the pipeline's chat template
    (default: the processor's)."""
    if isinstance(processor, Tokenizer):
        processor = Processor(processor)
    inputs = processor(list(prompts), images, template)
    ids, lengths, _ = pack_rows(inputs["input_ids"], inputs["attention_mask"])
    hidden = text_encoder.forward_packed(ids, lengths, inputs["pixel_values"], inputs["image_grid_thw"])
    keep = (lengths - TEMPLATE_DROP).to(hidden.device)                 # [B]
    width = int(keep.max())
    mask = (torch.arange(width, device=hidden.device)[None] < keep[:, None]).to(torch.int64)
    embeds = hidden[:, TEMPLATE_DROP:TEMPLATE_DROP + width].masked_fill(mask[..., None] == 0, 0)
    return embeds, mask
