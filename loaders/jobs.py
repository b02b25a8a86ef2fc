"""jobs.jsonl for `cli.py batch`: one edit per line, all checked before any work starts."""
import json
from pathlib import Path

from .safetensors_io import LoadError

FIELDS = {"image", "out", "prompt", "negative_prompt", "prompt_embeds", "seed", "steps", "cfg", "width", "height"}


def read_jobs(path, force=False):
    """Each line: {"image", "out", and "prompt" or "prompt_embeds"; optional "negative_prompt", "seed",
    "steps", "cfg", "width", "height"}. Returns the list of dicts; any bad line is one LoadError naming it."""
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
        missing = [k for k in ("image", "out") if k not in job]
        if missing or (("prompt" in job) == ("prompt_embeds" in job)):
            raise LoadError(f"{where}: needs image, out, and exactly one of prompt / prompt_embeds")
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
