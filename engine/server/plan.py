"""The VRAM plan of a warm server: made once at start for the largest job it will accept (the pipeline's
most images at ≈1 MP, an output of up to max_pixels, CFG, the longest prompt, MAX_STEPS), so every
accepted request fits the weights placed at load.

Unlike `cli.py edit`, the text encoder does not leave the GPU before the MMDiT arrives: both stay loaded.
The text encoder therefore streams fully (no layer resident), and the MMDiT is planned in the budget less
the text stage's whole peak, so that stage fits beside the MMDiT's resident weights, and the few text
weights that stay on the GPU (final norm, patch embedding, merger) fit beside the denoise stage."""
import dataclasses
import math

from loaders import LoadError

from engine.pipelines import pipeline_for
from engine.server.form import MAX_SIDE, MAX_STEPS

MIN_SIDE = 256      # px: a server that cannot fit a 256x256 output under its budget does not start


def serve_plan(model_dir, budget, dtype, max_pixels, mode="auto", fp8=False, text_fp8=False):
    """(Plan, the largest output area in pixels that fits `budget` bytes, at most max_pixels). Planned for a
    square output of that area (its side a multiple of 16); outputs of other aspect ratios and the same
    area need the same memory to within the VAE's tile rounding. fp8: the block Linears are float8_e4m3fn
    (--weights fp8 or an fp8 file: budget.fp8_blocks), counted at their size; text_fp8: the text encoder's
    language-model Linears likewise (--text-weights fp8 or an fp8 --text-encoder file: budget.fp8_text)."""
    from engine.pipelines.budget import edit_job
    from engine.vram.memory import text_peak, weights_on_gpu
    from engine.vram.planner import MARGIN_FRACTION, gib, gib_up, need, plan, smallest_budget
    spec = pipeline_for(model_dir)
    side = min(math.isqrt(max_pixels), MAX_SIDE) // 16 * 16
    job, sizes = edit_job(model_dir, [(1024, 1024)] * spec.max_images, side, side, 2, True, dtype,
                          steps=MAX_STEPS, fp8=fp8, text_fp8=text_fp8)
    text = text_peak(sizes, job, 0, 0)
    reserve = math.ceil(text * (1 + MARGIN_FRACTION))
    mmdit_job = dataclasses.replace(job, text_encoder=False)

    def fits(s):
        try:
            return plan(budget - reserve, dataclasses.replace(mmdit_job, width=s, height=s), sizes, mode)
        except LoadError:
            return None
    best = fits(side)
    if best is None:        # the largest square side (a multiple of 16) that fits, by bisection
        low, high = MIN_SIDE // 16, side // 16 - 1
        if fits(low * 16) is None:
            least = smallest_budget(dataclasses.replace(mmdit_job, width=MIN_SIDE, height=MIN_SIDE), sizes, mode)
            raise LoadError(f"--vram {gib(budget)} is too small to serve {spec.class_name} edits of "
                            f"{spec.max_images} image(s) and a {MIN_SIDE}x{MIN_SIDE} output with the text encoder "
                            f"loaded beside the transformer; the smallest budget that fits is {gib_up(least + reserve)}")
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid * 16) else (low, mid - 1)
        side = low * 16
        best = fits(side)
    peaks = {**best.peaks, "text": text + weights_on_gpu(sizes, best.mmdit_resident)}
    best = dataclasses.replace(best, budget=budget, peaks=peaks, te_resident=0, vision_resident=0,
                               needs={**best.needs, "text": need(peaks["text"])})
    return best, side * side


def summary(plan, max_pixels):
    """The plan's lines for the server's start-up output."""
    return (plan.summary() + f"\n  text encoder  streamed (no layer resident), beside the transformer; peak "
            f"{plan.peaks['text'] / 2 ** 30:.2f} GiB\n  outputs up to {max_pixels / 1e6:.2f} MP")
