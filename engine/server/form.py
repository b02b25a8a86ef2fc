"""An edit request (multipart form) -> EditRequest, checked against the server's limits before it is
queued: field types (400), ranges and sizes (422), the upload's size (413). Images arrive as bytes and are
decoded with loaders.images.read_image's rules; no path from a request is ever opened."""
import io
import math
import threading
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from loaders import LoadError
from loaders.images import MAX_PIXELS, to_rgb

from engine.config import RunOptions
from engine.scheduler import SAMPLERS

MAX_UPLOAD = 50 * 2 ** 20       # bytes of one request body
MAX_IMAGES = 3                  # files per request; the snapshot's pipeline may take fewer
MAX_STEPS = 200
MAX_SIDE = 4096                 # px of the output's width or height
FIELDS = ("image", "prompt", "negative_prompt", "steps", "cfg", "seed", "width", "height", "sampler")


class ApiError(Exception):
    """An answer of `status` with {"error": message}; message is one line."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What this server accepts: the pipeline's image count, the output's pixels (a sane maximum, or less
    where the VRAM plan was made for less: `why` says which)."""
    spec: object                # engine.pipelines.spec.EditSpec
    max_pixels: int
    why: str
    multiple: int = 16          # the latent grid: output sides are floored to it


@dataclass
class EditRequest:
    """A checked edit: the uploaded images (bytes, decoded again by the worker), their names for the PNG's
    text, the prompts and the run's options."""
    images: list
    names: list
    prompt: str
    negative_prompt: str
    opts: RunOptions


_OPEN_LOCK = threading.Lock()   # Image.MAX_IMAGE_PIXELS and the warning filters are process-wide


def _open(data, name):
    """Image.open (the header only: no pixels decoded) and the pixel limit, under _OPEN_LOCK: PIL's own
    limit is raised to ours while it opens, then restored, one thread at a time."""
    with _OPEN_LOCK:
        limit = Image.MAX_IMAGE_PIXELS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                Image.MAX_IMAGE_PIXELS = MAX_PIXELS   # our own limit below, with our own message
                img = Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ApiError(422, f"{name} is {w}x{h} ({w * h / 1e6:.0f} MP), over the {MAX_PIXELS // 10**6} MP "
                            "limit; downscale it first")
    return img


def decode_image(data, name):
    """Bytes of an uploaded file -> RGB PIL image, EXIF orientation applied, 16-bit scaled, alpha over
    white (loaders.images.read_image's rules and pixel limit). Thread-safe: the routes decode uploads on
    several threads while the worker decodes its job's."""
    try:
        img = _open(data, name)
        img.load()                      # decoded outside the lock: decodes run side by side
        img = ImageOps.exif_transpose(img)
    except ApiError:
        raise
    except Image.DecompressionBombError:
        raise ApiError(422, f"{name} is over the {MAX_PIXELS // 10**6} MP limit; downscale it first") from None
    except UnidentifiedImageError:
        raise ApiError(400, f"cannot read image {name}: not an image file PIL can identify; "
                            "is it a complete PNG/JPEG/WebP file?") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ApiError(400, f"cannot read image {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                            "is it a complete PNG/JPEG/WebP file?") from None
    if img.width == 0 or img.height == 0:
        raise ApiError(400, f"image {name} has zero size")
    return to_rgb(img)


def _one(fields, key, convert, default):
    values = fields.get(key, [])
    if len(values) > 1:
        raise ApiError(400, f"{key} is given {len(values)} times; give it once")
    if not values:
        return default
    if not isinstance(values[0], str):
        raise ApiError(400, f"{key} must be a form field, not a file")
    text = values[0].strip() if convert is not str else values[0]
    if convert is str:
        return text
    try:
        return convert(text)
    except ValueError:
        kind = "an integer" if convert is int else "a number"
        raise ApiError(400, f"{key} must be {kind}, got {text[:40]!r}") from None


def _in_range(key, value, low, high, unit=""):
    if not low <= value <= high:
        raise ApiError(422, f"{key} must be {low} to {high}{unit}, got {value}")
    return value


def parse_edit(fields, limits):
    """fields: {name: [value, ...]} in form order, a value being a str or, for a file, (bytes, filename).
    Returns an EditRequest or raises ApiError."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")
    prompt = _one(fields, "prompt", str, None)
    if prompt is None or not prompt.strip():
        raise ApiError(400, "prompt is required (the edit instruction)")
    negative = _one(fields, "negative_prompt", str, " ")
    steps = _in_range("steps", _one(fields, "steps", int, 50), 1, MAX_STEPS)
    cfg = _one(fields, "cfg", float, 4.0)
    if not math.isfinite(cfg) or cfg < 0:
        raise ApiError(422, f"cfg must be a number >= 0 (1 turns CFG off), got {cfg}")
    seed = _in_range("seed", _one(fields, "seed", int, 0), 0, 2 ** 63 - 1)
    width, height = (_one(fields, k, int, None) for k in ("width", "height"))
    for key, value in (("width", width), ("height", height)):
        if value is not None:
            _in_range(key, value, limits.multiple, MAX_SIDE, " px")
    sampler = _one(fields, "sampler", str, "default").strip() or "default"
    if sampler not in SAMPLERS:
        raise ApiError(422, f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler[:40]!r}")

    uploads = fields.get("image", [])
    if not uploads:
        raise ApiError(400, "image is required: send 1 to 3 image files as 'image' fields, in order")
    if any(isinstance(u, str) for u in uploads):
        raise ApiError(400, "image must be a file upload (multipart/form-data), not a text field")
    spec = limits.spec
    if len(uploads) > spec.max_images:
        many = "one image" if spec.max_images == 1 else f"1 to {spec.max_images} images"
        raise ApiError(422, f"{spec.class_name} takes {many}, got {len(uploads)}")
    images, names, sizes = [], [], []
    for i, (data, filename) in enumerate(uploads):
        name = _file_name(filename, i)
        if not data:
            raise ApiError(400, f"image {name} is empty")
        sizes.append(decode_image(data, name).size)    # decoded to check it; the worker decodes it again
        images.append(data)
        names.append(name)

    try:
        ow, oh = spec.output_size(sizes)
        spec.vae_sizes(sizes)       # every image's VAE and VL sizes too: an extreme aspect ratio is
        spec.vl_sizes(sizes)        # refused here, not by the worker
    except LoadError as e:
        raise ApiError(422, str(e).splitlines()[0]) from None
    m = limits.multiple
    w, h = (width or ow) // m * m, (height or oh) // m * m
    for key, value, given in (("width", w, width), ("height", h, height)):
        if given is None and not m <= value <= MAX_SIDE:
            raise ApiError(422, f"the default output {w}x{h} (from the image's aspect ratio) has a {key} outside "
                                f"{m} to {MAX_SIDE} px; give width and height, or crop the image")
    if w * h > limits.max_pixels:
        raise ApiError(422, f"output {w}x{h} is {w * h / 1e6:.2f} MP, over this server's limit of "
                            f"{limits.max_pixels / 1e6:.2f} MP ({limits.why}); ask for a smaller width/height")
    opts = RunOptions(steps=steps, cfg=cfg, seed=seed, width=width, height=height, sampler=sampler)
    return EditRequest(images, names, prompt, negative, opts)


def _file_name(filename, i):
    """The upload's file name as the PNG's text records it (its last path part only), or image<i>."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return "".join(c for c in name if c.isprintable())[:200] or f"image{i + 1}"
