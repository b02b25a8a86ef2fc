"""What an output PNG records about how it was made, as PNG text: `parameters` in the A1111 style that
image browsers show, and `qwen_image_edit` as JSON with every field. No timestamp: the same edit gives the
same bytes."""
import json
from pathlib import Path

from engine import __version__
from engine.pipelines.edit import SPEC as EDIT


def edit_parameters(models, job, size, cfg_on):
    """models: EditModels (its .source); job: prompt or prompt_embeds, negative_prompt, images, seed, steps,
    cfg, sampler (and for an inpaint mask, outpaint, inpaint_strength); size: the output (w, h); cfg_on:
    whether CFG ran."""
    source = models.source or {}
    p = {"prompt": getattr(job, "prompt", None), "negative_prompt": getattr(job, "negative_prompt", None) if cfg_on else None,
         "prompt_embeds": getattr(job, "prompt_embeds", None) and Path(job.prompt_embeds).name,
         "images": [Path(i).name for i in getattr(job, "images", None) or []],
         "seed": job.seed, "steps": job.steps, "cfg": job.cfg if cfg_on else 1.0, "sampler": job.sampler,
         "size": f"{size[0]}x{size[1]}", "model": source.get("model"), "pipeline": (models.spec or EDIT).class_name,
         "transformer": source.get("transformer") and Path(source["transformer"]).name,
         "weights": source.get("weights"),
         # the text encoder's file and weights, when it ran here (a --prompt-embeds edit did not run it)
         "text_encoder": _name(getattr(job, "text_encoder", None)) if getattr(job, "prompt", None) else None,
         "text_weights": getattr(job, "text_weights", None) if getattr(job, "prompt", None) else None,
         "loras": [{"file": Path(f).name, "scale": s} for f, s in source.get("loras", [])],
         "mask": getattr(job, "mask", None) and Path(job.mask).name, "outpaint": getattr(job, "outpaint", None),
         "strength": getattr(job, "inpaint_strength", None),
         "engine": f"qwen-image-edit-engine {__version__}"}
    return {k: v for k, v in p.items() if v is not None and v != []}


def _name(path):
    return path and Path(path).name


def png_text(models, job, size, cfg_on):
    p = edit_parameters(models, job, size, cfg_on)
    lines = [p.get("prompt", f"(prompt embeddings from {p.get('prompt_embeds')})")]
    if "negative_prompt" in p:
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = [f"Steps: {p['steps']}", f"Sampler: {p['sampler']}", f"CFG scale: {p['cfg']}", f"Seed: {p['seed']}",
              f"Size: {p['size']}", f"Model: {p.get('model')}"]
    fields += [f"Transformer: {p['transformer']}"] if "transformer" in p else []
    fields += [f"Weights: {p['weights']}"] if "weights" in p else []
    fields += [f"Text encoder: {p['text_encoder']}"] if "text_encoder" in p else []
    fields += [f"Text weights: {p['text_weights']}"] if "text_weights" in p else []
    fields += [f"Lora: {lo['file']}:{lo['scale']:g}" for lo in p.get("loras", [])]
    fields += [f"Mask: {p['mask']}"] if "mask" in p else []
    fields += [f"Outpaint: {p['outpaint']}"] if "outpaint" in p else []
    fields += [f"Denoising strength: {p['strength']:g}"] if "strength" in p else []
    fields.append(f"Version: {p['engine']}")
    lines.append(", ".join(fields))
    return {"parameters": "\n".join(lines), "qwen_image_edit": json.dumps(p, ensure_ascii=False)}
