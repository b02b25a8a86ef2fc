"""Qwen-Image-Edit orchestration: condition image -> latents -> denoise with true CFG -> decode.

Only orchestration lives here; the math is in mmdit.py, vae.py and scheduler.py.
"""
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from loaders import LoadError, Snapshot, torch_dtype

from engine import scheduler as sched
from engine.config import RunOptions, SchedulerConfig
from engine.models.mmdit import MMDiT, load_mmdit, mask_to_lengths
from engine.vram.offload import modulation_table_streamed, move_except, move_except_modulation, stream_blocks
from engine.models.vae import QwenImageVAE, load_vae, to_device as vae_to_device

@dataclass
class EditModels:
    transformer: MMDiT
    vae: QwenImageVAE
    scheduler: SchedulerConfig
    device: str
    dtype: torch.dtype
    plan: object = None         # engine.vram.planner.Plan when a VRAM budget is in force
    stream: object = None       # engine.vram.offload.StreamHandle of the transformer blocks; .remove() unpins
    timings: dict = field(default_factory=dict)
    peaks: dict = field(default_factory=dict)   # stage -> (VRAM allocated, reserved) at its peak; CUDA only

    def memory_summary(self):
        """Peak host RAM; on CUDA the peak VRAM (allocated, reserved) over the run and allocated per stage
        ("before": text encoding and loading)."""
        import resource
        gib = 2 ** 30
        line = f"peak host RAM {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib:.2f} GiB"
        if self.peaks:
            stages = ", ".join(f"{k} {a / gib:.2f}" for k, (a, _) in self.peaks.items())
            line += (f", peak VRAM allocated {max(a for a, _ in self.peaks.values()) / gib:.2f} GiB, reserved "
                     f"{max(r for _, r in self.peaks.values()) / gib:.2f} GiB (allocated per stage, GiB: {stages})")
        return line


def load_models(model_dir, device="cpu", dtype="float32", plan=None):
    """Transformer, VAE and scheduler config. With a plan, the transformer's blocks beyond
    plan.mmdit_resident stream from pinned host memory, and its modulation weights never reach the GPU."""
    start = time.perf_counter()
    snap = Snapshot(model_dir)
    snap.require("transformer", "vae", "scheduler")
    dt = torch_dtype(dtype)
    transformer = load_mmdit(snap, dt, "cpu")
    if transformer.cfg.use_additional_t_cond:
        raise LoadError(f"{model_dir}: use_additional_t_cond models (Qwen-Image-Layered) are not edit models")
    vae = load_vae(snap, dt, "cpu")
    models = place_models(transformer, vae, SchedulerConfig.from_dict(snap.config("scheduler")), device, dt, plan)
    models.timings["load"] = time.perf_counter() - start
    return models


def place_models(transformer, vae, scheduler_cfg, device, dtype, plan=None):
    """Models built on the host -> EditModels on `device`. The modulation weights stay on the host either
    way (modulation_table_streamed visits them once per edit); with a plan, the blocks beyond
    plan.mmdit_resident stream from pinned host memory."""
    stream = None
    if plan is not None:
        stream = stream_blocks(transformer.transformer_blocks, device, plan.mmdit_resident)
        try:
            move_except(transformer, device, transformer.transformer_blocks)
        except BaseException:
            stream.remove()     # no hooks or pinned buffers left behind
            raise
    else:
        move_except_modulation(transformer, device)
    return EditModels(transformer, vae_to_device(vae, device), scheduler_cfg, device, dtype, plan, stream)


def encode_text(model_dir, image, prompts, device="cpu", dtype="float32", area=1024 * 1024, resize="pil",
                plan=None):
    """Prompts -> list of ([1, L_i, D] embeddings, [1, L_i] mask), one per prompt, from the snapshot's
    text_encoder/ + processor/. The VL model sees the condition image at its ≈1 MP size, as the reference
    does. The text encoder is loaded for this call only and freed afterwards (it is ~16 GB in bf16); with
    a plan, its layers beyond the plan's resident counts stream from pinned host memory."""
    return encode_texts(model_dir, [(image, prompts)], device, dtype, area, resize, plan)[0]


def encode_texts(model_dir, jobs, device="cpu", dtype="float32", area=1024 * 1024, resize="pil", plan=None):
    """encode_text for many (image, prompts) jobs with one load of the text encoder."""
    from engine.text.processor import load_processor
    from engine.models.text_encoder import load_text_encoder
    snap = Snapshot(model_dir)
    snap.require("text_encoder")
    processor = load_processor(snap, resize=resize)
    te = load_text_encoder(snap, torch_dtype(dtype), "cpu" if plan is not None else device)
    try:
        return run_text_encoder(processor, te, jobs, device, area, plan)
    finally:
        del te      # ~16 GB: gone before the transformer loads
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()


def run_text_encoder(processor, te, jobs, device, area=1024 * 1024, plan=None):
    """encode_texts with a built text encoder (on `device`, or on the host when a plan streams it). With a
    plan, the streamed layers' hooks and pinned host buffers are released before returning (errors too);
    the caller drops `te` to free its device memory."""
    from engine.models.text_encoder import encode_prompts
    handles = []
    try:
        if plan is not None:
            handles.append(stream_blocks(te.layers, device, plan.te_resident, skip=()))
            handles.append(stream_blocks(te.visual.blocks, device, plan.vision_resident, skip=()))
            # the 1.1 GB embedding table stays on the host: a lookup of a few thousand rows, copied over
            move_except(te, device, te.layers, te.visual.blocks, te.embed_tokens)
        results = []
        for image, prompts in jobs:
            prompt_image = image.resize(condition_size(*image.size, area), resample=Image.LANCZOS)
            embeds, mask = encode_prompts(processor, te, prompts, prompt_image)
            results.append([(embeds[i:i + 1, :int(mask[i].sum())].cpu(), mask[i:i + 1, :int(mask[i].sum())].cpu())
                            for i in range(len(prompts))])
    finally:
        for h in handles:  # unpin the host buffers before the transformer pins its own
            h.remove()
    return results


def condition_size(width, height, area=1024 * 1024):
    """The size (~area pixels) the condition image is resized to: the input's aspect ratio, multiples of 32."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    w, h = round(w / 32) * 32, round(h / 32) * 32
    if w == 0 or h == 0:
        raise LoadError(f"image is {width}x{height} px: its aspect ratio is too extreme to edit (crop it first)")
    return w, h


def image_to_tensor(img, width, height):
    """PIL RGB -> [1, 3, H, W] float32 in [-1, 1], Lanczos-resized to (width, height)."""
    img = img.resize((width, height), resample=Image.LANCZOS)
    a = np.array(img).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(a).permute(2, 0, 1)[None] - 1.0


def tensor_to_image(x):
    """[1, 3, H, W] in [-1, 1] -> PIL RGB (round to nearest)."""
    a = (x * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).float().cpu().numpy()
    return Image.fromarray((a * 255).round().astype("uint8"))


def pack(z):
    """[B, C, H, W] latents -> [B, H/2 * W/2, 4C] tokens of 2x2 patches (channel-major within a patch)."""
    B, C, H, W = z.shape
    return z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(tokens, H, W):
    B, _, D = tokens.shape
    C = D // 4
    return tokens.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def pad_text(embeds, lengths):
    """Right-pad a list of [L_i, D] to one [B, L, D] batch (zeros past each length)."""
    L = max(e.shape[0] for e in embeds)
    out = embeds[0].new_zeros(len(embeds), L, embeds[0].shape[-1])
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
    return out, torch.tensor(lengths)


def _prompt_rows(embeds, mask, what):
    """[1, L, D] embeddings + optional [1, L] mask -> ([valid L, D], valid length)."""
    if embeds is None:
        return None
    if embeds.dim() != 3 or embeds.shape[0] != 1:
        raise LoadError(f"{what} must be [1, L, D], got {tuple(embeds.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise LoadError(f"{what}_mask is {tuple(mask.shape)}, expected {tuple(embeds.shape[:2])} to match {what}")
    n = int(mask_to_lengths(mask, what + "_mask")[0]) if mask is not None else embeds.shape[1]
    if n == 0:
        raise LoadError(f"{what} has no valid token")
    return embeds[0, :n], n


def _sync(device):
    """Stage timings must include the GPU work queued by the stage."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _mark(models, stage, start):
    """Record the stage's time (its GPU work included) and, on CUDA, its peak VRAM, then reset the peak.
    stage "before" is everything the process did before this edit (text encoding, loading); over several
    edits with the same models each stage keeps its largest peak."""
    dev = models.device
    _sync(dev)
    if start is not None:
        models.timings[stage] = time.perf_counter() - start
    if str(dev).startswith("cuda"):
        old = models.peaks.get(stage, (0, 0))
        models.peaks[stage] = (max(old[0], torch.cuda.max_memory_allocated(dev)),
                               max(old[1], torch.cuda.max_memory_reserved(dev)))
        torch.cuda.reset_peak_memory_stats(dev)


def edit(models: EditModels, image, prompt_embeds, prompt_mask=None, negative_embeds=None, negative_mask=None,
         opts: RunOptions = None, progress=None):
    """image: PIL RGB; prompt embeddings [1, L, D] (+ masks [1, L]). CFG runs when negative embeddings are
    given and opts.cfg > 1, cond and uncond batched as one B=2 forward, or, when the plan says so to save
    activation memory, one row at a time through each block or as two B=1 forwards. Returns a PIL image."""
    opts = opts or RunOptions()
    mm, vae, dev, dt = models.transformer, models.vae, models.device, models.dtype
    _mark(models, "before", None)
    t0 = time.perf_counter()
    cw, ch = condition_size(*image.size, opts.condition_area)
    multiple = vae.cfg.scale_factor * 2
    width = (opts.width or cw) // multiple * multiple
    height = (opts.height or ch) // multiple * multiple
    if width < multiple or height < multiple:
        raise LoadError(f"output size {width}x{height} is too small; use at least {multiple}x{multiple}")

    with torch.inference_mode():
        cond_pixels = image_to_tensor(image, cw, ch).to(dev, dt)
        plan = models.plan
        cond = vae.encode(cond_pixels, tile=plan.encode_tile if plan else None)
        cond_latents = pack(vae.normalize(cond))  # [1, Nc, 64]
        _mark(models, "vae_encode", t0)

        rows = [_prompt_rows(prompt_embeds, prompt_mask, "prompt_embeds")]
        use_cfg = negative_embeds is not None and opts.cfg > 1
        if use_cfg:
            rows.append(_prompt_rows(negative_embeds, negative_mask, "negative_prompt_embeds"))
        txt, txt_len = pad_text([r[0].to(dev, dt) for r in rows], [r[1] for r in rows])
        # txt_len stays on the host: the model copies it without a sync and reads it to choose backends
        B = txt.shape[0]

        lh, lw = 2 * (height // multiple), 2 * (width // multiple)  # latent size
        gen = torch.Generator("cpu").manual_seed(opts.seed)
        noise = torch.randn((1, 1, vae.cfg.z_dim, lh, lw), generator=gen, dtype=dt)  # the reference's layout
        latents = pack(noise[:, 0].to(dev))  # [1, N, 64]
        cond_tokens = cond_latents.expand(B, -1, -1)
        img_shapes = [(1, lh // 2, lw // 2), (1, ch // multiple, cw // multiple)]
        rope = mm.rope(img_shapes, txt.shape[1], dev)

        mu = sched.image_seq_mu(latents.shape[1], models.scheduler)
        sigmas, timesteps = sched.sigmas_for(models.scheduler, opts.steps, mu=mu, sigmas=opts.sigmas)
        sigmas = sigmas.to(dev)
        t1 = time.perf_counter()
        t_model = [(ts.to(dt) / 1000).to(dev) for ts in timesteps]  # the reference's timestep / 1000
        mods = modulation_table_streamed(mm, t_model, dev)  # every step's, before the loop
        split = plan.cfg_split if plan is not None else "batched"
        for i in range(len(timesteps)):
            t = t_model[i].expand(B)
            x = torch.cat([latents.expand(B, -1, -1), cond_tokens], dim=1)
            if split == "forwards":
                v = torch.cat([mm(x[j:j + 1], txt[j:j + 1], txt_len[j:j + 1], t[j:j + 1], img_shapes, rope=rope,
                                  mods=mods[i]) for j in range(B)])[:, : latents.shape[1]]
            else:
                v = mm(x, txt, txt_len, t, img_shapes, rope=rope, mods=mods[i],
                       rows_per_block=1 if split == "rows" else None)[:, : latents.shape[1]]
            if use_cfg:
                pos, neg = v[:1], v[1:]
                comb = neg + opts.cfg * (pos - neg)
                v = comb * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
            latents = sched.euler_step(latents, v, sigmas[i], sigmas[i + 1])
            if progress is not None:
                progress(i)
        del mods    # the table is done with: the VAE decode gets its memory
        _mark(models, "denoise", t1)

        t2 = time.perf_counter()
        z = vae.denormalize(unpack(latents, lh, lw))
        out = tensor_to_image(vae.decode(z, tile=plan.decode_tile if plan else None))
        _mark(models, "vae_decode", t2)
    return out
