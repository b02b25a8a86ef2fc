"""The steps every pipeline shares: condition latents, the CFG denoise loop, decode, image <-> tensor,
and `edit`, their composition. What differs per pipeline is its EditSpec (spec.py; one small module each:
edit.py, edit_plus.py, generate.py (zero images)), chosen from the snapshot's model_index.json when the
models load (load.py); inpaint.py composes the same steps with its init latents and mask blend.

Only orchestration lives here; the math is in models/, scheduler.py and ops.
"""
import time

import numpy as np
import torch
from PIL import Image

from loaders import LoadError

from engine import scheduler as sched
from engine.config import RunOptions
from engine.models.mmdit import mask_to_lengths
from engine.pipelines import mod_cache
from engine.pipelines.edit import SPEC as EDIT
from engine.pipelines.load import EditModels, load_models, place_models  # noqa: F401 (the pipelines' API)
from engine.pipelines.spec import condition_size  # noqa: F401
from engine.pipelines.text import encode_text, encode_texts, run_text_encoder  # noqa: F401
from engine.vram.offload import modulation_table_streamed


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


def _prompt_rows(embeds, mask, what, limit=None):
    """[1, L, D] embeddings + optional [1, L] mask -> ([valid L, D], valid length), cut to `limit` tokens."""
    if embeds is None:
        return None
    if embeds.dim() != 3 or embeds.shape[0] != 1:
        raise LoadError(f"{what} must be [1, L, D], got {tuple(embeds.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise LoadError(f"{what}_mask is {tuple(mask.shape)}, expected {tuple(embeds.shape[:2])} to match {what}")
    n = int(mask_to_lengths(mask, what + "_mask")[0]) if mask is not None else embeds.shape[1]
    if n == 0:
        raise LoadError(f"{what} has no valid token")
    n = min(n, limit or n)
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


def output_size(models, images, opts):
    """(width, height) of the edit: opts' size or the pipeline's default, floored to the latent grid."""
    spec = models.spec or EDIT
    ow, oh = spec.output_size([im.size for im in images], opts.condition_area)
    multiple = models.vae.cfg.scale_factor * 2
    width, height = (opts.width or ow) // multiple * multiple, (opts.height or oh) // multiple * multiple
    if width < multiple or height < multiple:
        raise LoadError(f"output size {width}x{height} is too small; use at least {multiple}x{multiple}")
    return width, height


def condition_latents(models, images, area):
    """Each image at its VAE size -> normalized latents as tokens: ([1, ΣNc, 64], [(1, h, w)] per image)."""
    spec, vae, plan = models.spec or EDIT, models.vae, models.plan
    multiple = vae.cfg.scale_factor * 2
    tokens, shapes = [torch.zeros(1, 0, 4 * vae.cfg.z_dim, device=models.device, dtype=models.dtype)], []
    for im, (w, h) in zip(images, spec.vae_sizes([im.size for im in images], area)):
        z = vae.encode(image_to_tensor(im, w, h).to(models.device, models.dtype),
                       tile=plan.encode_tile if plan else None)
        tokens.append(pack(vae.normalize(z)))
        shapes.append((1, h // multiple, w // multiple))
    return torch.cat(tokens, dim=1), shapes


def modulations(models, timesteps, t_model):
    """Every block's modulation for every step (the weights visit once). Without a VRAM plan the table is
    kept on the models for the next edit with the same schedule (a server's repeated requests skip the
    precompute); the weights never change after load (LoRAs are fused then). Under a plan it is rebuilt
    each time: the plan counts on it being freed before the VAE decode. models.mod_cache (a folder; the
    CLI and the server set it) keeps tables on disk for the next process (engine.pipelines.mod_cache)."""
    key = (tuple(timesteps.tolist()), models.dtype)
    if models.plan is None and key in models.mod_tables:
        return models.mod_tables[key]
    mods = None
    disk = models.mod_cache and mod_cache.table_key(models, key[0])     # a folder: the table kept on disk
    if disk:
        mods = mod_cache.load_table(models.mod_cache, disk, models.device, len(t_model),
                                    len(models.transformer.transformer_blocks), models.dtype)
    if mods is None:
        mods = modulation_table_streamed(models.transformer, t_model, models.device)
        if disk:
            mod_cache.save_table(models.mod_cache, disk, mods)
    if models.plan is None:
        models.mod_tables.clear()      # one schedule kept: 26 MB at 4 steps, 330 MB at 50 (full size, bf16)
        models.mod_tables[key] = mods
    return mods


def denoise(models, latents, cond_tokens, txt, txt_len, img_shapes, sigmas, timesteps, cfg, progress=None,
            blend=None):
    """The flow-match Euler loop with true CFG (norm rescale) when txt has 2 rows. latents [1, N, 64];
    cond_tokens [B, Nc, 64]; txt [B, L, D] right-padded, txt_len [B] on the host. Rows run batched, or, when
    the plan says so to save activation memory, one at a time through each block or as two B=1 forwards.
    blend(i, latents) -> latents runs after each step (an inpaint puts the re-noised original back).
    Under torchrun --parallel (models.parallel: engine.parallel) every rank runs this loop on rank 0's inputs."""
    mm, dev, dt, plan = models.transformer, models.device, models.dtype, models.plan
    par = getattr(models, "parallel", None)
    if par is not None:
        latents, cond_tokens, txt, txt_len, img_shapes, sigmas, timesteps, cfg, blend = par.share(
            models, latents, cond_tokens, txt, txt_len, img_shapes, sigmas, timesteps, cfg, blend)
    B = txt.shape[0]
    rope = mm.rope(img_shapes, txt.shape[1], dev)
    t_model = [(ts.to(dt) / 1000).to(dev) for ts in timesteps]  # the reference's timestep / 1000
    t0 = time.perf_counter()
    mods = modulations(models, timesteps, t_model)  # every step's, before the loop
    split = plan.cfg_split if plan is not None else "batched"
    sigmas = sigmas.to(dev)
    _sync(dev)
    marks = [time.perf_counter()]
    models.step_times = {"table": marks[0] - t0, "steps": []}    # seconds: the modulation table, then each step
    for i in range(len(timesteps)):
        t = t_model[i].expand(B)
        x = torch.cat([latents.expand(B, -1, -1), cond_tokens], dim=1)
        if par is not None:   # this rank's row / token shard; every row's velocity comes back
            v = par.velocity(mm, x, txt, txt_len, t, img_shapes, rope, mods[i])[:, : latents.shape[1]]
        elif split == "forwards":
            v = torch.cat([mm(x[j:j + 1], txt[j:j + 1], txt_len[j:j + 1], t[j:j + 1], img_shapes, rope=rope,
                              mods=mods[i]) for j in range(B)])[:, : latents.shape[1]]
        else:
            v = mm(x, txt, txt_len, t, img_shapes, rope=rope, mods=mods[i],
                   rows_per_block=1 if split == "rows" else None)[:, : latents.shape[1]]
        if B > 1:
            v = sched.cfg_velocity(v, cfg)
        latents = sched.euler_step(latents, v, sigmas[i], sigmas[i + 1])
        if blend is not None:
            latents = blend(i, latents)
        _sync(dev)                  # each step's own time (a progress bar that moves with the GPU)
        marks.append(time.perf_counter())
        models.step_times["steps"].append(marks[-1] - marks[-2])
        if progress is not None:
            progress(i)
    return latents


def text_batch(models, prompt_embeds, prompt_mask, negative_embeds, negative_mask, cfg):
    """The prompt (+ the negative prompt when CFG runs) -> (txt [B, L, D] right-padded on the device, txt_len
    [B] on the host: the model copies it without a sync and reads it to choose backends)."""
    limit = (models.spec or EDIT).max_text_tokens
    rows = [_prompt_rows(prompt_embeds, prompt_mask, "prompt_embeds", limit)]
    if negative_embeds is not None and cfg > 1:
        rows.append(_prompt_rows(negative_embeds, negative_mask, "negative_prompt_embeds", limit))
    return pad_text([r[0].to(models.device, models.dtype) for r in rows], [r[1] for r in rows])


def latent_size(models, width, height):
    """(h, w) of the latent grid of a width x height output (2 latent px per token)."""
    multiple = models.vae.cfg.scale_factor * 2
    return 2 * (height // multiple), 2 * (width // multiple)


def draw_noise(models, gen, lh, lw):
    """Seeded noise drawn on the CPU in the reference's layout [1, 1, z, h, w] and dtype -> [1, N, 64] tokens."""
    noise = torch.randn((1, 1, models.vae.cfg.z_dim, lh, lw), generator=gen, dtype=models.dtype)
    return pack(noise[:, 0].to(models.device))


def schedule(models, opts, n_tokens):
    """(sigmas [steps + 1], timesteps [steps]) of opts' sampler, shifted for n_tokens noisy tokens."""
    cfg = sched.sampler_config(opts.sampler, models.scheduler)
    return sched.sigmas_for(cfg, opts.steps, mu=sched.image_seq_mu(n_tokens, cfg), sigmas=opts.sigmas)


def denoise_and_decode(models, latents, cond_tokens, cond_shapes, txt, txt_len, sigmas, timesteps, lh, lw, cfg,
                       progress=None, blend=None):
    """denoise (cond_tokens [1, Nc, 64], shared by the rows), then the VAE decode -> a PIL image."""
    vae = models.vae
    img_shapes = [(1, lh // 2, lw // 2)] + cond_shapes
    t1 = time.perf_counter()
    latents = denoise(models, latents, cond_tokens.expand(txt.shape[0], -1, -1), txt, txt_len, img_shapes,
                      sigmas, timesteps, cfg, progress, blend)
    _mark(models, "denoise", t1)   # the modulation table is freed: the VAE decode gets its memory

    t2 = time.perf_counter()
    z = vae.denormalize(unpack(latents, lh, lw))
    out = tensor_to_image(vae.decode(z, tile=models.plan.decode_tile if models.plan else None))
    _mark(models, "vae_decode", t2)
    return out


def edit(models: EditModels, images, prompt_embeds, prompt_mask=None, negative_embeds=None, negative_mask=None,
         opts: RunOptions = None, progress=None):
    """images: one PIL RGB image or a list (the pipeline's "Picture 1, 2, ..." in order; none for text to
    image); prompt embeddings [1, L, D] (+ masks [1, L]). CFG runs when negative embeddings are given and
    opts.cfg > 1, cond and uncond as one B=2 batch (or split under a VRAM plan). Returns a PIL image."""
    opts = opts or RunOptions()
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    (models.spec or EDIT).check_images(len(images))
    _mark(models, "before", None)
    t0 = time.perf_counter()
    width, height = output_size(models, images, opts)

    with torch.inference_mode():
        cond_tokens, cond_shapes = condition_latents(models, images, opts.condition_area)  # [1, ΣNc, 64]
        _mark(models, "vae_encode", t0)
        txt, txt_len = text_batch(models, prompt_embeds, prompt_mask, negative_embeds, negative_mask, opts.cfg)
        lh, lw = latent_size(models, width, height)
        latents = draw_noise(models, torch.Generator("cpu").manual_seed(opts.seed), lh, lw)  # [1, N, 64]
        sigmas, timesteps = schedule(models, opts, latents.shape[1])
        return denoise_and_decode(models, latents, cond_tokens, cond_shapes, txt, txt_len, sigmas, timesteps,
                                  lh, lw, opts.cfg, progress)
