"""VRAM planner: which blocks stay on the GPU, which stream, how the VAE tiles, and each stage's peak.

plan(budget, job, sizes) is arithmetic on byte counts (no CUDA calls). Stages, in the order the pipeline
runs them; the text encoder has left the GPU before the MMDiT and VAE arrive:
  text        text-encoder weights on the GPU + max(vision tower, LM prefill) activations
  vae_encode  MMDiT weights on the GPU + VAE + encoder activations of the condition image
  denoise     MMDiT weights on the GPU + VAE + modulation table + inputs + activations of one forward
  vae_decode  MMDiT weights on the GPU + VAE + decoder activations + float32 image
"Weights on the GPU" = non-block weights + resident blocks + 2 slots when any block streams; MMDiT blocks
without img_mod/txt_mod (the modulation table replaces them, so they never travel per step; one block's
pair visits the GPU while the table is built). The VAE gets what is left: the largest tile that fits.

Each stage's peak is engine.vram.memory's model; the planner picks the plan that fits.
Margin: need = 1.05 x peak + 1056 MiB <= budget. The fixed part is what the process holds outside torch's
allocator: the CUDA context, cuBLAS/cuDNN handles and loaded kernels (measured on an H100 with torch 2.11:
0.62 GiB after the text encoder, 0.75 GiB once the MMDiT and VAE kernels have run; 800 MiB kept), plus the
256 MiB L2-flush buffer Triton's autotuner allocates while it times the attention configs (first call of a
sequence-length class, unless the CLI's stored picks from an earlier run are reused). 5% covers the
caching allocator's rounding. Fragmentation is kept out by expandable segments (cli.py sets them).

Host memory per mode (bf16, full-size Qwen-Image-Edit; each streamed block pinned once, exact size):
  mode                          pinned (page-locked)               pageable
  MMDiT resident                0                                  mod weights 13.6 GB (load: one state dict)
  MMDiT streaming, r resident   (60 - r) x 453 MB = 27.2 GB at r=0  mod weights 13.6 GB
  text encoder resident         0                                  0 after the move
  text encoder streaming        (28 - r) x 466 MB = 13.0 GB at r=0  -
                                + streamed vision blocks x 39 MB (1.26 GB all)
  text encoder, any plan        -                                  embed_tokens 1.09 GB (looked up there)
The text encoder's pinned buffers are released (handle.remove()) before the MMDiT's are made, so the peak
is max(text, MMDiT), not their sum; loading adds one block's worth while the buffers are filled. The
modulation weights visit the GPU once per edit, a block's pair at a time, for the precomputed table.
"""
import math
import re
from dataclasses import dataclass, field

import torch

from loaders import LoadError

from engine.vram.memory import CFG_SPLITS, GiB, MiB, decode_peak, denoise_peak, encode_peak, text_peak

MARGIN_FRACTION, MARGIN_FIXED = 0.05, 1056 * MiB
VAE_TILES = (None, 256, 192, 128, 96, 64, 48, 32, 16)  # latent px, preferred first
PREFERRED_MIN_TILE = 64     # smaller tiles recompute a 13 px halo many times; used only when nothing else fits


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
    faster_cfg_from: dict = field(default_factory=dict)   # better CFG split -> smallest budget that allows it
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
        if self.faster_cfg_from:
            cfg += " (" + ", ".join(f"{'per-row' if k == 'rows' else k} from {gib_up(v)}"
                                    for k, v in self.faster_cfg_from.items()) + ")"
        lines.append(f"  denoise       {self.mmdit_resident}/{self.mmdit_blocks} blocks resident, "
                     f"{self.streamed_per_step / 1e9:.1f} GB streamed per step{cfg}; "
                     f"peak {gib(self.peaks['denoise'])}")
        lines.append(f"  VAE           encode {tile(self.encode_tile)} (peak {gib(self.peaks['vae_encode'])}), "
                     f"decode {tile(self.decode_tile)} (peak {gib(self.peaks['vae_decode'])})")
        return "\n".join(lines)


def gib(n):
    return f"{n / GiB:.2f} GiB"


def gib_up(n):
    """n bytes in GiB rounded up to 0.01: a budget of that size fits, whatever was rounded away."""
    return f"{math.ceil(n / GiB * 100) / 100:.2f} GiB"


def need(peak):
    """Bytes of budget a predicted peak takes once the margin is added."""
    return math.ceil(peak * (1 + MARGIN_FRACTION)) + MARGIN_FIXED


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


def smallest_budget(job, sizes, mode="auto", split="forwards"):
    """The least budget any plan fits: fewest resident blocks (2 slots), the VAE at its thriftiest tile,
    CFG as `split` (default the thriftiest, two B=1 forwards)."""
    s, peaks = sizes, []
    if job.text_encoder and s.te_layers:
        peaks.append(text_peak(s, job, resident_choices(s.te_layers, mode)[-1],
                               resident_choices(s.vision_blocks, mode)[-1]))
    r = resident_choices(s.blocks, mode)[-1]
    peaks.append(denoise_peak(s, job, r, split))
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
    for split in CFG_SPLITS if job.batch > 1 else CFG_SPLITS[:1]:
        mm = _mmdit_choice(s, job, cap, mode, split)
        if mm is not None:
            break
    if te is None or mm is None:
        smallest = smallest_budget(job, s, mode)
        # round up to 0.01 GiB: that budget fits, and anything 1% lower does not
        raise LoadError(f"--vram {gib(budget_bytes)} is too small for a {job.describe()}"
                        f"{' with every block resident (--offload none)' if mode == 'none' else ''}; "
                        f"the smallest budget that fits is {gib_up(smallest)}")
    (r_te, r_vis), (r, enc, dec) = te, mm
    peaks = {"denoise": denoise_peak(s, job, r, split), "vae_encode": encode_peak(s, job, r, enc),
             "vae_decode": decode_peak(s, job, r, dec)}
    te_layers, vision_blocks = (s.te_layers, s.vision_blocks) if job.text_encoder else (0, 0)
    if te_layers:
        peaks["text"] = text_peak(s, job, r_te, r_vis)
    streamed = s.blocks - r
    per_forward = streamed * s.stream_bytes if streamed > 2 else 0   # <= 2 streamed blocks keep their slots
    return Plan(
        budget=budget_bytes, mode=mode, mmdit_resident=r, mmdit_blocks=s.blocks,
        te_resident=min(r_te, te_layers), te_layers=te_layers,
        vision_resident=min(r_vis, vision_blocks), vision_blocks=vision_blocks,
        encode_tile=enc, decode_tile=dec, peaks=peaks,
        host_pinned={"text": (te_layers - min(r_te, te_layers)) * s.te_layer_bytes
                     + (vision_blocks - min(r_vis, vision_blocks)) * s.vision_block_bytes,
                     "mmdit": streamed * s.stream_bytes},
        streamed_per_step=per_forward * (job.batch if split == "forwards" else 1),
        needs={k: need(v) for k, v in peaks.items()}, cfg_split=split,
        faster_cfg_from={k: smallest_budget(job, s, mode, k) for k in CFG_SPLITS[:CFG_SPLITS.index(split)]})


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
