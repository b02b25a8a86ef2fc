"""An edit's VRAM budget from what the user gives (snapshot, images, prompts or embeddings, output size):
sized by its pipeline exactly where it can be (prompts tokenized, no model loaded), then planned by
engine.vram.planner."""
from loaders import LoadError, Snapshot, torch_dtype

from engine.pipelines import pipeline_for


def _sizes(images):
    """PIL images or (w, h) pairs -> [(w, h)]."""
    items = images if isinstance(images, (list, tuple)) and not isinstance(images[0], int) else [images]
    return [tuple(im.size) if hasattr(im, "size") else tuple(im) for im in items]


def edit_job(model_dir, images, width, height, cfg_batch, text_encoder, dtype, area=1024 * 1024, steps=50,
             text_len=None, vl_tokens=None):
    """(engine.vram.memory.Job, ModelSizes) of one edit of `images` (PIL images or their (w, h) sizes) with
    the snapshot's configs. text_len / vl_tokens: the MMDiT text tokens and VL image tokens when known
    (prompt_lengths), else the Job's upper bounds."""
    from engine.config import MMDiTConfig, VAEConfig
    from engine.models.text_encoder import read_config
    from engine.text.processor import ImageConfig, smart_resize
    from engine.vram.memory import Job, model_sizes_from_configs
    snap = Snapshot(model_dir)
    spec = pipeline_for(snap)
    sizes = _sizes(images)
    spec.check_images(len(sizes))
    vae_sizes = spec.vae_sizes(sizes, area)
    ow, oh = spec.output_size(sizes, area)
    cw, ch = max(vae_sizes, key=lambda s: s[0] * s[1])      # the largest VAE encode
    if vl_tokens is None and text_encoder:    # the VL processor's own resize, at its default limits
        cfg = ImageConfig()
        f = cfg.patch_size * cfg.merge_size
        vl_tokens = sum(h * w // f ** 2 for h, w in (smart_resize(h, w, f, cfg.min_pixels, cfg.max_pixels)
                                                     for w, h in spec.vl_sizes(sizes, area)))
    text_cfg = read_config(snap.config("text_encoder")) if text_encoder else None
    model_sizes = model_sizes_from_configs(MMDiTConfig.from_dict(snap.config("transformer")), text_cfg,
                                           VAEConfig.from_dict(snap.config("vae")), torch_dtype(dtype).itemsize)
    job = Job(width or ow, height or oh, cw, ch, batch=cfg_batch, steps=steps, text_encoder=text_encoder,
              text_len=text_len, vl_tokens=vl_tokens, cond_tokens=sum((w // 16) * (h // 16) for w, h in vae_sizes))
    return job, model_sizes


def prompt_lengths(model_dir, images, prompts, area=1024 * 1024, resize="pil"):
    """(MMDiT text tokens of the longest prompt, VL image tokens) that encode_text will produce, from the
    tokenizer and the image preprocessing alone (no model loaded): the planner's exact text sizes."""
    from engine.pipelines.text import prompt_images
    from engine.text.processor import TEMPLATE_DROP, load_processor
    snap = Snapshot(model_dir)
    spec = pipeline_for(snap)
    processor = load_processor(snap, resize=resize)
    vl = prompt_images(spec, images, area)
    inputs = processor(list(prompts), vl, spec.template(len(vl)))
    n_image = int(inputs["image_grid_thw"].prod(-1).sum()) // processor.image_cfg.merge_size ** 2
    return int(inputs["attention_mask"].sum(1).max()) - TEMPLATE_DROP, n_image


def make_plan(model_dir, images, width, height, cfg_batch, text_encoder, budget, mode, dtype, area=1024 * 1024,
              steps=50, text_len=None, vl_tokens=None):
    """The VRAM plan (engine.vram.planner) for one edit of `images` under `budget` bytes."""
    from engine.vram.planner import plan
    job, sizes = edit_job(model_dir, images, width, height, cfg_batch, text_encoder, dtype, area, steps,
                          text_len, vl_tokens)
    return plan(budget, job, sizes, mode)


def text_sizes(model_dir, images, prompts=None, embeds=None):
    """(MMDiT text tokens, VL image tokens) of an edit: from prompt embeddings [1, L, D] when given (no VL
    tokens then), else from tokenizing the prompts."""
    if embeds:
        return max(e.shape[1] for e in embeds), None
    return prompt_lengths(model_dir, images, prompts)


def resolve_budget(vram, device="cuda"):
    """--vram text (None: what the GPU has free) -> bytes; more than the GPU has free is refused."""
    from engine.vram.planner import default_budget, parse_size
    available = default_budget(device)
    budget = parse_size(vram) if vram else available
    if budget > available:
        raise LoadError(f"--vram {vram} is more than this GPU has free ({available / 2 ** 30:.2f} GiB); "
                        "give at most that, or close what else uses the GPU")
    return budget


def least_budget(model_dir, images, width, height, cfg_batch, text_encoder, dtype, steps=50, text_len=None,
                 vl_tokens=None):
    """The smallest budget (bytes) any plan runs this edit in."""
    from engine.vram.planner import smallest_budget
    job, sizes = edit_job(model_dir, images, width, height, cfg_batch, text_encoder, dtype, steps=steps,
                          text_len=text_len, vl_tokens=vl_tokens)
    return smallest_budget(job, sizes, "stream")
