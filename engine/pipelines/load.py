"""Loading an edit's models from a snapshot (with an optional single-file transformer and LoRAs fused on
load) and placing them on the device, streamed under a VRAM plan."""
import time
from dataclasses import dataclass, field

import torch

from loaders import LoadError, Snapshot, torch_dtype

from engine.config import SchedulerConfig
from engine.models.mmdit import MMDiT, load_mmdit
from engine.models.vae import QwenImageVAE, load_vae, to_device as vae_to_device
from engine.pipelines import pipeline_for
from engine.pipelines.spec import EditSpec
from engine.vram.offload import move_except, move_except_modulation, stream_blocks


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
    peaks: dict = field(default_factory=dict)   # stage -> (VRAM allocated, reserved) at its peak; CUDA only
    mod_tables: dict = field(default_factory=dict)  # the last schedule's modulation table (common.modulations)

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
                layered=False):
    """Transformer, VAE and scheduler config of the snapshot's pipeline. transformer_file: the MMDiT from
    one .safetensors file instead of transformer/*.safetensors (configured by transformer/config.json).
    weights: None keeps what the checkpoint holds (an fp8 file's block Linears stay fp8); "fp8" quantizes the
    block Linears to float8_e4m3fn after LoRA fusion and before placing (engine.transforms.fp8); "bf16"
    dequantizes an fp8 file to `dtype` as it is read.
    loras: [(path or loaders.lora.Lora, scale)] fused into the weights, layer by layer in float32 on `device`: before streaming
    under a plan (so the pinned copies hold the fused weights), on the device otherwise. With a plan, the
    blocks beyond plan.mmdit_resident stream from pinned host memory; the modulation weights never reach
    the GPU."""
    start = time.perf_counter()
    snap = Snapshot(model_dir)
    spec = pipeline_for(snap)
    snap.require("transformer", "vae", "scheduler")
    dt = torch_dtype(dtype)
    if weights not in (None, "bf16", "fp8"):
        raise LoadError(f"unknown weights {weights!r}; use bf16 or fp8")
    transformer = load_mmdit(snap, dt, "cpu", file=transformer_file, weights=weights)
    if transformer.cfg.use_additional_t_cond and not layered:     # layered: engine.pipelines.layered's loader
        raise LoadError(f"{model_dir}: use_additional_t_cond models (Qwen-Image-Layered) are not edit models")
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
    models = place_models(transformer, vae, SchedulerConfig.from_dict(snap.config("scheduler")), device, dt, plan)
    if loras and not early:
        fuse_loras(transformer, loras, compute_device=device)
    models.spec = spec
    models.source = {"model": snap.root.name, "transformer": transformer_file and str(transformer_file),
                     "loras": [(str(getattr(p, "path", p)), float(s)) for p, s in loras], "notes": [],
                     "weights": weights}
    if transformer_file:
        from loaders.single_file import summary
        models.source["notes"].append(summary(transformer.source))
    if quantized:
        models.source["notes"].append(f"fp8: {quantized} block Linears quantized to float8_e4m3fn on load "
                                      "(one scale per output channel)")
    models.timings["load"] = time.perf_counter() - start
    return models


def _check_streamable(transformer, file):
    """Streaming moves every block through the same slots, so the blocks must be alike: a mixed fp8 file (some
    block Linears fp8, others bf16) is refused under a plan with the flag that makes them alike."""
    kinds = {tuple((n, type(m).__name__) for n, m in blk.named_modules()) for blk in transformer.transformer_blocks}
    if len(kinds) > 1:
        raise LoadError(f"{file}: its blocks mix fp8 and bf16 Linears, and a --vram plan streams identical blocks; "
                        "add --weights fp8 (quantizes the rest) or --weights bf16")


def place_models(transformer, vae, scheduler_cfg, device, dtype, plan=None):
    """Models built on the host -> EditModels on `device`. The modulation weights stay on the host either
    way (modulation_table_streamed visits them once per edit); with a plan, the blocks beyond
    plan.mmdit_resident stream from pinned host memory."""
    stream = None
    if plan is not None:
        stream = stream_blocks(transformer.transformer_blocks, device, plan.mmdit_resident)
        try:
            move_except(transformer, device, transformer.transformer_blocks)
        except BaseException:
            stream.remove()     # no hooks or pinned buffers left behind
            raise
    else:
        move_except_modulation(transformer, device)
    return EditModels(transformer, vae_to_device(vae, device), scheduler_cfg, device, dtype, plan, stream)
