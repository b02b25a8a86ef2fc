"""Qwen-Image-Edit-2509/2511 (QwenImageEditPlusPipeline): 1-3 images, "Picture i:" each in the template;
the VL model sees each at ≈384², the VAE at ≈1 MP; the output takes the last image's size. The 2511
transformer's zero_cond_t (the condition tokens take the t=0 modulation) comes from its config."""
from engine.pipelines.spec import EditSpec
from engine.text.templates import edit_plus_template

SPEC = EditSpec("QwenImageEditPlusPipeline", max_images=3, template=edit_plus_template, vl_area=384 * 384)
