"""An edit's VRAM budget from what the user gives (snapshot, image, prompts or embeddings, output size):
sized exactly where it can be (prompts tokenized, no model loaded), then planned by engine.vram.planner."""
from PIL import Image

from loaders import LoadError, Snapshot, torch_dtype

from engine.pipelines.common import condition_size


def edit_job(model_dir, image_size, width, height, cfg_batch, text_encoder, dtype, area=1024 * 1024, steps=50,
             text_len=None, vl_tokens=None):
    """(engine.vram.memory.Job, ModelSizes) of one edit of an image of image_size with the snapshot's configs.
    text_len / vl_tokens: the MMDiT text tokens and VL image tokens when known (prompt_lengths), else the
    Job's upper bounds."""
    from engine.config import MMDiTConfig, VAEConfig
    from engine.vram.memory import Job, model_sizes_from_configs
    from engine.models.text_encoder import read_config
    snap = Snapshot(model_dir)
    cw, ch = condition_size(*image_size, area)
    text_cfg = read_config(snap.config("text_encoder")) if text_encoder else None
    sizes = model_sizes_from_configs(MMDiTConfig.from_dict(snap.config("transformer")), text_cfg,
                                     VAEConfig.from_dict(snap.config("vae")), torch_dtype(dtype).itemsize)
    return Job(width or cw, height or ch, cw, ch, batch=cfg_batch, steps=steps, text_encoder=text_encoder,
               text_len=text_len, vl_tokens=vl_tokens), sizes


def prompt_lengths(model_dir, image, prompts, area=1024 * 1024, resize="pil"):
    """(MMDiT text tokens of the longest prompt, VL image tokens) that encode_text will produce, from the
    tokenizer and the image preprocessing alone (no model loaded): the planner's exact text sizes."""
    from engine.text.processor import TEMPLATE_DROP, load_processor
    processor = load_processor(Snapshot(model_dir), resize=resize)
    inputs = processor(list(prompts), image.resize(condition_size(*image.size, area), resample=Image.LANCZOS))
    n_image = int(inputs["image_grid_thw"].prod()) // processor.image_cfg.merge_size ** 2
    return int(inputs["attention_mask"].sum(1).max()) - TEMPLATE_DROP, n_image


def make_plan(model_dir, image_size, width, height, cfg_batch, text_encoder, budget, mode, dtype, area=1024 * 1024,
              steps=50, text_len=None, vl_tokens=None):
    """The VRAM plan (engine.vram.planner) for one edit of an image of image_size under `budget` bytes."""
    from engine.vram.planner import plan
    job, sizes = edit_job(model_dir, image_size, width, height, cfg_batch, text_encoder, dtype, area, steps,
                          text_len, vl_tokens)
    return plan(budget, job, sizes, mode)


def text_sizes(model_dir, image, prompts=None, embeds=None):
    """(MMDiT text tokens, VL image tokens) of an edit: from prompt embeddings [1, L, D] when given (no VL
    tokens then), else from tokenizing the prompts."""
    if embeds:
        return max(e.shape[1] for e in embeds), None
    return prompt_lengths(model_dir, image, prompts)


def resolve_budget(vram, device="cuda"):
    """--vram text (None: what the GPU has free) -> bytes; more than the GPU has free is refused."""
    from engine.vram.planner import default_budget, parse_size
    available = default_budget(device)
    budget = parse_size(vram) if vram else available
    if budget > available:
        raise LoadError(f"--vram {vram} is more than this GPU has free ({available / 2 ** 30:.2f} GiB); "
                        "give at most that, or close what else uses the GPU")
    return budget


def least_budget(model_dir, image_size, width, height, cfg_batch, text_encoder, dtype, steps=50, text_len=None,
                 vl_tokens=None):
    """The smallest budget (bytes) any plan runs this edit in."""
    from engine.vram.planner import smallest_budget
    job, sizes = edit_job(model_dir, image_size, width, height, cfg_batch, text_encoder, dtype, steps=steps,
                          text_len=text_len, vl_tokens=vl_tokens)
    return smallest_budget(job, sizes, "stream")
