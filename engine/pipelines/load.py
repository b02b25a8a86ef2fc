"""Loading an edit's models from a snapshot (with an optional single-file transformer and LoRAs fused on
load) and placing them on the device, streamed under a VRAM plan."""
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loaders import LoadError, Snapshot, torch_dtype
from loaders.fast_read import reads_fast

from engine.config import SchedulerConfig
from engine.models.mmdit import MMDiT, load_mmdit
from engine.models.vae import QwenImageVAE, load_vae, to_device as vae_to_device
from engine.pipelines import pipeline_for
from engine.pipelines.spec import EditSpec
from engine.vram.offload import HostModulation, move_except, move_except_modulation, stream_blocks


@dataclass
class EditModels:
    transformer: MMDiT
    vae: QwenImageVAE
    scheduler: SchedulerConfig
    device: str
    dtype: torch.dtype
    plan: object = None         # engine.vram.planner.Plan when a VRAM budget is in force
    stream: object = None       # engine.vram.offload.StreamHandle of the transformer blocks; .remove() unpins
    spec: EditSpec = None       # the snapshot's pipeline (None: the original Edit)
    source: dict = field(default_factory=dict)  # model folder, transformer file, LoRAs: for the PNG's text
    timings: dict = field(default_factory=dict)
    step_times: dict = field(default_factory=dict)  # the last denoise: {"table": s, "steps": [s per step]}
    peaks: dict = field(default_factory=dict)   # stage -> (VRAM allocated, reserved) at its peak; CUDA only
    mod_tables: dict = field(default_factory=dict)  # the last schedule's modulation table (common.modulations)
    mod_host: object = None     # engine.vram.offload.HostModulation: img_mod/txt_mod in (pinned) host buffers
    weight_files: list = field(default_factory=list)    # the transformer's files: the modulation tables' key
    mod_cache: object = None    # a folder for modulation tables on disk (engine.pipelines.mod_cache), or None

    def memory_summary(self):
        """Peak host RAM; on CUDA the peak VRAM (allocated, reserved) over the run and allocated per stage
        ("before": text encoding and loading)."""
        import resource
        gib = 2 ** 30
        line = f"peak host RAM {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib:.2f} GiB"
        if self.peaks:
            stages = ", ".join(f"{k} {a / gib:.2f}" for k, (a, _) in self.peaks.items())
            line += (f", peak VRAM allocated {max(a for a, _ in self.peaks.values()) / gib:.2f} GiB, reserved "
                     f"{max(r for _, r in self.peaks.values()) / gib:.2f} GiB (allocated per stage, GiB: {stages})")
        return line


def load_models(model_dir, device="cpu", dtype="float32", plan=None, loras=(), transformer_file=None, weights=None,
                layered=False, warm=None):
    """Transformer, VAE and scheduler config of the snapshot's pipeline. transformer_file: the MMDiT from
    one .safetensors file instead of transformer/*.safetensors (configured by transformer/config.json).
    weights: None keeps what the checkpoint holds (an fp8 file's block Linears stay fp8); "fp8" quantizes the
    block Linears to float8_e4m3fn after LoRA fusion and before placing (engine.transforms.fp8); "bf16"
    dequantizes an fp8 file to `dtype` as it is read.
    loras: [(path or loaders.lora.Lora, scale)] fused into the weights, layer by layer in float32 on `device`,
    where the weights live (GPU, pinned host buffers of streamed blocks).
    A snapshot's transformer is read straight to where each tensor lives (placed first on the meta device, then
    filled by loaders.fast_read): the GPU, the pinned buffers of streamed blocks, pinned host buffers for the
    modulation weights, which never reach the GPU but for the per-edit table. A single file, an fp8 checkpoint
    and --weights fp8 (quantized on the host) take the old path: a host state dict, then placed (as does
    everything under QIE_READER=safe_open, the reference the tests and benchmarks compare with).
    warm: (img_shapes, txt_lens) of the coming edit (edit_shapes): on CUDA without a plan, warm_up runs a step of a
    scratch model at those shapes on this thread while a loader thread reads the weights, so the first denoising
    step pays no first-call costs."""
    start = time.perf_counter()
    snap = Snapshot(model_dir)
    spec = pipeline_for(snap)
    snap.require("transformer", "vae", "scheduler")
    dt = torch_dtype(dtype)
    if weights not in (None, "bf16", "fp8"):
        raise LoadError(f"unknown weights {weights!r}; use bf16 or fp8")
    sched = SchedulerConfig.from_dict(snap.config("scheduler"))
    if loras:
        from engine.transforms.lora import fuse_loras
    warming = {}
    if transformer_file is None and weights != "fp8" and reads_fast(device):
        placed = []
        warm_now = warm is not None and plan is None and torch.device(device).type == "cuda"

        def place(model, on_placed=None):  # before the weights are read: place_transformer allocates, the reader fills
            _check_layered(model, model_dir, layered)
            if plan is not None and plan.mmdit_resident < len(model.transformer_blocks):
                _check_streamable(model, model_dir)
            placed.append(place_transformer(model, device, plan))
            if on_placed is not None:
                on_placed(model)                # the warm-up starts while the weights are read
            stream, mods = placed[-1]           # their buffers are page-locked as the reader fills them
            return (stream.pending if stream is not None else []) + mods.pending
        try:
            if warm_now:
                transformer, warming = _load_while_warming(
                    lambda on_placed: load_mmdit(snap, dt, device, weights=weights,
                                                 place=lambda m: place(m, on_placed)), warm, device, dt)
            else:
                transformer = load_mmdit(snap, dt, device, weights=weights, place=place)
        except BaseException:
            for handle in (h for pair in placed for h in pair if h is not None):
                handle.remove()       # no hooks or pinned buffers left behind
            raise
        (stream, mods), quantized = placed[0], 0
        models = EditModels(transformer, vae_to_device(load_vae(snap, dt, "cpu"), device), sched, device, dt,
                            plan, stream, mod_host=mods)
        if loras:           # in place, where the weights live (GPU or pinned host buffers)
            fuse_loras(transformer, loras, compute_device=device)
    else:
        models, quantized = _load_on_host(snap, model_dir, device, dt, plan, loras, transformer_file, weights,
                                          layered, sched)
    transformer = models.transformer
    models.spec = spec
    models.source = {"model": snap.root.name, "transformer": transformer_file and str(transformer_file),
                     "loras": [(str(getattr(p, "path", p)), float(s)) for p, s in loras], "notes": [],
                     "weights": weights}
    models.weight_files = [Path(transformer_file)] if transformer_file else sorted(
        (snap.root / "transformer").glob("*.safetensors"))
    if transformer_file:
        from loaders.single_file import summary
        models.source["notes"].append(summary(transformer.source))
    if quantized:
        models.source["notes"].append(f"fp8: {quantized} block Linears quantized to float8_e4m3fn on load "
                                      "(one scale per output channel)")
    if warming:
        models.timings["warm_up"] = warming["seconds"]
        if warming["error"]:
            models.source["notes"].append(f"warm-up skipped: {warming['error']}")
    models.timings["load"] = time.perf_counter() - start
    return models


def _check_layered(transformer, model_dir, layered):
    if transformer.cfg.use_additional_t_cond and not layered:     # layered: engine.pipelines.layered's loader
        raise LoadError(f"{model_dir}: use_additional_t_cond models (Qwen-Image-Layered) are not edit models")


def _load_on_host(snap, model_dir, device, dt, plan, loras, transformer_file, weights, layered, sched):
    """The old path (single files, fp8): the MMDiT as a host state dict, LoRAs fused and fp8 quantized there
    when it streams or is quantized, then placed."""
    transformer = load_mmdit(snap, dt, "cpu", file=transformer_file, weights=weights)
    _check_layered(transformer, model_dir, layered)
    if loras:
        from engine.transforms.lora import fuse_loras
    # quantizing on load happens on the host before placing (the bf16 model never has to fit on the device), so
    # LoRAs are fused before it: into the bf16 weights, not into fp8 ones
    early = plan is not None or weights == "fp8"
    if loras and early:
        fuse_loras(transformer, loras, compute_device=device)
    quantized = 0
    if weights == "fp8":
        from engine.transforms.fp8 import quantize_fp8
        quantized = quantize_fp8(transformer, compute_device=device)  # float32 work per layer on `device`
    if plan is not None and plan.mmdit_resident < len(transformer.transformer_blocks):
        _check_streamable(transformer, transformer_file)
    vae = load_vae(snap, dt, "cpu")
    models = place_models(transformer, vae, sched, device, dt, plan)
    if loras and not early:
        fuse_loras(transformer, loras, compute_device=device)
    return models, quantized


def _check_streamable(transformer, file):
    """Streaming moves every block through the same slots, so the blocks must be alike: a mixed fp8 file (some
    block Linears fp8, others bf16) is refused under a plan with the flag that makes them alike."""
    kinds = {tuple((n, type(m).__name__) for n, m in blk.named_modules()) for blk in transformer.transformer_blocks}
    if len(kinds) > 1:
        raise LoadError(f"{file}: its blocks mix fp8 and bf16 Linears, and a --vram plan streams identical blocks; "
                        "add --weights fp8 (quantizes the rest) or --weights bf16")


def place_transformer(transformer, device, plan=None):
    """Put the MMDiT where it runs: (StreamHandle or None, HostModulation). The modulation weights stay on the
    host either way (pinned on CUDA; modulation_table_streamed visits them once per edit); with a plan, the
    blocks beyond plan.mmdit_resident stream from pinned host memory. A model on the meta device is allocated
    there, not copied: the loader fills it afterwards."""
    mods = HostModulation(transformer.transformer_blocks, pin=torch.device(device).type == "cuda")
    stream = None
    try:
        if plan is not None:
            stream = stream_blocks(transformer.transformer_blocks, device, plan.mmdit_resident)
            move_except(transformer, device, transformer.transformer_blocks)
        else:
            move_except_modulation(transformer, device)
    except BaseException:
        if stream is not None:
            stream.remove()     # no hooks or pinned buffers left behind
        mods.remove()
        raise
    return stream, mods


def place_models(transformer, vae, scheduler_cfg, device, dtype, plan=None):
    """Models built on the host -> EditModels on `device` (place_transformer, then the VAE)."""
    stream, mods = place_transformer(transformer, device, plan)
    return EditModels(transformer, vae_to_device(vae, device), scheduler_cfg, device, dtype, plan, stream,
                      mod_host=mods)


def edit_shapes(model_dir, images, tensors, width=None, height=None, cfg=4.0, area=1024 * 1024):
    """(img_shapes, txt_lens) the denoise of an edit runs at, from its images (PIL) and prompt embeddings
    ({prompt_embeds, prompt_embeds_mask, negative_...}), derived as engine.pipelines.common.edit derives them;
    for warm_up before the models exist."""
    from engine.config import VAEConfig
    snap = Snapshot(model_dir)
    spec = pipeline_for(snap)
    multiple = VAEConfig.from_dict(snap.config("vae")).scale_factor * 2
    sizes = [im.size for im in images]
    ow, oh = spec.output_size(sizes, area)
    w, h = (width or ow) // multiple, (height or oh) // multiple
    shapes = [(1, h, w)] + [(1, ch // multiple, cw // multiple) for cw, ch in spec.vae_sizes(sizes, area)]
    lens = []
    for k in ("prompt_embeds", "negative_prompt_embeds")[: 2 if cfg > 1 else 1]:
        if k in tensors:
            mask = tensors.get(k + "_mask")
            n = int(mask.sum()) if mask is not None else tensors[k].shape[1]
            lens.append(min(n, spec.max_text_tokens) if spec.max_text_tokens else n)
    return shapes, lens


def warm_up(transformer, img_shapes, txt_lens, device, dtype, block=None):
    """One denoising step at an edit's shapes on random inputs: the whole MMDiT forward (img_in, the time and text
    embeddings, one block, norm_out, proj_out), then CFG's combine and the Euler step, so that what a process pays
    at its first step (Triton kernels loaded, cuBLAS/cuBLASLt/cuDNN handles, plans and lazily loaded kernels of
    every GEMM shape, the attention backend's timing for this size class unless stored, the caching allocator's
    growth) is paid here. It runs a scratch model of zeros with the transformer's config and one block (block:
    the block to put in it instead, e.g. a real one), so the real weights may still be loading; the scratch
    block has no modulation Linears (the table is passed in, as in denoise). Runs on the current stream."""
    from dataclasses import replace

    from engine import scheduler as sched
    from engine.models.mmdit import drop_modulation_weights
    cfg = transformer.cfg
    with torch.device("meta"):
        scratch = type(transformer)(replace(cfg, num_layers=0 if block is not None else 1))
    drop_modulation_weights(scratch)
    scratch = scratch.to(dtype).to_empty(device=device).requires_grad_(False)
    for p in scratch.parameters():
        p.data.zero_()
    if block is not None:
        scratch.transformer_blocks.append(block)
    B, L = len(txt_lens), max(txt_lens)
    N = sum(f * h * w for f, h, w in img_shapes)
    x = torch.randn(B, N, cfg.in_channels, device=device, dtype=dtype)
    txt = torch.randn(B, L, cfg.joint_attention_dim, device=device, dtype=dtype)
    mods = [(torch.zeros(1, 2 if cfg.zero_cond_t else 1, 6 * cfg.dim, device=device, dtype=dtype),
             torch.zeros(1, 1, 6 * cfg.dim, device=device, dtype=dtype))]
    extra = torch.zeros(B, dtype=torch.long, device=device) if cfg.use_additional_t_cond else None
    n = img_shapes[0][0] * img_shapes[0][1] * img_shapes[0][2]      # the noisy image's tokens
    with torch.inference_mode():
        t = torch.full((B,), 0.5, dtype=dtype, device=device)
        v = scratch(x, txt, torch.tensor(txt_lens), t, img_shapes, mods=mods, additional_t_cond=extra)[:, :n]
        if B > 1:
            v = sched.cfg_velocity(v, 4.0)
        sched.euler_step(x[:1, :n], v, torch.tensor(1.0, device=device), torch.tensor(0.5, device=device))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _load_while_warming(load, shapes, device, dtype):
    """load(on_placed) on a loader thread while this thread runs warm_up, from the moment the loader has placed
    the model (on_placed(model)) until the weights are read. This thread, not a helper, warms up because it is
    the one that denoises: PyTorch keeps cuDNN's attention graphs and cuBLAS's handles per thread. Returns
    (model, {"seconds", "error"}); load's exception is raised here; a warm-up failure (e.g. out of memory) only
    costs the warm-up, its one line in "error"."""
    import threading
    box, placed = {}, threading.Event()

    def run():
        try:
            box["model"] = load(lambda model: (box.setdefault("placed", model), placed.set()))
        except BaseException as e:  # noqa: BLE001 (raised again on the calling thread)
            box["failed"] = e
        finally:
            placed.set()
    loader = threading.Thread(target=run, name="qie-load", daemon=True)
    loader.start()
    placed.wait()
    warming = {"seconds": 0.0, "error": None}
    if "placed" in box:
        t0 = time.perf_counter()
        try:
            warm_up(box["placed"], *shapes, device, dtype)
        except Exception as e:  # noqa: BLE001
            warming["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
            torch.cuda.empty_cache()
        warming["seconds"] = time.perf_counter() - t0
    loader.join()
    if "failed" in box:
        raise box["failed"]
    return box["model"], warming
