"""Qwen-Image MMDiT: dual-stream blocks over a joint [image, text] sequence.

Parameter names equal the checkpoint keys (transformer/*.safetensors), so loading needs no key map.
The joint sequence is laid out [image tokens, text tokens] with text padding last; attention takes the
valid key count per batch row (kv_len = N_img + txt_len[b]), so prompts of different lengths batch as one.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from loaders import LoadError, assign

from engine import ops
from engine.config import MMDiTConfig
from engine.models.embedding import embedding


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # float32 statistics; the normalized value is cast to the weight dtype before the product
        h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(self.weight.dtype) * self.weight


class GeluProj(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x, fp8_out=False):
        y = ops.linear_gelu(x, self.proj.weight, self.proj.bias)
        return ops.quantize_fp8(y) if fp8_out else y


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.ModuleList([GeluProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        down = self.net[2]  # the hidden comes out as FP8Rows where the down-projection takes them
        return down(self.net[0](x, fp8_out=ops.takes_fp8_rows(x, down)))


class JointAttention(nn.Module):
    def __init__(self, dim, heads, head_dim):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)

    def attend(self, q, k, v, kv_len, kv_host=None):
        """The attention core, q, k, v [B, S, H, D] -> [B, S, H, D]; a transform may replace it per instance
        (engine.parallel.seq exchanges sequence for heads around it)."""
        return ops.attention(q, k, v, kv_len=kv_len, kv_host=kv_host)

    def forward(self, img, txt, rope, kv_len, kv_host=None):
        """img [B, N, C], txt [B, L, C] (tensors, or FP8Rows for fp8 projections); rope = (cos, sin) [N + L, D/2];
        kv_len [B] valid joint keys (kv_host: the same as host ints, or None)."""
        (B, N, _), L = img.shape, txt.shape[1]
        cos, sin = rope
        split = lambda t: t.unflatten(-1, (self.heads, self.head_dim))  # [B, S, H, D]
        # q and k are normed and rotated straight into the joint [image, text] sequence: no concatenation
        q, k = (torch.empty(B, N + L, self.heads, self.head_dim, dtype=img.dtype, device=img.device)
                for _ in range(2))
        ops.rms_norm_rope(split(self.to_q(img)), self.norm_q.weight, cos[:N], sin[:N], out=q[:, :N])
        ops.rms_norm_rope(split(self.add_q_proj(txt)), self.norm_added_q.weight, cos[N:], sin[N:], out=q[:, N:])
        ops.rms_norm_rope(split(self.to_k(img)), self.norm_k.weight, cos[:N], sin[:N], out=k[:, :N])
        ops.rms_norm_rope(split(self.add_k_proj(txt)), self.norm_added_k.weight, cos[N:], sin[N:], out=k[:, N:])
        v = torch.cat([split(self.to_v(img)), split(self.add_v_proj(txt))], 1)
        out = self.attend(q, k, v, kv_len, kv_host).flatten(2)  # [B, N + L, C]
        return (self.to_out[0](ops.gemm_input(out[:, :N], self.to_out[0])),
                self.to_add_out(ops.gemm_input(out[:, N:], self.to_add_out)))


class Block(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        dim = cfg.dim
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = JointAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim)
        self.img_mlp = FeedForward(dim)
        self.txt_mlp = FeedForward(dim)

    def modulation(self, temb, zero_cond):
        """temb [B, C] (or [2B, C]: t then t=0 when zero_cond) -> (img [B, 1|2, 6C], txt [B, 1, 6C])."""
        if self.img_mod is None:
            raise RuntimeError("modulation weights were dropped; pass the precomputed table (mods=...)")
        img = self.img_mod(temb)
        if zero_cond:
            t, t0 = img.chunk(2)
            img = torch.stack([t, t0], 1)
            temb = temb.chunk(2)[0]
        else:
            img = img[:, None]
        return img, self.txt_mod(temb)[:, None]

    def forward(self, img, txt, mod, rope, kv_len, split, kv_host=None):
        """img [B, N, C], txt [B, L, C]; mod from modulation(); split: first token of the t=0 set or None."""
        img_mod, txt_mod = (m.expand(img.shape[0], -1, -1) for m in mod)  # a B=1 table serves every row
        # each [B, 1|2, C]; a single set is squeezed to [B, C] for the ops
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = (
            p if split is not None else p[:, 0] for p in img_mod.chunk(6, dim=-1))
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = (p[:, 0] for p in txt_mod.chunk(6, dim=-1))

        # the inputs of fp8 Linears that run fp8 GEMMs here come out of these kernels as FP8Rows
        a = self.attn
        fp8 = ops.takes_fp8_rows
        img_in = ops.norm_modulate(img, i_shift1, i_scale1, split, fp8=fp8(img, a.to_q, a.to_k, a.to_v))
        txt_in = ops.norm_modulate(txt, t_shift1, t_scale1, fp8=fp8(txt, a.add_q_proj, a.add_k_proj, a.add_v_proj))
        img_attn, txt_attn = self.attn(img_in, txt_in, rope, kv_len, kv_host)

        img, img_in = ops.gated_residual_norm_modulate(img, i_gate1, img_attn, i_shift2, i_scale2, split,
                                                       fp8=fp8(img, self.img_mlp.net[0].proj))
        txt, txt_in = ops.gated_residual_norm_modulate(txt, t_gate1, txt_attn, t_shift2, t_scale2,
                                                       fp8=fp8(txt, self.txt_mlp.net[0].proj))
        img = ops.gated_residual(img, i_gate2, self.img_mlp(img_in), split)
        txt = ops.gated_residual(txt, t_gate2, self.txt_mlp(txt_in))
        if img.dtype == torch.float16:  # keep fp16 residuals finite, as the reference does
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t, dtype):
        """t [B] in [0, 1] (sigma), already in the model dtype -> [B, dim]. Sinusoids of 1000·t, cos first;
        the frequencies stay float32 whatever t's dtype (as the reference's Timesteps module computes them)."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None, :] * 1000
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class TimeTextEmbed(nn.Module):
    def __init__(self, dim, additional_t_cond):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)
        if additional_t_cond:
            self.addition_t_embedding = embedding(2, dim)


class NormOut(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=-1)
        return ops.norm_modulate(x, shift, scale)


class MMDiT(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.time_text_embed = TimeTextEmbed(dim, cfg.use_additional_t_cond)
        self.txt_norm = RMSNorm(cfg.joint_attention_dim)
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = NormOut(dim)
        self.proj_out = nn.Linear(dim, cfg.patch_size ** 2 * cfg.out_channels)

    def time_embedding(self, t, additional_t_cond=None):
        """t [B] sigma in the model dtype -> temb [B, C] ([2B, C] for zero_cond_t: t then t=0)."""
        dtype = self.img_in.weight.dtype
        if self.cfg.zero_cond_t:
            t = torch.cat([t, t * 0])
        temb = self.time_text_embed.timestep_embedder(t, dtype)
        if self.cfg.use_additional_t_cond:
            if additional_t_cond is None:
                raise ValueError("this model (use_additional_t_cond) needs additional_t_cond")
            extra = self.time_text_embed.addition_t_embedding(additional_t_cond).to(dtype)
            temb = temb + (torch.cat([extra, extra]) if self.cfg.zero_cond_t else extra)
        return temb

    def modulations(self, temb):
        """Every block's (img, txt) modulation parameters for one timestep embedding."""
        return [blk.modulation(temb, self.cfg.zero_cond_t) for blk in self.transformer_blocks]

    def rope(self, img_shapes, txt_len, device):
        """(cos, sin) [N + L, D/2] float32 for images [(frames, h, w), ...] then L text tokens.
        use_layer3d_rope (Qwen-Image-Layered: the layers, then the condition image last): the condition
        image takes frame index -1, and the text starts past the layer count too."""
        theta, axes = 10000.0, self.cfg.axes_dims_rope
        inv = [1.0 / torch.pow(theta, torch.arange(0, d, 2, dtype=torch.float32) / d) for d in axes]
        layer3d, last = self.cfg.use_layer3d_rope, len(img_shapes) - 1
        angles = []
        for idx, (f, h, w) in enumerate(img_shapes):
            # frame index = image index; rows/cols centred: positions -(h - h//2) .. h//2 - 1
            pf = torch.arange(-1, 0) if layer3d and idx == last else torch.arange(idx, idx + f)
            ph = torch.arange(h) - (h - h // 2)
            pw = torch.arange(w) - (w - w // 2)
            grid = torch.cat([
                torch.outer(pf, inv[0])[:, None, None, :].expand(f, h, w, -1),
                torch.outer(ph, inv[1])[None, :, None, :].expand(f, h, w, -1),
                torch.outer(pw, inv[2])[None, None, :, :].expand(f, h, w, -1)], dim=-1)
            angles.append(grid.reshape(f * h * w, -1))
        start = max(max(h // 2, w // 2) for _, h, w in img_shapes)  # text starts past the largest image
        start = max(start, last) if layer3d else start
        pt = torch.arange(start, start + txt_len)
        angles.append(torch.cat([torch.outer(pt, i) for i in inv], dim=-1))
        ang = torch.cat(angles).to(device)
        return torch.cos(ang), torch.sin(ang)

    def forward(self, x, txt, txt_len, t, img_shapes, rope=None, mods=None, additional_t_cond=None,
                rows_per_block=None):
        """x [B, N, in_ch] packed latents (noisy image tokens first, then condition tokens);
        txt [B, L, joint_dim] prompt embeddings, valid prefix of txt_len[b] tokens (int [B]);
        t [B] sigma in [0, 1]; img_shapes [(1, h, w) per image in x]. Returns [B, N, out] velocity.
        rows_per_block: run each block on this many rows at a time (the block's intermediates shrink to
        those rows while its weights serve every row: a streamed block still travels once)."""
        N, L = x.shape[1], txt.shape[1]
        if N != sum(f * h * w for f, h, w in img_shapes):
            raise ValueError(f"img_shapes {img_shapes} do not add up to {N} image tokens")
        img = self.img_in(x)
        temb = self.time_embedding(t.to(img.dtype), additional_t_cond)
        txt = self.txt_in(self.txt_norm(txt))
        rope = rope if rope is not None else self.rope(img_shapes, L, x.device)
        mods = mods if mods is not None else self.modulations(temb)
        # no sync from host; from a pinned txt_len the copy is also capturable in a CUDA graph
        kv_len = txt_len.to(device=x.device, non_blocking=True).to(torch.int32) + N
        # host copies of the lengths let ops choose an attention backend without waiting for the GPU
        kv_host = tuple(int(n) for n in (N + txt_len).tolist()) if txt_len.device.type == "cpu" else None
        f, h, w = img_shapes[0]
        split = f * h * w if self.cfg.zero_cond_t else None
        B = img.shape[0]
        for blk, mod in zip(self.transformer_blocks, mods):
            if rows_per_block is None or rows_per_block >= B:
                img, txt = blk(img, txt, mod, rope, kv_len, split, kv_host)
            else:
                img, txt = _by_rows(blk, img, txt, mod, rope, kv_len, split, rows_per_block, kv_host)
        if self.cfg.zero_cond_t:
            temb = temb.chunk(2)[0]
        return self.proj_out(self.norm_out(img, temb))


def _by_rows(blk, img, txt, mod, rope, kv_len, split, rows, kv_host=None):
    """blk over `rows` rows at a time, each chunk's output written into one new [B, ...] pair."""
    B = img.shape[0]
    out_img, out_txt = torch.empty_like(img), torch.empty_like(txt)
    for r in range(0, B, rows):
        sl = slice(r, r + rows)
        m = tuple(t[sl] if t.shape[0] == B else t for t in mod)   # a B=1 table serves every chunk
        out_img[sl], out_txt[sl] = blk(img[sl], txt[sl], m, rope, kv_len[sl], split,
                                       None if kv_host is None else kv_host[sl])
    return out_img, out_txt


def modulation_table(model, timesteps):
    """Every block's modulation for every step, computed once before the loop: a list (per step) of lists
    (per block) of (img, txt) with batch 1. timesteps: sigmas [steps] in the model dtype. A third of the
    transformer's weights (img_mod/txt_mod) are needed only for this and can be dropped afterwards."""
    with torch.inference_mode():
        return [model.modulations(model.time_embedding(t.reshape(1))) for t in timesteps]


def drop_modulation_weights(model):
    """Free img_mod/txt_mod once a modulation_table exists. Returns the bytes released."""
    freed = 0
    for blk in model.transformer_blocks:
        for name in ("img_mod", "txt_mod"):
            mod = getattr(blk, name)
            if mod is not None:
                freed += sum(p.numel() * p.element_size() for p in mod.parameters())
                setattr(blk, name, None)
    return freed


def param_shapes(cfg):
    with torch.device("meta"):
        return {k: v.shape for k, v in MMDiT(cfg).state_dict().items()}


def load_mmdit(snapshot, dtype, device, file=None, weights=None, place=None):
    """The MMDiT configured by the snapshot's transformer/config.json, its weights from transformer/*.safetensors
    or, given `file`, from that one .safetensors (ComfyUI layout; transformer/ then needs only config.json).
    model.source is None, or for a file read_transformer_file's info plus `overrides`: the config values the
    file changed (an Edit-2511 marker turns zero_cond_t on). An fp8 file's block Linears stay fp8
    (engine.transforms.fp8.FP8Linear) unless weights="bf16", which dequantizes every layer to `dtype` on load.
    place(model): puts the model where it will run instead of `device` (engine.pipelines.load.place_transformer);
    it may return (host buffer, fn) pairs, each fn run once the reader has filled that buffer (page-locking).
    A snapshot's weights (no fp8 scales) are read after placing, straight into the placed tensors: the model is
    built and placed on the meta device, then loaders.fast_read fills every tensor where it lives. A file, or a
    snapshot with fp8 scales, is read into a host state dict first (loaders.single_file, safe_open), then placed."""
    from loaders import check_keys
    from loaders.single_file import read_transformer_file
    from engine.transforms.fp8 import fp8_layer_names, use_fp8_linears

    d = snapshot.config("transformer")
    source, overrides = None, {}
    index = snapshot.tensor_index("transformer", device) if file is None else None
    if index is not None and not any(k.endswith(".weight_scale") for k in index):
        with torch.device("meta"):
            model = MMDiT(MMDiTConfig.from_dict(d)).to(dtype)     # every MMDiT tensor is floating: all `dtype`
        check_keys({k: v.shape for k, v in model.state_dict().items()}, index, "transformer")
        after = ()
        if place is None:
            model.to_empty(device=device)
        else:
            after = place(model) or ()
        snapshot.read_into(index, model.state_dict(), after)       # in place: the tensors alias the parameters
        model.eval().source = None
        return model
    if file is None:
        state, where = snapshot.weights("transformer", dtype=dtype), "transformer"
    else:
        # zero_cond_t adds no parameter: the snapshot's config gives the shapes before the marker is known
        cfg = MMDiTConfig.from_dict(d)
        keep = () if weights == "bf16" else fp8_layer_names(cfg.num_layers)
        state, source = read_transformer_file(file, dtype, param_shapes(cfg), keep_fp8=keep)
        if source["index_timestep_zero"] and not d.get("zero_cond_t"):
            overrides["zero_cond_t"] = True
        source["overrides"], where = overrides, str(file)
    with torch.device("meta"):
        model = MMDiT(MMDiTConfig.from_dict({**d, **overrides}))
    use_fp8_linears(model, [k[:-len(".weight_scale")] for k in state if k.endswith(".weight_scale")])
    assign(model, state, where)
    model = model.eval() if place is not None else model.to(device).eval()
    model.source = source
    if place is not None:
        place(model)
    return model


def mask_to_lengths(mask, where="prompt_embeds_mask"):
    """[B, L] 0/1 mask -> valid lengths [B]. Only right padding (a valid prefix) is accepted."""
    mask = mask.cpu().bool()
    lengths = mask.sum(1)
    prefix = torch.arange(mask.shape[1])[None, :] < lengths[:, None]
    if not torch.equal(prefix, mask):
        raise LoadError(f"{where} must be ones then zeros in every row (right padding only)")
    return lengths
