"""Qwen-Image-Layered (QwenImageLayeredPipeline): one RGBA image -> n RGBA layers.

What differs from the edit: the text encoder never sees the image (Qwen-Image's text-only template, 34
tokens dropped, 512 kept); the image is seen at ~resolution² (640 or 1024, its aspect, multiples of 32) by
the 4-channel VAE; noise for layers + 1 frames of that size, the first frame (the composite) dropped before
decoding; layer3d rope (the condition image at frame -1); additional_t_cond = 0 (RGB) in the time
embedding; sigmas linspace(1, 0, steps + 1)[:-1] shifted by mu = sqrt(condition tokens / 256); true CFG
without the norm rescale unless asked (cfg_normalize)."""
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from loaders import LoadError, Snapshot, torch_dtype

from engine.pipelines.spec import EditSpec, condition_size
from engine.text.templates import GENERATE_DROP, GENERATE_TEMPLATE

# the reference's image_caption_prompt_en / _cn (its automatic caption when the prompt is empty), verbatim
CAPTION_TEMPLATE_EN = '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n# Image Annotator\nYou are a professional\nimage annotator. Please write an image caption based on the input image:\n1. Write the caption using natural,\ndescriptive language without structured formats or rich text.\n2. Enrich caption details by including: \n - Object\nattributes, such as quantity, color, shape, size, material, state, position, actions, and so on\n - Vision Relations\nbetween objects, such as spatial relations, functional relations, possessive relations, attachment relations, action\nrelations, comparative relations, causal relations, and so on\n - Environmental details, such as weather, lighting,\ncolors, textures, atmosphere, and so on\n - Identify the text clearly visible in the image, without translation or\nexplanation, and highlight it in the caption with quotation marks\n3. Maintain authenticity and accuracy:\n - Avoid\ngeneralizations\n - Describe all visible information in the image, while do not add information not explicitly shown in\nthe image\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n'
CAPTION_TEMPLATE_CN = '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n# 图像标注器\n你是一个专业的图像标注器。请基于输入图像，撰写图注:\n1.\n使用自然、描述性的语言撰写图注，不要使用结构化形式或富文本形式。\n2. 通过加入以下内容，丰富图注细节：\n - 对象的属性：如数量、颜色、形状、大小、位置、材质、状态、动作等\n -\n对象间的视觉关系：如空间关系、功能关系、动作关系、从属关系、比较关系、因果关系等\n - 环境细节：例如天气、光照、颜色、纹理、气氛等\n - 文字内容：识别图像中清晰可见的文字，不做翻译和解释，用引号在图注中强调\n3.\n保持真实性与准确性：\n - 不要使用笼统的描述\n -\n描述图像中所有可见的信息，但不要加入没有在图像中出现的内容\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n'
CAPTION_MAX_TOKENS = 512    # the reference's generate(max_new_tokens=512)
RESOLUTIONS = (640, 1024)   # the reference's buckets
LAYERS = (2, 10)            # the reference app's range (its slider); the pipeline itself checks none
CLASS_NAME = "QwenImageLayeredPipeline"


class LayeredSpec(EditSpec):
    def check_images(self, n):
        """The text encoder sees no image (n = 0); `cli.py edit` with this snapshot gets one line."""
        if n:
            raise LoadError(f"{CLASS_NAME} splits an image into layers: use `cli.py layers --image IN.png`")


SPEC = LayeredSpec(CLASS_NAME, max_images=0, min_images=0, template=lambda n: GENERATE_TEMPLATE,
                   drop=GENERATE_DROP, max_text_tokens=512)


@dataclass
class LayeredOptions:
    layers: int = 4
    resolution: int = 640
    steps: int = 50
    cfg: float = 4.0
    cfg_normalize: bool = False
    seed: int = 0
    sigmas: list = None
    area: int = None            # pixels the image is worked at; None: resolution² (tests shrink it)

    def check(self):
        if self.resolution not in RESOLUTIONS:
            raise LoadError(f"--resolution must be 640 or 1024 (the model's buckets), got {self.resolution}")
        if not LAYERS[0] <= self.layers <= LAYERS[1]:
            raise LoadError(f"--layers must be {LAYERS[0]} to {LAYERS[1]}, got {self.layers}")
        if self.steps < 1:
            raise LoadError(f"--steps must be at least 1, got {self.steps}")


def read_rgba(path):
    """An image file -> (PIL RGBA, note or None), EXIF orientation applied; one-line errors."""
    from loaders.images import open_image
    return rgba_input(open_image(path))


def rgba_input(img):
    """PIL image -> (RGBA image, note or None). An image with no alpha becomes opaque RGBA (as the
    reference app does with every input); an all-transparent one has nothing to split."""
    from loaders.images import to_rgb
    note = None
    if img.mode != "RGBA":
        had_alpha = img.mode in ("LA", "PA", "La", "RGBa") or "transparency" in img.info
        if not had_alpha:
            note = f"the image (mode {img.mode}) has no alpha: converted to opaque RGBA"
            img = to_rgb(img)       # 16-bit and float images scaled to 8 bits
        img = img.convert("RGBA")
    if img.getextrema()[3][1] == 0:
        raise LoadError("the image is fully transparent: there is nothing to split into layers")
    return img, note


def load_layered(model_dir, device="cpu", dtype="float32", plan=None, loras=(), transformer_file=None, weights=None):
    """Transformer (layer3d rope, additional_t_cond), 4-channel VAE and scheduler of a Layered snapshot, with
    the edit's loading options (engine.pipelines.load.load_models: a VRAM plan, LoRAs, a single-file
    transformer, fp8 weights). The configs are checked before any weight is read."""
    from engine.config import MMDiTConfig, VAEConfig
    from engine.pipelines import pipeline_for
    from engine.pipelines.load import load_models
    snap = Snapshot(model_dir)
    if pipeline_for(snap) is not SPEC:
        raise LoadError(f"{model_dir}: `layers` needs a Qwen-Image-Layered snapshot ({CLASS_NAME})")
    snap.require("transformer", "vae", "scheduler")
    if (VAEConfig.from_dict(snap.config("vae")).input_channels != 4
            or not MMDiTConfig.from_dict(snap.config("transformer")).use_additional_t_cond):
        raise LoadError(f"{model_dir}: not a Layered snapshot (needs an RGBA VAE and use_additional_t_cond)")
    models = load_models(snap.root, device, dtype, plan, loras, transformer_file, weights, layered=True)
    models.spec = SPEC
    return models


def caption_image(model_dir, image, use_en_prompt=False, opts: LayeredOptions = None, device="cpu", dtype="float32",
                  max_new_tokens=None, encoder=None, resize="pil", text_weights=None, text_encoder_file=None,
                  notes=None):
    """The reference's get_image_caption for an empty prompt: the image Lanczos-resized to the working size
    (what the reference shows the VL model), the caption template (Chinese unless use_en_prompt, the
    reference's default), greedy decoding with the snapshot's generation_config (engine.models.decode),
    special tokens skipped, stripped. resize: the VL processor's backend ("pil" or "torch", as
    engine.text.processor). text_weights, text_encoder_file, notes: the text encoder as the prompt encoding
    loads it (engine.pipelines.text.load_text_model), with its LM head. Returns (caption, generated ids)."""
    from PIL import Image

    from engine.models.decode import generation_settings, greedy_decode
    from engine.pipelines.text import load_text_model
    from engine.text.processor import Processor
    from loaders import read_json
    opts = opts or LayeredOptions()
    snap = model_dir if isinstance(model_dir, Snapshot) else Snapshot(model_dir)
    w, h = condition_size(*image.size, opts.area or opts.resolution ** 2)
    shown = image.resize((w, h), resample=Image.LANCZOS)
    processor = Processor.load(snap, resize=resize)
    template = CAPTION_TEMPLATE_EN if use_en_prompt else CAPTION_TEMPLATE_CN
    inputs = processor([""], shown, template)
    gen_path = snap.root / "text_encoder" / "generation_config.json"
    penalty, eos, _ = generation_settings(read_json(gen_path) if gen_path.is_file() else None,
                                          snap.config("text_encoder"))
    encoder = encoder or load_text_model(snap, dtype, device, text_weights, text_encoder_file, lm_head=True,
                                         notes=notes)
    ids = greedy_decode(encoder, inputs["input_ids"], inputs["pixel_values"].to(device, torch_dtype(dtype)),
                        inputs["image_grid_thw"], max_new_tokens or CAPTION_MAX_TOKENS, eos, penalty)
    return processor.tokenizer.backend.decode(ids, skip_special_tokens=True).strip(), ids


def denoise_layers(models, latents, cond, txt, txt_len, img_shapes, sigmas, timesteps, cfg, normalize,
                   progress=None):
    """Euler with true CFG (rows: prompt, negative) over [noise of every frame, condition] tokens."""
    from engine import scheduler as sched
    from engine.vram.offload import modulation_table_streamed
    mm, dev, dt = models.transformer, models.device, models.dtype
    B = txt.shape[0]
    rgb = torch.zeros(1, dtype=torch.long, device=dev)       # additional_t_cond: 0 = RGB(A) input
    rope = mm.rope(img_shapes, txt.shape[1], dev)
    t_model = [(ts.to(dt) / 1000).to(dev) for ts in timesteps]
    view = SimpleNamespace(time_embedding=lambda t: mm.time_embedding(t, rgb), cfg=mm.cfg,
                           transformer_blocks=mm.transformer_blocks)
    mods = modulation_table_streamed(view, t_model, dev)
    sigmas, n = sigmas.to(dev), latents.shape[1]
    split = models.plan.cfg_split if models.plan is not None else "batched"   # as common.denoise
    for i in range(len(timesteps)):
        x = torch.cat([latents, cond], dim=1).expand(B, -1, -1)
        t = t_model[i].expand(B)
        if split == "forwards":
            v = torch.cat([mm(x[j:j + 1], txt[j:j + 1], txt_len[j:j + 1], t[j:j + 1], img_shapes, rope=rope,
                              mods=mods[i], additional_t_cond=rgb) for j in range(B)])[:, :n]
        else:
            v = mm(x, txt, txt_len, t, img_shapes, rope=rope, mods=mods[i], additional_t_cond=rgb.expand(B),
                   rows_per_block=1 if split == "rows" else None)[:, :n]
        if B > 1:
            v = sched.cfg_velocity(v, cfg, normalize)
        latents = sched.euler_step(latents, v, sigmas[i], sigmas[i + 1])
        if progress is not None:
            progress(i)
    return latents


def layered(models, image, prompt_embeds, prompt_mask=None, negative_embeds=None, negative_mask=None,
            opts: LayeredOptions = None, progress=None):
    """image: PIL RGBA; prompt embeddings [1, L, D] (+ masks) of the text-only template. CFG runs when
    negative embeddings are given and opts.cfg > 1. Returns opts.layers PIL RGBA images (the model's order)."""
    from engine import scheduler as sched
    from engine.pipelines.common import _mark, image_to_tensor, pack, tensor_to_image, text_batch, unpack
    opts = opts or LayeredOptions()
    opts.check()
    if image.mode != "RGBA":
        raise LoadError(f"the image must be RGBA, got mode {image.mode} (see layered.rgba_input)")
    vae, dev, dt = models.vae, models.device, models.dtype
    w, h = condition_size(*image.size, opts.area or opts.resolution ** 2)
    lh, lw = h // vae.cfg.scale_factor, w // vae.cfg.scale_factor     # the reference floors to 16 px: w, h are 32s
    _mark(models, "before", None)
    t0 = time.perf_counter()
    with torch.inference_mode():
        plan = models.plan
        z = vae.encode(image_to_tensor(image, w, h).to(dev, dt),        # [1, 4, H, W] in -> [1, z, h, w]
                       tile=plan.encode_tile if plan else None)
        cond = pack(vae.normalize(z))                                     # [1, Nc, 64]
        _mark(models, "vae_encode", t0)
        txt, txt_len = text_batch(models, prompt_embeds, prompt_mask, negative_embeds, negative_mask, opts.cfg)
        frames = opts.layers + 1                                           # frame 0: the composite
        gen = torch.Generator("cpu").manual_seed(opts.seed)
        noise = torch.randn((1, frames, vae.cfg.z_dim, lh, lw), generator=gen, dtype=dt)
        latents = pack(noise[0]).reshape(1, -1, 4 * vae.cfg.z_dim).to(dev)  # [1, frames * N, 64]
        sigmas = np.linspace(1.0, 0, opts.steps + 1)[:-1] if opts.sigmas is None else opts.sigmas
        sigmas, timesteps = sched.sigmas_for(models.scheduler, opts.steps, mu=(cond.shape[1] / 256) ** 0.5,
                                             sigmas=sigmas)
        img_shapes = [(1, lh // 2, lw // 2)] * frames + [(1, lh // 2, lw // 2)]
        t1 = time.perf_counter()
        latents = denoise_layers(models, latents, cond, txt, txt_len, img_shapes, sigmas, timesteps, opts.cfg,
                                 opts.cfg_normalize, progress)
        _mark(models, "denoise", t1)
        t2 = time.perf_counter()
        z = vae.denormalize(unpack(latents.reshape(frames, -1, latents.shape[-1]), lh, lw))[1:]
        tile = plan.decode_tile if plan else None
        out = [tensor_to_image(vae.decode(z[i:i + 1], tile=tile)) for i in range(opts.layers)]  # one layer at a time
        _mark(models, "vae_decode", t2)
    return out
