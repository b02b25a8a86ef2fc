"""Memory model: the bytes each stage of an edit holds on the GPU, from the configs alone (no CUDA calls).

engine.vram.planner chooses with it; benchmarks/bench_offload.py and calibrate_vae.py check it against measured
peaks (H100, benchmarks/RESULTS.md: no stage above its prediction by more than 4% but per-row CFG, 7%
before the correction below; the text stage over-predicted by up to 17%).

Activations (elements, times the dtype's bytes; B batch, N image tokens noisy + condition, L text tokens,
C width; counted from the code's live tensors on the CUDA path):
  MMDiT forward  B * C * max(7 (N + L), 9 N + 4 L, 4 N + 9 L): the residual streams (caller's and new),
                 normed inputs, attention outputs kept to the end of the block, and either q, k, v +
                 attention output + out-projections (7 S) or the MLP's 4C hidden + its output (9 N + 4 L;
                 GELU is fused into the GEMM epilogue, the unfused torch path needs 12 N). One block at a
                 time; flash attention's workspace is O(S) (row statistics), not O(S^2).
  CFG split      "rows" (one row through a block at a time): one row's intermediates + (2B - 1) rows of
                 residual streams (the other rows' inputs and the [B] output being filled); "forwards": B = 1.
  + inputs       B L joint_dim (prompt embeddings) + 3 B N 64 (packed latents) + RoPE cos/sin float32 [S, 64]
  + table        steps * blocks * 6 C * (img sets + 1)   (img sets = 2 with zero_cond_t)
  LM prefill     B L' (max(6 D + 5 kv, 3 D + 3 I) + 3 D): residuals, norm, q/k/v with RoPE temporaries, or
                 SwiGLU's silu(gate), up and their product; + final norm and the sliced embeddings.
                 L' = L + 64 template tokens.
  vision tower   P max(14 Dv, 3 Dv + 3 Iv): qkv, float32 RoPE temporaries, gathered window batches, or the
                 SwiGLU; P = 4 x merged image tokens.
  VAE            activation_bytes below (measured on an H200 and an H100 to ~1%).
"""
import dataclasses
import math
from dataclasses import dataclass

import torch

from engine.config import VAEConfig
from engine.models.mmdit import MMDiT, Block
from engine.text.processor import MAX_PROMPT_TOKENS, TEMPLATE_DROP
from engine.models.text_encoder import DecoderLayer, TextEncoder
from engine.models.vae import QwenImageVAE, _decoder_dims, _encoder_dims, decoder_halo, encoder_halo
from engine.models.vision import VisionBlock, VisionConfig

MiB, GiB = 2 ** 20, 2 ** 30
VL_MAX_TOKENS = 1280        # the processor's default max_pixels = 28 * 28 * 1280


@dataclass(frozen=True)
class ModelSizes:
    dtype_bytes: int
    block_bytes: int            # one MMDiT block, modulation included
    mod_bytes: int              # of which img_mod + txt_mod
    blocks: int
    mmdit_other: int            # embeddings, norms, proj_out
    dim: int
    joint_dim: int
    head_dim: int
    img_mod_sets: int           # 2 with zero_cond_t
    vae_bytes: int
    vae_cfg: VAEConfig
    te_layer_bytes: int = 0     # text encoder (0 layers: none)
    te_layers: int = 0
    te_other: int = 0           # final norm, patch_embed, merger (embed_tokens stays on the host)
    te_embed: int = 0           # embed_tokens
    te_hidden: int = 0
    te_intermediate: int = 0
    te_kv: int = 0              # width of k (= of v)
    te_head_dim: int = 0
    vision_block_bytes: int = 0
    vision_blocks: int = 0
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_patch: int = 0       # values per patch (3 * 2 * 14 * 14)

    @property
    def stream_bytes(self):     # what one MMDiT block moves per step
        return self.block_bytes - self.mod_bytes


def _bytes(module, dtype_bytes):
    return sum(p.numel() for p in module.parameters()) * dtype_bytes


def _fp8_saving(block, dtype_bytes, names=None):
    """What an fp8 block saves (engine.transforms.fp8): each of its fp8 Linears' weight (names: default the MMDiT's
    block Linears) at 1 byte per value plus a float32 scale per output channel, instead of dtype_bytes per value."""
    from engine.transforms.fp8 import BLOCK_LINEARS
    weights = [block.get_submodule(name).weight for name in names or BLOCK_LINEARS]
    return sum(w.numel() * (dtype_bytes - 1) - 4 * w.shape[0] for w in weights)


def model_sizes_from_configs(mmdit_cfg, text_cfg, vae_cfg, dtype_bytes=2, fp8=False, text_fp8=False):
    """Byte counts from the configs, by building one block of each kind on the meta device (no memory).
    text_cfg: (TextConfig, VisionConfig) as engine.models.text_encoder.read_config returns, a TextConfig (default
    vision tower), or None when the job brings its own prompt embeddings. fp8: the blocks' Linears in fp8.
    text_fp8: the language model's 7 Linears per layer in fp8 (--text-weights fp8 or an fp8 text-encoder file;
    the vision tower, embeddings and norms stay in the model dtype)."""
    from engine.transforms.fp8 import TEXT_LINEARS
    with torch.device("meta"):
        block = Block(mmdit_cfg)
        sizes = dict(
            dtype_bytes=dtype_bytes, block_bytes=_bytes(block, dtype_bytes) - (_fp8_saving(block, dtype_bytes)
                                                                                if fp8 else 0),
            mod_bytes=_bytes(block.img_mod, dtype_bytes) + _bytes(block.txt_mod, dtype_bytes),
            blocks=mmdit_cfg.num_layers,
            mmdit_other=_bytes(MMDiT(dataclasses.replace(mmdit_cfg, num_layers=0)), dtype_bytes),
            dim=mmdit_cfg.dim, joint_dim=mmdit_cfg.joint_attention_dim, head_dim=mmdit_cfg.attention_head_dim,
            img_mod_sets=2 if mmdit_cfg.zero_cond_t else 1, vae_cfg=vae_cfg)
        sizes["vae_bytes"] = _bytes(QwenImageVAE(vae_cfg), dtype_bytes)
        if text_cfg is not None:
            cfg, vision = text_cfg if isinstance(text_cfg, tuple) else (text_cfg, VisionConfig())
            empty = TextEncoder(dataclasses.replace(cfg, num_hidden_layers=0), dataclasses.replace(vision, depth=0))
            layer = DecoderLayer(cfg)
            saving = _fp8_saving(layer, dtype_bytes, TEXT_LINEARS) if text_fp8 else 0
            sizes.update(
                te_layer_bytes=_bytes(layer, dtype_bytes) - saving, te_layers=cfg.num_hidden_layers,
                te_other=_bytes(empty, dtype_bytes) - _bytes(empty.embed_tokens, dtype_bytes),
                te_embed=_bytes(empty.embed_tokens, dtype_bytes), te_hidden=cfg.hidden_size,
                te_intermediate=cfg.intermediate_size, te_kv=cfg.num_key_value_heads * cfg.head_dim,
                te_head_dim=cfg.head_dim, vision_block_bytes=_bytes(VisionBlock(vision), dtype_bytes),
                vision_blocks=vision.depth, vision_hidden=vision.hidden_size,
                vision_intermediate=vision.intermediate_size,
                vision_patch=vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2)
    return ModelSizes(**sizes)


@dataclass(frozen=True)
class Job:
    """One edit: output size, condition image size (the largest one VAE-encoded), batch (2 with CFG).
    cond_tokens: the MMDiT's condition tokens of all images (default: one image of the condition size)."""
    width: int
    height: int
    cond_width: int = 1024
    cond_height: int = 1024
    batch: int = 2
    text_len: int = None        # MMDiT text tokens, an upper bound; default: VL image tokens + the prompt limit
    vl_tokens: int = None       # merged image tokens the VL model sees; default: the condition image's, capped
    steps: int = 50
    text_encoder: bool = True   # False: prompt embeddings come from a file
    cond_tokens: int = None
    frames: int = 1             # noisy frames of the output size (Qwen-Image-Layered: layers + 1)

    def __post_init__(self):
        if self.cond_tokens is None:
            object.__setattr__(self, "cond_tokens", (self.cond_width // 16) * (self.cond_height // 16))
        if self.vl_tokens is None:
            vl = math.ceil(self.cond_width / 28) * math.ceil(self.cond_height / 28)
            object.__setattr__(self, "vl_tokens", min(vl, VL_MAX_TOKENS))
        if self.text_len is None:
            object.__setattr__(self, "text_len", self.vl_tokens + MAX_PROMPT_TOKENS - TEMPLATE_DROP)

    @property
    def tokens(self):           # image tokens of the MMDiT: noisy + condition, 16 px per token
        return self.frames * (self.width // 16) * (self.height // 16) + self.cond_tokens

    def describe(self):
        what = f"{self.frames - 1}-layer split" if self.frames > 1 else "edit"
        return f"{self.width}x{self.height} {what}" + (" with CFG" if self.batch > 1 else "")


def _resident_weights(n, r, block):
    """r resident blocks + the 2 slots the other n - r stream through (1 if only one streams)."""
    return r * block + min(2, n - r) * block


def mmdit_activations(s, job, rows=None):
    """One forward's peak activations with `rows` rows (default all B) through a block at a time: those
    rows' intermediates, plus the other rows' block inputs and the [B, ...] output the chunks are written
    into (2B - rows residual rows; measured on an H100 for a 4K edit, B=2: 4.84 GiB, this formula 4.84)."""
    B, N, L, d = job.batch, job.tokens, job.text_len, s.dtype_bytes
    rows = B if rows is None else min(rows, B)
    extra = 2 * B - rows if rows < B else 0
    act = (rows * max(7 * (N + L), 9 * N + 4 * L, 4 * N + 9 * L) + extra * (N + L)) * s.dim * d
    inputs = B * L * s.joint_dim * d + 3 * B * N * 64 * d + (N + L) * (s.head_dim // 2) * 4 * 2
    return act + inputs


def table_bytes(s, job):
    return job.steps * s.blocks * 6 * s.dim * (s.img_mod_sets + 1) * s.dtype_bytes


def text_peak(s, job, r, rv):
    d, B, L = s.dtype_bytes, job.batch, job.text_len + TEMPLATE_DROP
    D, I, kv = s.te_hidden, s.te_intermediate, s.te_kv
    lm = B * L * (max(6 * D + 5 * kv, 3 * D + 3 * I) + 3 * D) * d + B * L * s.te_head_dim * (4 + 2 * d)
    P = 4 * job.vl_tokens
    vision = P * max(14 * s.vision_hidden, 3 * s.vision_hidden + 3 * s.vision_intermediate) * d
    vision += P * s.vision_patch * (4 + d)           # pixel values: float32 from the processor + the cast
    weights = (s.te_other + _resident_weights(s.te_layers, r, s.te_layer_bytes)
               + _resident_weights(s.vision_blocks, rv, s.vision_block_bytes))
    return weights + max(lm, vision)


def weights_on_gpu(s, r):
    """MMDiT (r resident blocks, modulation weights dropped) + VAE, from VAE encode to VAE decode."""
    return s.mmdit_other + _resident_weights(s.blocks, r, s.stream_bytes) + s.vae_bytes


def _dtype(s):
    return torch.float32 if s.dtype_bytes == 4 else torch.bfloat16


def encode_peak(s, job, r, tile):
    h, w = job.cond_height // 8, job.cond_width // 8
    return weights_on_gpu(s, r) + activation_bytes(s.vae_cfg, h, w, tile, _dtype(s), 1, encode=True)


def decode_peak(s, job, r, tile):
    h, w = job.height // 8, job.width // 8
    image = 3 * job.height * job.width * 4           # tensor_to_image's float32 copy
    return (weights_on_gpu(s, r) + image       # the modulation table is freed before the decode
            + activation_bytes(s.vae_cfg, h, w, tile, _dtype(s), 1, encode=False))


CFG_SPLITS = ("batched", "rows", "forwards")   # most activation memory first


def denoise_peak(s, job, r, split="batched"):
    # while the table is built, one block's modulation weights visit instead of the activations
    if split == "forwards":
        act = mmdit_activations(s, dataclasses.replace(job, batch=1))
    else:
        act = mmdit_activations(s, job, rows=1 if split == "rows" else None)
    return weights_on_gpu(s, r) + table_bytes(s, job) + max(act, s.mod_bytes)


def activation_bytes(cfg, h, w, tile=None, dtype=torch.bfloat16, batch=1, encode=False):
    """Peak activation estimate (h, w in latent px), weights excluded:
        itemsize * batch * max(k * widest * th * tw + C * h * w + 3 * 64 * h * w,   tiled path
                               8 * C * h * w + 3 * 64 * h * w)                          latent path
    widest = channels x area-scale of the largest tiled-path tensor per latent px (Qwen-Image: decoder
    192 ch nearest-upsampled to 8x = 12288, encoder 96 ch at 8x = 6144); th x tw = the largest tile
    with its halo; C = mid-block width (384); 3 * 64 * h * w = the image. k = 3.5 (decoder) / 6 (encoder)
    and 8 (qkv + attention output + norms) were measured in bf16 (H200, then H100: calibrate_vae.py),
    where the RMS norm's float32 upcast dominates: the formula gave 1.33 / 15.96 / 1.19 GiB for 1024^2
    untiled / 4096x3072 untiled / 4096x3072 tile 64 decode, measured 1.33 / 15.94 / 1.13 GiB."""
    n = len(cfg.dim_mult)
    if encode:   # block i runs at area scale 4^(n-1-i); conv_in at full resolution; mid block last
        dims = _encoder_dims(cfg)
        widest, c = max([dims[0] * 4 ** (n - 1)] + [dims[i + 1] * 4 ** (n - 1 - i) for i in range(n)]), dims[-1]
    else:        # block i runs at 4^i; its nearest x2 output (before the conv halves C) at 4^(i+1)
        dims = _decoder_dims(cfg)
        widest = max([dims[i + 1] * 4 ** i for i in range(n)] + [dims[i + 1] * 4 ** (i + 1) for i in range(n - 1)])
        c = dims[0]
    halo = encoder_halo(cfg) if encode else decoder_halo(cfg)

    def span(size):   # the largest tile-plus-halo extent along one axis
        t = size if tile is None else tile
        return max(min(y + t + halo, size) - max(y - halo, 0) for y in range(0, size, t))

    k, image = (6.0 if encode else 3.5), 3 * cfg.scale_factor ** 2 * h * w
    elems = max(k * widest * span(h) * span(w) + c * h * w + image, 8 * c * h * w + image)
    return int(elems * batch * torch.empty((), dtype=dtype).element_size())
