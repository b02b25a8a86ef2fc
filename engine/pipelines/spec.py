"""What one pipeline does differently from the others: its chat template and the template tokens it drops,
how many images it takes (none for text to image), the sizes its images are seen at by the VL model and by
the VAE, where the output size comes from, and how many prompt-embedding tokens it keeps."""
import math
from dataclasses import dataclass
from typing import Callable

from loaders import LoadError

from engine.text.templates import TEMPLATE_DROP


def condition_size(width, height, area=1024 * 1024):
    """The size (~area pixels) an image is resized to: the input's aspect ratio, multiples of 32."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    w, h = round(w / 32) * 32, round(h / 32) * 32
    if w == 0 or h == 0:
        raise LoadError(f"image is {width}x{height} px: its aspect ratio is too extreme to edit (crop it first)")
    return w, h


@dataclass(frozen=True)
class EditSpec:
    class_name: str                     # model_index.json's _class_name
    max_images: int
    template: Callable[[int], str]      # n_images -> chat template with one {} for the prompt
    vl_area: int = None                 # pixels the VL model sees each image at; None: the VAE's size
    min_images: int = 1
    drop: int = TEMPLATE_DROP           # leading template tokens cut from the text encoder's output
    max_text_tokens: int = None         # prompt embeddings cut to this many (the reference's max_sequence_length)
    default_size: tuple = (1024, 1024)  # the output (w, h) when there is no image to take it from

    def check_images(self, n):
        if self.max_images == 0 and n:
            raise LoadError(f"{self.class_name} makes images from text: use `cli.py generate` (or `cli.py edit "
                            "--mask` to inpaint an image)")
        if not self.min_images <= n <= self.max_images:
            many = "one image" if self.max_images == 1 else f"1 to {self.max_images} images"
            raise LoadError(f"{self.class_name} takes {many} (--image, repeatable, in order), got {n}")

    def vae_sizes(self, sizes, area=1024 * 1024):
        """[(w, h)] of the images -> the sizes the VAE encodes them at (≈area each, own aspect ratio)."""
        return [condition_size(w, h, area) for w, h in sizes]

    def vl_sizes(self, sizes, area=1024 * 1024):
        """The sizes the images are resized to before the VL processor sees them."""
        return [condition_size(w, h, self.vl_area or area) for w, h in sizes]

    def output_size(self, sizes, area=1024 * 1024):
        """The default output size: the last image's VAE size, as the reference pipelines do."""
        return condition_size(*sizes[-1], area) if sizes else self.default_size
