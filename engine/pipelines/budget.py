"""An edit's VRAM budget from what the user gives (snapshot, images, prompts or embeddings, output size):
sized by its pipeline exactly where it can be (prompts tokenized, no model loaded), then planned by
engine.vram.planner."""
from loaders import LoadError, Snapshot, torch_dtype

from engine.pipelines import pipeline_for


def _sizes(images):
    """PIL images or (w, h) pairs -> [(w, h)]; [] for none (text to image)."""
    if isinstance(images, (list, tuple)) and not images:
        return []
    items = images if isinstance(images, (list, tuple)) and not isinstance(images[0], int) else [images]
    return [tuple(im.size) if hasattr(im, "size") else tuple(im) for im in items]


def edit_job(model_dir, images, width, height, cfg_batch, text_encoder, dtype, area=1024 * 1024, steps=50,
             text_len=None, vl_tokens=None, fp8=False, text_fp8=False):
    """(engine.vram.memory.Job, ModelSizes) of one edit of `images` (PIL images or their (w, h) sizes) with
    the snapshot's configs. text_len / vl_tokens: the MMDiT text tokens and VL image tokens when known
    (prompt_lengths), else the Job's upper bounds. fp8 / text_fp8: the MMDiT's block Linears / the text
    encoder's language-model Linears held in fp8 (fp8_blocks / fp8_text)."""
    from engine.text.processor import ImageConfig, smart_resize
    from engine.vram.memory import Job
    snap = Snapshot(model_dir)
    spec = pipeline_for(snap)
    sizes = _sizes(images)
    spec.check_images(len(sizes))
    vae_sizes = spec.vae_sizes(sizes, area)
    ow, oh = spec.output_size(sizes, area)
    # the largest VAE encode; with no condition image, one at the output size (an inpaint's init image)
    cw, ch = max(vae_sizes, key=lambda s: s[0] * s[1]) if vae_sizes else (width or ow, height or oh)
    if vl_tokens is None and text_encoder:    # the VL processor's own resize, at its default limits
        cfg = ImageConfig()
        f = cfg.patch_size * cfg.merge_size
        vl_tokens = sum(h * w // f ** 2 for h, w in (smart_resize(h, w, f, cfg.min_pixels, cfg.max_pixels)
                                                     for w, h in spec.vl_sizes(sizes, area)))
    if text_len is not None and spec.max_text_tokens:
        text_len = min(text_len, spec.max_text_tokens)
    model_sizes = snapshot_sizes(snap, text_encoder, dtype, fp8, text_fp8)
    job = Job(width or ow, height or oh, cw, ch, batch=cfg_batch, steps=steps, text_encoder=text_encoder,
              text_len=text_len, vl_tokens=vl_tokens, cond_tokens=sum((w // 16) * (h // 16) for w, h in vae_sizes))
    return job, model_sizes


def snapshot_sizes(snap, text_encoder, dtype, fp8=False, text_fp8=False):
    """engine.vram.memory.ModelSizes from a snapshot's configs (the text encoder's only when it will run)."""
    from engine.config import MMDiTConfig, VAEConfig
    from engine.models.text_encoder import read_config
    from engine.vram.memory import model_sizes_from_configs
    text_cfg = read_config(snap.config("text_encoder")) if text_encoder else None
    return model_sizes_from_configs(MMDiTConfig.from_dict(snap.config("transformer")), text_cfg,
                                    VAEConfig.from_dict(snap.config("vae")), torch_dtype(dtype).itemsize, fp8=fp8,
                                    text_fp8=text_fp8)


def prompt_lengths(model_dir, images, prompts, area=1024 * 1024, resize="pil"):
    """(MMDiT text tokens of the longest prompt, VL image tokens) that encode_text will produce, from the
    tokenizer and the image preprocessing alone (no model loaded): the planner's exact text sizes."""
    from engine.pipelines.text import prompt_images, prompt_tokens
    from engine.text.processor import load_processor
    snap = Snapshot(model_dir)
    spec = pipeline_for(snap)
    processor = load_processor(snap, resize=resize)
    return prompt_tokens(processor, spec, prompts, prompt_images(spec, images, area))


def make_plan(model_dir, images, width, height, cfg_batch, text_encoder, budget, mode, dtype, area=1024 * 1024,
              steps=50, text_len=None, vl_tokens=None, fp8=False, text_fp8=False):
    """The VRAM plan (engine.vram.planner) for one edit of `images` under `budget` bytes."""
    from engine.vram.planner import plan
    job, sizes = edit_job(model_dir, images, width, height, cfg_batch, text_encoder, dtype, area, steps,
                          text_len, vl_tokens, fp8, text_fp8)
    return plan(budget, job, sizes, mode)


def text_sizes(model_dir, images, prompts=None, embeds=None):
    """(MMDiT text tokens, VL image tokens) of an edit: from prompt embeddings [1, L, D] when given (no VL
    tokens then), else from tokenizing the prompts."""
    if embeds:
        return max(e.shape[1] for e in embeds), None
    return prompt_lengths(model_dir, images, prompts)


def resolve_budget(vram, device="cuda"):
    """--vram text (None: what the GPU has free) -> bytes; more than the GPU has free is refused."""
    from engine.vram.planner import default_budget, parse_size
    available = default_budget(device)
    budget = parse_size(vram) if vram else available
    if budget > available:
        raise LoadError(f"--vram {vram} is more than this GPU has free ({available / 2 ** 30:.2f} GiB); "
                        "give at most that, or close what else uses the GPU")
    return budget


def least_budget(model_dir, images, width, height, cfg_batch, text_encoder, dtype, steps=50, text_len=None,
                 vl_tokens=None, fp8=False, text_fp8=False):
    """The smallest budget (bytes) any plan runs this edit in."""
    from engine.vram.planner import smallest_budget
    job, sizes = edit_job(model_dir, images, width, height, cfg_batch, text_encoder, dtype, steps=steps,
                          text_len=text_len, vl_tokens=vl_tokens, fp8=fp8, text_fp8=text_fp8)
    return smallest_budget(job, sizes, "stream")


def _host_need(job, s):
    """Host RAM an edit holds when it runs on the CPU (every weight in RAM): the text stage, or the edit
    stage after it (the text encoder is freed before the transformer loads)."""
    from engine.vram.memory import activation_bytes, mmdit_activations, table_bytes, text_peak
    dtype = torch_dtype({4: "float32", 2: "bfloat16"}[s.dtype_bytes])
    h, w = job.height // 8, job.width // 8
    acts = max(mmdit_activations(s, job) + table_bytes(s, job),
               activation_bytes(s.vae_cfg, job.cond_height // 8, job.cond_width // 8, None, dtype, 1, encode=True),
               activation_bytes(s.vae_cfg, h, w, None, dtype, 1) + 3 * job.height * job.width * 4)
    edit = s.mmdit_other + s.blocks * s.block_bytes + s.vae_bytes + acts
    text = text_peak(s, job, s.te_layers, s.vision_blocks) + s.te_embed if job.text_encoder and s.te_layers else 0
    return max(edit, text)


def _device_need(job, s):
    """VRAM an edit holds with everything on the GPU (no --vram): the planner's peaks with every block and
    layer resident, the VAE untiled, CFG batched."""
    from engine.vram.memory import decode_peak, denoise_peak, encode_peak, table_bytes, text_peak
    from engine.vram.planner import need
    # without a plan the modulation table stays for the next edit (common.modulations): the decode holds it too
    peaks = [denoise_peak(s, job, s.blocks), encode_peak(s, job, s.blocks, None),
             decode_peak(s, job, s.blocks, None) + table_bytes(s, job)]
    if job.text_encoder and s.te_layers:
        peaks.append(text_peak(s, job, s.te_layers, s.vision_blocks) + s.te_embed)
    return need(max(peaks))


def available_host_bytes():
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(model_dir, images, width, height, cfg_batch, text_encoder, dtype, device, available, steps=50,
               text_len=None, vl_tokens=None, planned=False, fp8=False, built=None, text_fp8=False):
    """Refuse, before any work, an edit that cannot fit `available` bytes (host RAM on the CPU; VRAM on CUDA:
    with everything resident, or under a plan at its smallest budget): one line naming what it needs and the
    largest output size, at the same aspect ratio, that fits. Returns the bytes it needs. built: a (Job,
    ModelSizes) made by the caller (a Layered split), instead of edit_job's."""
    import dataclasses
    from engine.vram.planner import gib_up, smallest_budget
    job, sizes = built or edit_job(model_dir, images, width, height, cfg_batch, text_encoder, dtype, steps=steps,
                                   text_len=text_len, vl_tokens=vl_tokens, fp8=fp8, text_fp8=text_fp8)
    what = f"{job.width}x{job.height} {'edit' if job.frames == 1 else f'{job.frames - 1}-layer split'}"
    if device == "cpu":
        need_of, where = (lambda j: _host_need(j, sizes)), "host RAM"
    else:
        need_of, where = (lambda j: smallest_budget(j, sizes, "stream")), "GPU memory at the smallest --vram"
    if device != "cpu" and not planned:
        needed = _device_need(job, sizes)
        if needed <= available:
            return needed
        if need_of(job) <= available:     # it fits by streaming: say so before any work, not after an OOM
            raise LoadError(f"a {what} needs {gib_up(needed)} of GPU memory with everything "
                            f"resident and {gib_up(available)} is free; give --vram {gib_up(available).replace(' ', '')}"
                            f" (weights then stream from host RAM; the least this edit runs in is "
                            f"{gib_up(need_of(job))})")
    needed = need_of(job)
    if available is None or needed <= available:
        return needed
    if job.frames > 1:       # a Layered split works at its resolution bucket: fewer layers is the lever
        fewer = [n for n in range(job.frames - 2, 1, -1)
                 if need_of(dataclasses.replace(job, frames=n + 1)) <= available]
        advice = f"--layers {fewer[0]} fits" if fewer else "no layer count fits at this resolution"
        raise LoadError(f"a {what} needs {gib_up(needed)} of {where}, {gib_up(available)} is available; {advice}")
    lo, hi, step = 0.0, 1.0, 16          # the largest scale of (width, height) that fits, on the 16 px grid
    sized = lambda f: (max(step, int(job.width * f) // step * step), max(step, int(job.height * f) // step * step))
    for _ in range(30):
        mid = (lo + hi) / 2
        w, h = sized(mid)
        lo, hi = (mid, hi) if need_of(dataclasses.replace(job, width=w, height=h)) <= available else (lo, mid)
    w, h = sized(lo)
    fits = need_of(dataclasses.replace(job, width=w, height=h)) <= available
    advice = f"the largest output that fits is --width {w} --height {h}" if fits else "even the smallest output does not fit"
    raise LoadError(f"a {what} needs {gib_up(needed)} of {where}, "
                    f"{gib_up(available)} is available; {advice}")


# The faces' side of sizing: an options namespace (device, dtype, vram, offload, width, height, steps, prompt,
# negative_prompt), as the CLI's argparse makes it, and the edit's images and embeddings.

def _dtype_of(opts):
    return opts.dtype or ("bfloat16" if opts.device == "cuda" else "float32")


def job_text_sizes(model_dir, images, opts, tensors, cfg_batch):
    """(MMDiT text tokens, VL image tokens) from the embeddings when given, else from tokenizing the prompts."""
    embeds = [t for k, t in (tensors or {}).items() if k in ("prompt_embeds", "negative_prompt_embeds")]
    if embeds:
        return text_sizes(model_dir, images, embeds=embeds)
    return text_sizes(model_dir, images, [opts.prompt] + ([opts.negative_prompt] if cfg_batch > 1 else []))


def _planned(opts):
    planned = getattr(opts, "vram", None) is not None or getattr(opts, "offload", None) is not None
    if planned and opts.device != "cuda":
        raise LoadError("--vram/--offload plan GPU memory; use them with --device cuda")
    return planned


def fp8_blocks(opts):
    """Whether the edit's block Linears will be fp8: --weights says so, or (no --weights) a --transformer file
    whose block Linears are all fp8 in its header (a mixed file counts as bf16: the safe side)."""
    weights = getattr(opts, "weights", None)
    if weights:
        return weights == "fp8"
    if not getattr(opts, "transformer", None):
        return False
    from engine.transforms.fp8 import BLOCK_LINEARS
    from loaders.single_file import check_transformer_file
    _, _, _, own, _ = check_transformer_file(opts.transformer)
    blocks = [v["dtype"] for k, v in own.items()
              if k.startswith("transformer_blocks.") and any(k.endswith(f".{n}.weight") for n in BLOCK_LINEARS)]
    return bool(blocks) and all(d.startswith("F8") for d in blocks)


def fp8_text(opts, on_host=False):
    """Whether the text encoder's language-model Linears will be held in fp8: --text-weights says so, or (no
    --text-weights) a --text-encoder file whose LM Linears are all fp8 in its header (a mixed file counts as bf16:
    the safe side). on_host: as host RAM holds them on the CPU, where --text-weights fp8 quantizes a full-width
    model already read (so only an fp8 file counts as fp8 there)."""
    weights, file = getattr(opts, "text_weights", None), getattr(opts, "text_encoder", None)
    from_file = False
    if file and weights != "bf16":
        from loaders.text_encoder_file import lm_linears_fp8
        from_file = lm_linears_fp8(file)
    return from_file if on_host or not weights else weights == "fp8"


def check_job_fits(model_dir, images, opts, text_encoder, cfg_batch, tensors=None, text_sizes=None):
    """Refuse before any work an edit that cannot fit this machine (host RAM on the CPU, the GPU's free
    memory or the --vram budget on CUDA), naming the largest size that fits. text_sizes: job_text_sizes'
    result when the caller has it (tokenizing loads the tokenizer)."""
    planned = _planned(opts)
    available = available_host_bytes() if opts.device == "cpu" else resolve_budget(opts.vram if planned else None)
    text_len, vl_tokens = text_sizes or job_text_sizes(model_dir, images, opts, tensors, cfg_batch)
    check_fits(model_dir, images, opts.width, opts.height, cfg_batch, text_encoder, _dtype_of(opts), opts.device,
               available, opts.steps, text_len, vl_tokens, planned=planned, fp8=fp8_blocks(opts),
               text_fp8=text_encoder and fp8_text(opts, on_host=opts.device == "cpu"))


def plan_job(model_dir, images, opts, text_encoder, cfg_batch, tensors=None):
    """check_job_fits, then the VRAM plan when --vram or --offload is given (CUDA only), else None: everything
    on the device. The prompts are tokenized once for both."""
    planned = _planned(opts)          # a budget on the CPU is refused before anything is tokenized
    text_len, vl_tokens = sizes = job_text_sizes(model_dir, images, opts, tensors, cfg_batch)
    check_job_fits(model_dir, images, opts, text_encoder, cfg_batch, tensors, sizes)
    if not planned:
        return None
    return make_plan(model_dir, images, opts.width, opts.height, cfg_batch, text_encoder, resolve_budget(opts.vram),
                     opts.offload or "auto", _dtype_of(opts), steps=opts.steps, text_len=text_len,
                     vl_tokens=vl_tokens, fp8=fp8_blocks(opts), text_fp8=text_encoder and fp8_text(opts))


def layered_job(model_dir, width, height, layers, cfg_batch, dtype, steps=50, text_len=None, fp8=False,
                text_fp8=False):
    """(Job, ModelSizes) of a Qwen-Image-Layered split worked at width x height: layers + 1 noisy frames and the
    condition frame in the MMDiT, a text-only prompt (no VL image tokens), one layer decoded at a time."""
    from engine.vram.memory import Job
    snap = Snapshot(model_dir)
    sizes = snapshot_sizes(snap, True, dtype, fp8, text_fp8)
    job = Job(width, height, width, height, batch=cfg_batch, steps=steps, text_encoder=True,
              text_len=text_len or pipeline_for(snap).max_text_tokens, vl_tokens=0, frames=layers + 1)
    return job, sizes


def plan_layers(model_dir, width, height, opts, prompts):
    """check_job_fits and plan_job for a Layered split (opts: the `layers` options, as argparse makes them):
    refused before any work when it cannot fit; the VRAM plan under --vram/--offload, else None."""
    planned = _planned(opts)
    text_len = min(prompt_lengths(model_dir, [], prompts)[0], pipeline_for(model_dir).max_text_tokens or 10 ** 9)
    dtype = _dtype_of(opts)
    job = lambda text_fp8: layered_job(model_dir, width, height, opts.layers, len(prompts), dtype, opts.steps,
                                       text_len, fp8_blocks(opts), text_fp8)
    available = available_host_bytes() if opts.device == "cpu" else resolve_budget(opts.vram if planned else None)
    check_fits(model_dir, [], width, height, len(prompts), True, dtype, opts.device, available, planned=planned,
               built=job(fp8_text(opts, on_host=opts.device == "cpu")))
    if not planned:
        return None
    from engine.vram.planner import plan
    return plan(resolve_budget(opts.vram), *job(fp8_text(opts)), opts.offload or "auto")
