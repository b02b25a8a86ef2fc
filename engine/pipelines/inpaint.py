"""Inpainting and outpainting: an Edit snapshot runs as diffusers' QwenImageEditInpaintPipeline, a Qwen-Image
one as QwenImageInpaintPipeline. What differs from the edit / text-to-image steps (common.py):
- the working size: an Edit inpaint's is the image's ≈1 MP size (no --width/--height); a Qwen-Image
  inpaint's is width x height, default 1024² whatever the image (stretched, as the reference does);
- the image's latents are *sampled* from the VAE posterior with the seeded generator, before the noise is
  drawn (the reference's order of draws), and noised to the first step strength picks; an Edit inpaint
  also takes them as its condition image;
- the mask (white = repaint) is resized, binarised at 0.5 and brought to the latent grid (nearest) as
  diffusers' mask processor and prepare_mask_latents do; after each step the latents outside it are put
  back as the original noised to the next step (the original itself after the last);
- the output is the whole decoded image: the reference pastes nothing back.
Outpainting pads the canvas with its edge pixels and repaints the padding."""
import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from loaders import LoadError, read_image, to_rgb
from loaders.images import MAX_PIXELS, open_image

from engine.pipelines import edit, generate

EDIT_INPAINT = dataclasses.replace(edit.SPEC, class_name="QwenImageEditInpaintPipeline")
INPAINT = dataclasses.replace(generate.SPEC, class_name="QwenImageInpaintPipeline")
_FOR = {edit.SPEC.class_name: EDIT_INPAINT, generate.SPEC.class_name: INPAINT}


def inpaint_spec(spec):
    """The inpaint pipeline of a snapshot's pipeline (EditSpec)."""
    if spec in (EDIT_INPAINT, INPAINT):
        return spec
    if spec.class_name not in _FOR:
        raise LoadError(f"--mask/--outpaint: {spec.class_name} has no inpaint pipeline in diffusers to follow; use a "
                        "Qwen-Image-Edit (QwenImageEditPipeline) or Qwen-Image (QwenImagePipeline) snapshot")
    return _FOR[spec.class_name]


def working_size(spec, image_size, width=None, height=None, area=1024 * 1024):
    """(w, h) the inpaint runs and outputs at, multiples of 16."""
    if spec.min_images:                     # Edit: the reference overrides any size with the image's own
        if width or height:
            raise LoadError("an Edit inpaint works at the image's ≈1 MP size, as QwenImageEditInpaintPipeline "
                            "does; drop --width/--height")
        width, height = edit.SPEC.output_size([image_size], area)
    else:
        width, height = width or spec.default_size[0], height or spec.default_size[1]
    if width < 16 or height < 16:
        raise LoadError(f"inpaint size {width}x{height} is too small; use at least 16x16")
    return width // 16 * 16, height // 16 * 16


def first_step(steps, strength):
    """The reference's get_timesteps: strength picks the first of `steps` steps to run."""
    if not 0 < strength <= 1:       # NaN too
        raise LoadError(f"--strength must be in (0, 1] (1 repaints from pure noise), got {strength}")
    t_start = int(max(steps - min(steps * strength, steps), 0))
    if steps - t_start < 1:
        raise LoadError(f"--strength {strength} with --steps {steps} runs no step (the first step would be "
                        f"{t_start} of {steps}); raise --strength or --steps")
    return t_start


def read_mask(path):
    """A mask file -> RGB PIL image (white = repaint), EXIF orientation applied; an alpha channel is dropped,
    as diffusers' load_image does."""
    im = open_image(path, "mask")
    return im.convert("RGB") if "A" in im.getbands() or im.mode == "P" else to_rgb(im)


def parse_outpaint(text):
    """"L,T,R,B" -> pixels added on each side."""
    try:
        pad = tuple(int(v) for v in text.split(","))
    except ValueError:
        pad = ()
    if len(pad) != 4 or min(pad) < 0 or not any(pad):
        raise LoadError(f"--outpaint wants L,T,R,B: four pixel counts >= 0, not all 0 (got {text!r})")
    return pad


def outpaint(image, pad, mask=None):
    """Pad the canvas with its edge pixels by (left, top, right, bottom) -> (canvas, mask): white in the
    padding; inside, black or `mask` (resized to the image first)."""
    l, t, r, b = pad
    w, h = image.width + l + r, image.height + t + b
    if w * h > MAX_PIXELS:
        raise LoadError(f"--outpaint {l},{t},{r},{b} makes a {w}x{h} canvas ({w * h / 1e6:.0f} MP), over the "
                        f"{MAX_PIXELS // 10 ** 6} MP limit for images; pad less")
    canvas = Image.fromarray(np.pad(np.asarray(image), ((t, b), (l, r), (0, 0)), mode="edge"))
    inside = np.zeros((image.height, image.width, 3), np.uint8) if mask is None else \
        np.asarray(mask.resize(image.size, resample=Image.LANCZOS))
    return canvas, Image.fromarray(np.pad(inside, ((t, b), (l, r), (0, 0)), constant_values=255))


@dataclasses.dataclass
class InpaintJob:
    """What `cli.py edit --mask/--outpaint` read and checked before any model loads."""
    spec: object            # EDIT_INPAINT or INPAINT
    image: Image.Image      # the canvas (padded when outpainting)
    mask: Image.Image
    strength: float
    notes: list

    @property
    def seen(self):
        """The images the text encoder and the planner see: the canvas for an Edit inpaint, none for Qwen-Image."""
        return [self.image] if self.spec.min_images else []

    def run(self, models, images, prompt_embeds, prompt_mask=None, negative_embeds=None, negative_mask=None,
            opts=None, progress=None):
        """common.edit's signature (images unused: the job holds its canvas)."""
        return inpaint(models, self.image, self.mask, prompt_embeds, prompt_mask, negative_embeds, negative_mask,
                       opts, self.strength, progress)


def read_job(spec, image_paths, mask_path=None, pad_text=None, strength=None, steps=50, width=None, height=None):
    """Inputs of an inpaint, checked: one image, a readable mask and/or an outpaint, strength (default 0.6,
    1.0 when only outpainting) in (0, 1] that runs at least one step, a working size the pipeline allows."""
    spec = inpaint_spec(spec)
    if len(image_paths) != 1:
        raise LoadError(f"an inpaint takes one --image (the picture to repaint), got {len(image_paths)}")
    strength = (0.6 if mask_path else 1.0) if strength is None else strength
    first_step(steps, strength)
    pad = parse_outpaint(pad_text) if pad_text else None
    image = read_image(image_paths[0])
    mask = read_mask(mask_path) if mask_path else None
    notes = []
    if mask is not None and mask.size != image.size:
        notes.append(f"the mask is {mask.width}x{mask.height}, the image {image.width}x{image.height}: the mask is "
                     "resized (stretched) to the working size, as the reference does")
    if pad:
        image, mask = outpaint(image, pad, mask)
    w, h = working_size(spec, image.size, width, height)
    if not np.asarray(mask.convert("L")).max() >= 128:
        notes.append("the mask is all black: nothing is repainted")
    notes.append(f"{spec.class_name}: strength {strength:g} runs {steps - first_step(steps, strength)} of {steps} "
                 f"steps at {w}x{h}")
    return InpaintJob(spec, image, mask, strength, notes)


def mask_tokens(mask, width, height, lh, lw, channels):
    """PIL mask -> [1, N, 4 * channels] tokens of 0/1, as the reference's mask processor (Lanczos resize,
    grayscale, /255, binarise at 0.5) and prepare_mask_latents (nearest to the latent grid) make it."""
    from engine.pipelines.common import pack
    m = mask.resize((width, height), resample=Image.LANCZOS).convert("L")
    a = torch.from_numpy(np.array(m).astype(np.float32) / 255.0)[None, None]   # [1, 1, H, W]
    a = (a >= 0.5).to(torch.float32)
    return pack(F.interpolate(a, size=(lh, lw)).repeat(1, channels, 1, 1))


@torch.inference_mode()
def posterior(vae, image, tile=None):
    """image [B, 3, H, W] in [-1, 1] -> the VAE posterior (mean, logvar) [B, z, H/8, W/8]; vae.encode
    returns the mean only. Same path as vae.encode (tiles included)."""
    from engine.models.vae import encoder_halo, tiled
    f = vae.cfg.scale_factor
    x = tiled(vae.encoder.down_path, vae._prep(image, f), tile, encoder_halo(vae.cfg), f, 1)
    return vae.quant_conv(vae.encoder.latent_path(x)).chunk(2, dim=1)


def sample_latents(models, image, gen):
    """The image's normalized latents as tokens, sampled from the posterior with `gen` (CPU, the reference's
    [1, z, 1, h, w] layout and dtype), normalized as the inpaint reference does ((z - mean) * (1 / std))."""
    from engine.pipelines.common import pack
    vae = models.vae
    mean, logvar = posterior(vae, image.to(models.device, models.dtype),
                             tile=models.plan.encode_tile if models.plan else None)
    eps = torch.randn((1, mean.shape[1], 1, *mean.shape[2:]), generator=gen, dtype=mean.dtype)[:, :, 0]
    z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps.to(mean.device)
    stats = lambda v: torch.tensor(v).view(1, -1, 1, 1).to(z.device, z.dtype)
    return pack((z - stats(vae.cfg.latents_mean)) * (1.0 / stats(vae.cfg.latents_std)))


def inpaint(models, image, mask, prompt_embeds, prompt_mask=None, negative_embeds=None, negative_mask=None,
            opts=None, strength=0.6, progress=None):
    """image, mask: PIL (mask white = repaint, any size); prompt embeddings as for edit (made with the canvas
    for an Edit inpaint, with no image for Qwen-Image). Returns a PIL image of the working size."""
    from engine.config import RunOptions
    from engine.pipelines import common
    opts = opts or RunOptions()
    spec = inpaint_spec(models.spec or edit.SPEC)
    t_start = first_step(opts.steps, strength)
    width, height = working_size(spec, image.size, opts.width, opts.height, opts.condition_area)
    common._mark(models, "before", None)
    t0 = time.perf_counter()
    with torch.inference_mode():
        lh, lw = common.latent_size(models, width, height)
        gen = torch.Generator("cpu").manual_seed(opts.seed)
        original = sample_latents(models, common.image_to_tensor(image, width, height), gen)  # [1, N, 64]
        common._mark(models, "vae_encode", t0)
        noise = common.draw_noise(models, gen, lh, lw)              # drawn after the image's sample
        m = mask_tokens(mask, width, height, lh, lw, models.vae.cfg.z_dim).to(models.device, models.dtype)
        sigmas, timesteps = common.schedule(models, opts, noise.shape[1])
        sigmas, timesteps = sigmas[t_start:], timesteps[t_start:]
        s = sigmas.to(models.device, models.dtype)
        noised = lambda k: s[k] * noise + (1.0 - s[k]) * original        # the scheduler's scale_noise
        last = len(timesteps) - 1
        blend = lambda i, x: (1 - m) * (original if i == last else noised(i + 1)) + m * x
        cond, shapes = (original, [(1, lh // 2, lw // 2)]) if spec.min_images else (noise[:, :0], [])
        txt, txt_len = common.text_batch(models, prompt_embeds, prompt_mask, negative_embeds, negative_mask, opts.cfg)
        return common.denoise_and_decode(models, noised(0), cond, shapes, txt, txt_len, sigmas, timesteps,
                                         lh, lw, opts.cfg, progress, blend)
