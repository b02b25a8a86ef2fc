"""The chat templates the Qwen-Image pipelines wrap a prompt in, and how many leading template tokens
they drop from the text encoder's output."""

SYSTEM = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
          "background), then explain how the user's text instruction should alter or modify the image. Generate a "
          "new image that meets the user's requirements while maintaining consistency with the original input where "
          "appropriate.<|im_end|>\n")
VISION = "<|vision_start|><|image_pad|><|vision_end|>"

# Qwen-Image-Edit: the one image straight before the prompt
EDIT_TEMPLATE = SYSTEM + "<|im_start|>user\n" + VISION + "{}<|im_end|>\n<|im_start|>assistant\n"
TEMPLATE_DROP = 64          # the system turn + "<|im_start|>user\n": the same 64 tokens in both templates


def edit_plus_template(n_images):
    """Qwen-Image-Edit-2509/2511: "Picture i: " + the vision span for each image, in order, then the prompt."""
    pictures = "".join(f"Picture {i + 1}: {VISION}" for i in range(n_images))
    return SYSTEM + "<|im_start|>user\n" + pictures + "{}<|im_end|>\n<|im_start|>assistant\n"


# Qwen-Image (text to image): no image; the system turn + "<|im_start|>user\n" are 34 tokens
GENERATE_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                     "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                     "<|im_end|>\n<|im_start|>assistant\n")
GENERATE_DROP = 34
