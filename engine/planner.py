"""VRAM planner: which blocks stay on the GPU, which stream, how the VAE tiles, and each stage's peak.

plan(budget, job, sizes) is arithmetic on byte counts (no CUDA calls). Stages, in the order the pipeline
runs them; the text encoder has left the GPU before the MMDiT and VAE arrive:
  text        text-encoder weights on the GPU + max(vision tower, LM prefill) activations
  vae_encode  MMDiT weights on the GPU + VAE + encoder activations of the condition image
  denoise     MMDiT weights on the GPU + VAE + modulation table + inputs + activations of one forward
  vae_decode  MMDiT weights on the GPU + VAE + modulation table + decoder activations + float32 image
"Weights on the GPU" = non-block weights + resident blocks + 2 slots when any block streams; MMDiT blocks
without img_mod/txt_mod (the modulation table replaces them, so they never travel per step; one block's
pair visits the GPU while the table is built). The VAE gets what is left: the largest tile that fits.

Activations (elements, times the dtype's bytes; B batch, N image tokens noisy + condition, L text tokens,
C width; counted from the code's live tensors on the CUDA path):
  MMDiT forward  B * C * max(7 (N + L), 9 N + 4 L, 4 N + 9 L): the residual streams (caller's and new),
                 normed inputs, attention outputs kept to the end of the block, and either q, k, v +
                 attention output + out-projections (7 S) or the MLP's 4C hidden + its output (9 N + 4 L;
                 GELU is fused into the GEMM epilogue, the unfused torch path needs 12 N). One block at a
                 time; flash attention's workspace is O(S) (row statistics), not O(S^2).
  + inputs       B L joint_dim (prompt embeddings) + 3 B N 64 (packed latents) + RoPE cos/sin float32 [S, 64]
  + table        steps * blocks * 6 C * (img sets + 1)   (img sets = 2 with zero_cond_t)
  LM prefill     B L' (max(6 D + 5 kv, 3 D + 3 I) + 3 D): residuals, norm, q/k/v with RoPE temporaries, or
                 SwiGLU's silu(gate), up and their product; + final norm and the sliced embeddings.
                 L' = L + 64 template tokens.
  vision tower   P max(14 Dv, 3 Dv + 3 Iv): qkv, float32 RoPE temporaries, gathered window batches, or the
                 SwiGLU; P = 4 x merged image tokens.
  VAE            engine.vae.activation_bytes (measured on an H200 to ~1%).
Margin: need = 1.05 x peak + 1056 MiB <= budget. The fixed part is what the process holds outside torch's
allocator: the CUDA context, cuBLAS/cuDNN handles and loaded kernels (measured on an H100 with torch 2.11:
0.62 GiB after the text encoder, 0.75 GiB once the MMDiT and VAE kernels have run; 800 MiB kept), plus the
256 MiB L2-flush buffer Triton's autotuner allocates while it times the attention configs (first call of a
shape). 5% covers the caching allocator's rounding. Fragmentation is kept out by expandable segments
(cli.py sets them).

Host memory per mode (bf16, full-size Qwen-Image-Edit; each streamed block pinned once, exact size):
  mode                          pinned (page-locked)               pageable
  MMDiT resident                0                                  0 after the move (load: one state dict)
  MMDiT streaming, r resident   (60 - r) x 453 MB = 27.2 GB at r=0  mod weights 13.6 GB until dropped
  text encoder resident         0                                  0 after the move
  text encoder streaming        (28 - r) x 466 MB = 13.0 GB at r=0  -
                                + streamed vision blocks x 39 MB (1.26 GB all)
  text encoder, any plan        -                                  embed_tokens 1.09 GB (looked up there)
The text encoder's pinned buffers are released (handle.remove()) before the MMDiT's are made, so the peak
is max(text, MMDiT), not their sum; loading adds one block's worth while the buffers are filled.
"""
import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch

from loaders import LoadError

from .config import VAEConfig
from .mmdit import MMDiT, Block
from .processor import MAX_PROMPT_TOKENS, TEMPLATE_DROP
from .text_encoder import DecoderLayer, TextEncoder
from .vae import QwenImageVAE, activation_bytes
from .vision import VisionBlock, VisionConfig

MiB, GiB = 2 ** 20, 2 ** 30
MARGIN_FRACTION, MARGIN_FIXED = 0.05, 1056 * MiB
VAE_TILES = (None, 256, 192, 128, 96, 64, 48, 32, 16)  # latent px, preferred first
PREFERRED_MIN_TILE = 64     # smaller tiles recompute a 13 px halo many times; used only when nothing else fits
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


def model_sizes_from_configs(mmdit_cfg, text_cfg, vae_cfg, dtype_bytes=2):
    """Byte counts from the configs, by building one block of each kind on the meta device (no memory).
    text_cfg: (TextConfig, VisionConfig) as engine.text_encoder.read_config returns, a TextConfig (default
    vision tower), or None when the job brings its own prompt embeddings."""
    with torch.device("meta"):
        block = Block(mmdit_cfg)
        sizes = dict(
            dtype_bytes=dtype_bytes, block_bytes=_bytes(block, dtype_bytes),
            mod_bytes=_bytes(block.img_mod, dtype_bytes) + _bytes(block.txt_mod, dtype_bytes),
            blocks=mmdit_cfg.num_layers,
            mmdit_other=_bytes(MMDiT(dataclasses.replace(mmdit_cfg, num_layers=0)), dtype_bytes),
            dim=mmdit_cfg.dim, joint_dim=mmdit_cfg.joint_attention_dim, head_dim=mmdit_cfg.attention_head_dim,
            img_mod_sets=2 if mmdit_cfg.zero_cond_t else 1, vae_cfg=vae_cfg)
        sizes["vae_bytes"] = _bytes(QwenImageVAE(vae_cfg), dtype_bytes)
        if text_cfg is not None:
            cfg, vision = text_cfg if isinstance(text_cfg, tuple) else (text_cfg, VisionConfig())
            empty = TextEncoder(dataclasses.replace(cfg, num_hidden_layers=0), dataclasses.replace(vision, depth=0))
            sizes.update(
                te_layer_bytes=_bytes(DecoderLayer(cfg), dtype_bytes), te_layers=cfg.num_hidden_layers,
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
    """One edit: output size, condition image size (VAE encode, condition tokens), batch (2 with CFG)."""
    width: int
    height: int
    cond_width: int = 1024
    cond_height: int = 1024
    batch: int = 2
    text_len: int = None        # MMDiT text tokens, an upper bound; default: VL image tokens + the prompt limit
    vl_tokens: int = None       # merged image tokens the VL model sees; default: the condition image's, capped
    steps: int = 50
    text_encoder: bool = True   # False: prompt embeddings come from a file

    def __post_init__(self):
        if self.vl_tokens is None:
            vl = math.ceil(self.cond_width / 28) * math.ceil(self.cond_height / 28)
            object.__setattr__(self, "vl_tokens", min(vl, VL_MAX_TOKENS))
        if self.text_len is None:
            object.__setattr__(self, "text_len", self.vl_tokens + MAX_PROMPT_TOKENS - TEMPLATE_DROP)

    @property
    def tokens(self):           # image tokens of the MMDiT: noisy + condition, 16 px per token
        return (self.width // 16) * (self.height // 16) + (self.cond_width // 16) * (self.cond_height // 16)

    def describe(self):
        return f"{self.width}x{self.height} edit" + (" with CFG" if self.batch > 1 else "")


@dataclass(frozen=True)
class Plan:
    budget: int
    mode: str
    mmdit_resident: int
    mmdit_blocks: int
    te_resident: int
    te_layers: int
    vision_resident: int
    vision_blocks: int
    encode_tile: int            # latent px; None = untiled
    decode_tile: int
    peaks: dict                 # stage -> predicted peak bytes, margin excluded
    host_pinned: dict           # "text" / "mmdit" -> pinned host bytes of the streamed blocks
    streamed_per_step: int      # bytes the MMDiT moves host -> GPU per denoising step
    needs: dict = field(default_factory=dict)   # stage -> peak with margin
    cfg_split: str = "batched"  # CFG rows: "batched" (one B=2 forward), "rows" (each block takes one row at a
                                # time: one row's intermediates, each block still travels once per step) or
                                # "forwards" (two B=1 forwards: the least memory, streamed blocks travel twice)

    @property
    def mmdit_streamed(self):
        return self.mmdit_blocks - self.mmdit_resident

    @property
    def te_streamed(self):
        return self.te_layers - self.te_resident

    def summary(self):
        tile = lambda t: "untiled" if t is None else f"tile {t} latent px"
        lines = [f"VRAM plan for {gib(self.budget)} ({self.mode}):"]
        if self.te_layers:
            lines.append(f"  text encoder  {self.te_resident}/{self.te_layers} LM layers resident, "
                         f"{self.vision_resident}/{self.vision_blocks} vision blocks; peak {gib(self.peaks['text'])}")
        cfg = {"batched": "", "rows": "; CFG rows one at a time through each block",
               "forwards": "; CFG as two B=1 forwards"}[self.cfg_split]
        lines.append(f"  denoise       {self.mmdit_resident}/{self.mmdit_blocks} blocks resident, "
                     f"{self.streamed_per_step / 1e9:.1f} GB streamed per step{cfg}; "
                     f"peak {gib(self.peaks['denoise'])}")
        lines.append(f"  VAE           encode {tile(self.encode_tile)} (peak {gib(self.peaks['vae_encode'])}), "
                     f"decode {tile(self.decode_tile)} (peak {gib(self.peaks['vae_decode'])})")
        return "\n".join(lines)


def gib(n):
    return f"{n / GiB:.2f} GiB"


def need(peak):
    """Bytes of budget a predicted peak takes once the margin is added."""
    return math.ceil(peak * (1 + MARGIN_FRACTION)) + MARGIN_FIXED


# ---- per-stage peaks ------------------------------------------------------------------------------

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
    return (weights_on_gpu(s, r) + table_bytes(s, job) + image
            + activation_bytes(s.vae_cfg, h, w, tile, _dtype(s), 1, encode=False))


CFG_SPLITS = ("batched", "rows", "forwards")   # most activation memory first


def denoise_peak(s, job, r, split="batched"):
    # while the table is built, one block's modulation weights visit instead of the activations
    act = {"batched": lambda: mmdit_activations(s, job), "rows": lambda: mmdit_activations(s, job, rows=1),
           "forwards": lambda: mmdit_activations(s, dataclasses.replace(job, batch=1))}[split]()
    return weights_on_gpu(s, r) + table_bytes(s, job) + max(act, s.mod_bytes)


# ---- choices ------------------------------------------------------------------------------------

def resident_choices(n, mode="auto"):
    """Resident counts worth trying, most resident first. n - 1 and n - 2 resident cost as much as n (the
    2 slots take the place of the blocks they would hold), so they are skipped."""
    if mode == "none":
        return [n]
    if mode == "stream":
        return [0] if n > 2 else [n]
    return [n] + list(range(n - 3, -1, -1))


def _tiles(h, w):
    return [t for t in VAE_TILES if t is None or t < max(h, w)]


def _best_tile(peak_of, tiles, cap):
    return next(((t,) for t in tiles if peak_of(t) <= cap), None)


def _text_choice(s, job, cap, mode):
    lm, vis = resident_choices(s.te_layers, mode), resident_choices(s.vision_blocks, mode)
    for r, rv in [(r, vis[0]) for r in lm] + [(lm[-1], rv) for rv in vis[1:]]:
        if text_peak(s, job, r, rv) <= cap:
            return r, rv
    return None


def _mmdit_choice(s, job, cap, mode, split="batched"):
    enc_tiles = _tiles(job.cond_height // 8, job.cond_width // 8)
    dec_tiles = _tiles(job.height // 8, job.width // 8)
    floors = [t for t in VAE_TILES[1:] if t <= PREFERRED_MIN_TILE]
    for floor in floors:
        ok = lambda t: t is None or t >= floor
        for r in resident_choices(s.blocks, mode):
            if denoise_peak(s, job, r, split) > cap:
                continue
            enc = _best_tile(lambda t: encode_peak(s, job, r, t), [t for t in enc_tiles if ok(t)], cap)
            dec = _best_tile(lambda t: decode_peak(s, job, r, t), [t for t in dec_tiles if ok(t)], cap)
            if enc and dec:
                return r, enc[0], dec[0]
    return None


def smallest_budget(job, sizes, mode="auto"):
    """The least budget any plan fits: fewest resident blocks (2 slots), the VAE at its thriftiest tile."""
    s, peaks = sizes, []
    if job.text_encoder and s.te_layers:
        peaks.append(text_peak(s, job, resident_choices(s.te_layers, mode)[-1],
                               resident_choices(s.vision_blocks, mode)[-1]))
    r = resident_choices(s.blocks, mode)[-1]
    peaks.append(denoise_peak(s, job, r, "forwards"))   # CFG may run as two B=1 forwards
    peaks.append(min(encode_peak(s, job, r, t) for t in _tiles(job.cond_height // 8, job.cond_width // 8)))
    peaks.append(min(decode_peak(s, job, r, t) for t in _tiles(job.height // 8, job.width // 8)))
    return need(max(peaks))


def plan(budget_bytes, job, model_sizes, mode="auto"):
    """The plan for `job` under `budget_bytes` of VRAM. mode: auto (as many blocks resident as fit),
    stream (as few as possible: the least VRAM), none (all resident, or an error)."""
    if mode not in ("auto", "stream", "none"):
        raise LoadError(f"--offload must be auto, stream or none, got {mode!r}")
    s = model_sizes
    cap = (budget_bytes - MARGIN_FIXED) / (1 + MARGIN_FRACTION)
    te = _text_choice(s, job, cap, mode) if job.text_encoder and s.te_layers else (0, 0)
    mm, split = None, None
    for split in CFG_SPLITS if job.batch > 1 else CFG_SPLITS[:1]:
        mm = _mmdit_choice(s, job, cap, mode, split)
        if mm is not None:
            break
    if te is None or mm is None:
        smallest = smallest_budget(job, s, mode)
        # round up to 0.01 GiB: that budget fits, and anything 1% lower does not
        raise LoadError(f"--vram {gib(budget_bytes)} is too small for a {job.describe()}"
                        f"{' with every block resident (--offload none)' if mode == 'none' else ''}; "
                        f"the smallest budget that fits is {math.ceil(smallest / GiB * 100) / 100:.2f} GiB")
    (r_te, r_vis), (r, enc, dec) = te, mm
    peaks = {"denoise": denoise_peak(s, job, r, split), "vae_encode": encode_peak(s, job, r, enc),
             "vae_decode": decode_peak(s, job, r, dec)}
    te_layers, vision_blocks = (s.te_layers, s.vision_blocks) if job.text_encoder else (0, 0)
    if te_layers:
        peaks["text"] = text_peak(s, job, r_te, r_vis)
    streamed = s.blocks - r
    return Plan(
        budget=budget_bytes, mode=mode, mmdit_resident=r, mmdit_blocks=s.blocks,
        te_resident=min(r_te, te_layers), te_layers=te_layers,
        vision_resident=min(r_vis, vision_blocks), vision_blocks=vision_blocks,
        encode_tile=enc, decode_tile=dec, peaks=peaks,
        host_pinned={"text": (te_layers - min(r_te, te_layers)) * s.te_layer_bytes
                     + (vision_blocks - min(r_vis, vision_blocks)) * s.vision_block_bytes,
                     "mmdit": streamed * s.stream_bytes},
        streamed_per_step=(streamed * s.stream_bytes if streamed > 2 else 0) * (job.batch if split == "forwards" else 1),
        needs={k: need(v) for k, v in peaks.items()}, cfg_split=split)


_UNITS = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


def parse_size(text):
    """'16GiB' | '16G' | '16Gi' | '6000MiB' | '12.5GB' | '16' -> bytes. K/M/G/T alone or with 'i'/'iB' are
    binary (2^30 for G), with a plain 'B' decimal (10^9 for GB); a bare number is GiB, 'B' alone bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?)(b?)|(b))?\s*", str(text), re.IGNORECASE)
    if not m:
        raise LoadError(f"--vram {text!r} is not a size; write it like 16GiB, 16G, 6000MiB or 12.5GB")
    value, unit, binary, b, plain_bytes = m.groups()
    if plain_bytes:
        scale = 1
    elif unit is None:
        scale = GiB
    elif b and not binary:
        scale = 1000 ** "kmgt".index(unit.lower()) * 1000
    else:
        scale = _UNITS[unit.lower()]
    n = math.ceil(float(value) * scale)
    if n <= 0:
        raise LoadError(f"--vram {text!r} must be more than zero")
    return n


def default_budget(device="cuda"):
    """What this process may use when no --vram is given: the device's free memory plus what torch already
    holds. Calls CUDA, so it lives outside plan()."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)
