"""jobs.jsonl for `cli.py batch`: one edit per line, all checked before any work starts."""
import json
from pathlib import Path

from .safetensors_io import LoadError

FIELDS = {"image", "images", "out", "prompt", "negative_prompt", "prompt_embeds", "seed", "steps", "cfg", "width",
          "height", "sampler", "lora"}
TYPES = {"seed": int, "steps": int, "cfg": (int, float), "width": int, "height": int, "prompt": str,
         "negative_prompt": str, "prompt_embeds": str, "out": str, "sampler": str}
SAMPLERS = ("default", "lightning")


def _strings(value, where, name):
    """A string or a list of strings -> list of strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise LoadError(f"{where}: {name} must be a string or a list of strings")
    return items


def read_jobs(path, force=False):
    """Each line: {"image" (a path) or "images" (a list, in Picture 1, 2, 3 order), "out", and "prompt" or
    "prompt_embeds"; optional "negative_prompt", "seed", "steps", "cfg", "width", "height", "sampler",
    "lora" ("FILE[:SCALE]" or a list of them; replaces the command line's --lora for that line)}. Returns
    the list of dicts with "images" (and "lora", when given) as lists; any bad line is one LoadError
    naming it."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path} does not exist")
    jobs, outs = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            job = json.loads(line)
        except ValueError as e:
            raise LoadError(f"{where}: not a JSON object ({e})") from None
        if not isinstance(job, dict):
            raise LoadError(f"{where}: each line must be a JSON object")
        unknown = sorted(set(job) - FIELDS)
        if unknown:
            raise LoadError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
        if ("image" in job) == ("images" in job) or "out" not in job or (("prompt" in job) == ("prompt_embeds" in job)):
            raise LoadError(f"{where}: needs image (or images), out, and exactly one of prompt / prompt_embeds")
        wrong = [k for k, t in TYPES.items() if k in job and (not isinstance(job[k], t) or isinstance(job[k], bool))]
        if wrong:
            raise LoadError(f"{where}: {', '.join(wrong)} has the wrong type (numbers for seed/steps/cfg/width/"
                            "height, strings for the rest)")
        if job.get("sampler", "default") not in SAMPLERS:
            raise LoadError(f"{where}: sampler {job['sampler']!r} is not one of {', '.join(SAMPLERS)}")
        job["images"] = _strings(job.pop("image", None) or job.get("images"), where, "images")
        if "lora" in job:
            job["lora"] = _strings(job["lora"], where, "lora")
        out = Path(job["out"])
        if out.suffix.lower() != ".png":
            raise LoadError(f"{where}: out {out} must end in .png")
        if out.exists() and not force:
            raise LoadError(f"{where}: {out} exists; pass --force to overwrite it")
        if str(out.resolve()) in outs:
            raise LoadError(f"{where}: {out} is the output of an earlier line too")
        outs.add(str(out.resolve()))
        jobs.append(job)
    if not jobs:
        raise LoadError(f"{path} holds no job")
    return jobs
