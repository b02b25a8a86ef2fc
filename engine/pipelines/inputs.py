"""What an edit's inputs are, read and checked before any model loads, for both faces (the CLI and the
server): images against the snapshot's pipeline, LoRAs against its transformer, prompt-embedding files."""
import torch

from loaders import LoadError, Snapshot, read_image, read_tensors

from engine.config import MMDiTConfig
from engine.models.mmdit import MMDiT
from engine.pipelines import pipeline_for


def read_images(paths, model_dir):
    """Image paths -> RGB images, their count checked against the snapshot's pipeline first."""
    pipeline_for(model_dir).check_images(len(paths))
    return [read_image(p) for p in paths]


def read_loras(texts, model_dir):
    """"FILE[:SCALE]" texts -> [(Lora, scale)], each file read and matched against the snapshot's transformer
    (built on the meta device: no weights), so a bad LoRA costs no model load."""
    if not texts:
        return []
    from engine.transforms.lora import parse_lora_arg
    from loaders.lora import match_lora, read_lora
    with torch.device("meta"):
        model = MMDiT(MMDiTConfig.from_dict(Snapshot(model_dir).config("transformer")))
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    loras = [(read_lora(path), scale) for path, scale in map(parse_lora_arg, texts)]
    for lora, _ in loras:
        match_lora(lora, shapes)
    return loras


def check_transformer(file, model_dir):
    """--transformer FILE checked from its header against the snapshot's transformer config (fp8, another
    component, other shapes: one line) before the text encoder or anything else runs."""
    if file is None:
        return
    from engine.models.mmdit import param_shapes
    from loaders.single_file import check_transformer_file
    check_transformer_file(file, param_shapes(MMDiTConfig.from_dict(Snapshot(model_dir).config("transformer"))))


def check_text_encoder(file, model_dir):
    """--text-encoder FILE checked from its header against the snapshot's text_encoder/config.json (a transformer
    or VAE file, missing or extra tensors, other shapes, scales, fp8 formats: one line) before anything runs."""
    if file is None:
        return
    from engine.models.text_encoder import text_encoder_shapes
    from loaders.text_encoder_file import check_text_encoder_file
    check_text_encoder_file(file, text_encoder_shapes(Snapshot(model_dir)))


def read_embeds(embeds_file):
    """A file from `encode`: prompt_embeds (+ _mask, negative_prompt_embeds, negative_prompt_embeds_mask)."""
    tensors = read_tensors(embeds_file)
    if "prompt_embeds" not in tensors:
        raise LoadError(f"{embeds_file} has no 'prompt_embeds' tensor (has: {', '.join(sorted(tensors)) or 'none'})")
    return tensors


def rows_to_tensors(rows):
    """encode_text's [(embeds, mask), ...] (prompt, then the negative prompt if any) -> read_embeds' dict."""
    tensors = {"prompt_embeds": rows[0][0], "prompt_embeds_mask": rows[0][1]}
    if len(rows) > 1:
        tensors.update(negative_prompt_embeds=rows[1][0], negative_prompt_embeds_mask=rows[1][1])
    return tensors
