"""Qwen-Image (QwenImagePipeline): text to image. No condition image: the text-only template (34 tokens
dropped), prompt embeddings cut to 512 tokens (the reference's max_sequence_length), 1024² unless a size is
given (floored to multiples of 16). The rest is the edit's steps with zero condition tokens."""
from engine.pipelines.spec import EditSpec
from engine.text.templates import GENERATE_DROP, GENERATE_TEMPLATE

SPEC = EditSpec("QwenImagePipeline", max_images=0, min_images=0, template=lambda n: GENERATE_TEMPLATE,
                drop=GENERATE_DROP, max_text_tokens=512)


def generate(models, prompt_embeds, prompt_mask=None, negative_embeds=None, negative_mask=None, opts=None,
             progress=None):
    """Prompt embeddings [1, L, D] (+ masks) -> a PIL image of opts' size (default 1024²)."""
    from engine.pipelines.common import edit
    return edit(models, [], prompt_embeds, prompt_mask, negative_embeds, negative_mask, opts, progress)


def check_snapshot(spec):
    """`generate` runs text-to-image snapshots only: an edit snapshot gets one line naming its command."""
    from loaders import LoadError
    if spec.min_images > 0:
        raise LoadError(f"{spec.class_name} edits images: use `cli.py edit --image IN.png` (generate needs a "
                        "Qwen-Image snapshot, QwenImagePipeline)")
