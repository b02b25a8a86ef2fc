"""Prompt + image -> the Qwen2.5-VL inputs of Qwen-Image-Edit, as transformers' Qwen2VLProcessor makes them.

Text: the Edit chat template around each prompt, tokenized, with the one `<|image_pad|>` expanded to the
image's merged-patch count, padded across the batch on the tokenizer config's side.
Image: RGB (alpha over white) -> smart resize to multiples of patch*merge (28) within min/max pixels ->
bicubic -> x/255 -> CLIP mean/std -> flattened patches [grid_h*grid_w, C*T*14*14] in merge-block order.

Resize backends: transformers 5 picks its torchvision image processor when torchvision is installed and
its PIL one otherwise. "pil" reproduces the PIL processor bit for bit; "torch" reproduces the torchvision
one bit for bit on CPU (checked with torchvision 0.29.1, which resizes the uint8 image with
F.interpolate(bicubic, antialias=True) and folds 1/255 into mean/std). The two differ by a few uint8
levels after the resize (up to ~0.1 after normalization on a 1 MP photo-like image).
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from loaders import LoadError, Snapshot, read_json

from engine.text.tokenizer import Tokenizer

from engine.text.templates import EDIT_TEMPLATE, TEMPLATE_DROP  # noqa: F401 (re-exported)

MAX_PROMPT_TOKENS = 1024    # templated text tokens (image tokens not counted) we accept
IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PromptError(ValueError):
    """A prompt or image this engine refuses; str() is one line for the user."""


@dataclass(frozen=True)
class ImageConfig:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL.Image.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d):
        """preprocessor_config.json: `size` {shortest_edge, longest_edge} (transformers 5) and/or the older
        min_pixels/max_pixels, which win when both are present (as in the reference's __init__)."""
        size = d.get("size") or {}
        min_pixels = d.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or cls.min_pixels
        max_pixels = d.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or cls.max_pixels
        keep = {f: (tuple(d[f]) if isinstance(d[f], list) else d[f]) for f in cls.__dataclass_fields__
                if f in d and f not in ("min_pixels", "max_pixels")}
        return cls(min_pixels=int(min_pixels), max_pixels=int(max_pixels), **keep)


def smart_resize(height, width, factor, min_pixels, max_pixels):
    """(h, w) -> nearest (H, W), both multiples of `factor`, with min_pixels <= H*W <= max_pixels."""
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def check_image(image, patch_size=14):
    width, height = image.size
    if min(width, height) < patch_size:
        raise PromptError(f"image is {width}x{height} px; each side must be at least {patch_size} px "
                          "(one vision patch)")
    if max(width, height) / min(width, height) > 200:
        raise PromptError(f"image is {width}x{height} px; the aspect ratio must be below 200")


def to_rgb(image):
    """PIL image -> RGB uint8 array [H, W, 3]; transparency is composited over white, as the reference does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"))


def preprocess_image(image, cfg=ImageConfig(), resize="pil"):
    """PIL image -> pixel_values float32 [gh*gw, C*T*P*P], image_grid_thw int64 [1, 3] = (1, gh, gw)."""
    check_image(image, cfg.patch_size)
    pixels = to_rgb(image) if cfg.do_convert_rgb else np.asarray(image)  # [H, W, C] uint8
    height, width = pixels.shape[:2]
    factor = cfg.patch_size * cfg.merge_size
    if cfg.do_resize:
        height, width = smart_resize(height, width, factor, cfg.min_pixels, cfg.max_pixels)
        if resize == "pil":
            pixels = np.asarray(Image.fromarray(pixels).resize((width, height), resample=cfg.resample))
        elif resize == "torch":
            chw = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].contiguous()
            if chw.shape[-2:] != (height, width):
                mode = {2: "bilinear", 3: "bicubic"}.get(cfg.resample)
                if mode is None:
                    raise LoadError(f"resample={cfg.resample} has no torch equivalent; use resize='pil'")
                chw = F.interpolate(chw, size=(height, width), mode=mode, align_corners=False, antialias=True)
            pixels = chw[0].permute(1, 2, 0).numpy()
        else:
            raise ValueError(f"resize must be 'pil' or 'torch', got {resize!r}")
    if height % factor or width % factor:
        raise PromptError(f"image is {width}x{height} px; with resizing off both sides must be multiples of {factor}")
    x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)  # [C, H, W] uint8 (a writable copy)
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=torch.float32)[:, None, None]
    if resize == "torch" and cfg.do_rescale and cfg.do_normalize:
        # the torchvision processor folds the rescale into mean/std (float32 arithmetic)
        x = (x.float() - mean * (1.0 / cfg.rescale_factor)) / (std * (1.0 / cfg.rescale_factor))
    else:
        # the PIL processor rescales in float64, rounds to float32, then normalizes in float32
        x = (x.double() * cfg.rescale_factor).float() if cfg.do_rescale else x.float()
        x = (x - mean) / std if cfg.do_normalize else x
    return patchify(x, cfg), torch.tensor([[1, height // cfg.patch_size, width // cfg.patch_size]])


def patchify(x, cfg):
    """[C, H, W] -> [gh*gw, C*T*P*P]: rows in (gh/m, gw/m, m, m) block order, each row (C, T, P, P) with the
    frame repeated T times (a still image is a clip of T identical frames)."""
    C, H, W = x.shape
    P, m, T = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = H // P, W // P
    x = x.reshape(C, gh // m, m, P, gw // m, m, P).permute(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
    x = x[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, T, -1, -1)
    return x.reshape(gh * gw, C * T * P * P).contiguous()


def prompt_image_size(width, height, area=1024 * 1024):
    """The ≈1 MP size QwenImageEditPipeline gives the prompt image: (W, H), multiples of 32, aspect kept."""
    w = math.sqrt(area * width / height)
    h = w / (width / height)
    return round(w / 32) * 32, round(h / 32) * 32


def resize_prompt_image(image, area=1024 * 1024):
    """What the pipeline does before the processor sees the image: PIL Lanczos to prompt_image_size."""
    w, h = prompt_image_size(*image.size, area=area)
    if w == 0 or h == 0:
        raise PromptError(f"image is {image.size[0]}x{image.size[1]} px; its aspect ratio is too extreme to edit")
    return image.resize((w, h), resample=Image.LANCZOS)


class Processor:
    """processor(prompts, images) -> dict(input_ids, attention_mask, pixel_values, image_grid_thw) for the
    images shared by every prompt (image_grid_thw has one row per image)."""

    def __init__(self, tokenizer, image_cfg=ImageConfig(), resize="pil", template=EDIT_TEMPLATE):
        self.tokenizer, self.image_cfg, self.resize, self.template = tokenizer, image_cfg, resize, template
        self.image_token_id = tokenizer.token_id(IMAGE_TOKEN)

    @classmethod
    def load(cls, snapshot, resize="pil"):
        """processor/ is what QwenImageEditPipeline tokenizes with; tokenizer/ is the fallback for the text."""
        snapshot = snapshot if isinstance(snapshot, Snapshot) else Snapshot(snapshot)
        folder = next((snapshot.root / n for n in ("processor", "tokenizer") if _has_tokenizer(snapshot.root / n)),
                      None)
        if folder is None:
            raise LoadError(f"{snapshot.root} has no tokenizer files in processor/ or tokenizer/; re-download it")
        return cls.load_folders(folder, snapshot.root / "processor", resize=resize)

    @classmethod
    def load_folders(cls, tokenizer_folder, image_folder, resize="pil"):
        config_path = Path(image_folder) / "preprocessor_config.json"
        image_cfg = ImageConfig.from_dict(read_json(config_path)) if config_path.is_file() else ImageConfig()
        return cls(Tokenizer.from_folder(tokenizer_folder), image_cfg, resize=resize)

    def tokenize(self, prompts, n_image_tokens, template=None):
        """Templated ids per prompt, the i-th image placeholder expanded to n_image_tokens[i] tokens ->
        padded (input_ids, attention_mask)."""
        template = template or self.template
        counts = [n_image_tokens] if isinstance(n_image_tokens, int) else list(n_image_tokens)
        rows = []
        for i, prompt in enumerate(prompts):
            if IMAGE_TOKEN in prompt or VIDEO_TOKEN in prompt:
                raise PromptError(f"prompt {i} contains {IMAGE_TOKEN} or {VIDEO_TOKEN}; remove it")
            ids = self.tokenizer.encode(template.format(prompt))
            where = [k for k, t in enumerate(ids) if t == self.image_token_id]
            if len(where) != len(counts):
                raise PromptError(f"the chat template must hold {len(counts)} {IMAGE_TOKEN} (one per image), "
                                  f"found {len(where)}")
            if len(ids) - len(counts) > MAX_PROMPT_TOKENS:
                raise PromptError(f"prompt {i} is {len(ids) - len(counts)} tokens with the chat template (images "
                                  f"not counted); the limit is {MAX_PROMPT_TOKENS}, shorten it")
            row, start = [], 0
            for k, n in zip(where, counts):
                row += ids[start:k] + [self.image_token_id] * n
                start = k + 1
            rows.append(row + ids[start:])
        return self.tokenizer.pad(rows)

    def __call__(self, prompts, images, template=None):
        """prompts: str or list; images: one PIL image or a list (in template order), shared by every prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        images = images if isinstance(images, (list, tuple)) else [images]
        patches = [preprocess_image(im, self.image_cfg, self.resize) for im in images]
        counts = [int(g.prod()) // self.image_cfg.merge_size ** 2 for _, g in patches]
        input_ids, attention_mask = self.tokenize(prompts, counts, template)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "pixel_values": torch.cat([p for p, _ in patches]), "image_grid_thw": torch.cat([g for _, g in patches])}


def _has_tokenizer(folder):
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()


def load_processor(snapshot, resize="pil"):
    return Processor.load(snapshot, resize=resize)
