"""Qwen-Image-Edit (QwenImageEditPipeline): one image, seen by the VL model and the VAE at ≈1 MP."""
from engine.pipelines.spec import EditSpec
from engine.text.templates import EDIT_TEMPLATE

SPEC = EditSpec("QwenImageEditPipeline", max_images=1, template=lambda n: EDIT_TEMPLATE)
