"""Fuse LoRAs into a built model's Linear weights, in place: W += Σ scale · alpha / rank · up @ down.

The model never knows: afterwards it is the same module holding other numbers. Every LoRA is read and checked
against the model first, so a bad file leaves the weights untouched; then each targeted weight is updated on
its own (float32 on compute_device, cast back into the weight), never a second copy of the model.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from loaders import LoadError
from loaders.lora import Lora, match_lora, read_lora

from engine.transforms.fp8 import FP8Linear, dequantize_rows, quantize_rows

FUSABLE = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Fused:
    path: str
    scale: float
    modules: int   # Linear layers this LoRA changed
    ranks: tuple   # its distinct ranks, ascending

    def __str__(self):
        rank = f"rank {self.ranks[0]}" if len(self.ranks) == 1 else f"ranks {self.ranks[0]}-{self.ranks[-1]}"
        return f"LoRA {Path(self.path).name} x{self.scale:g}: {self.modules} modules, {rank}"


def parse_lora_arg(arg):
    """"FILE[:SCALE]" -> (path, scale), scale 1.0 by default. The text after the last `:` is a scale only when
    the whole argument is not an existing path (a file name may hold a colon)."""
    if Path(arg).exists() or ":" not in arg:
        return arg, 1.0
    path, text = arg.rsplit(":", 1)
    try:
        scale = float(text)
    except ValueError:
        raise LoadError(f"bad LoRA argument {arg!r}: {text!r} is not a number and {arg!r} is not a file; "
                        "write FILE or FILE:SCALE (e.g. lightning.safetensors:0.8)") from None
    if not math.isfinite(scale):
        raise LoadError(f"bad LoRA scale {text!r} in {arg!r}: the scale must be a finite number "
                        "(e.g. lightning.safetensors:0.8)")
    return path, scale


def fuse_loras(model, loras, compute_device=None):
    """Add each (path or Lora, scale) of `loras` into `model`'s Linear weights. The update is computed in float32
    on `compute_device` (default: where each weight lives) one layer at a time. Returns a Fused per LoRA."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, FP8Linear))}
    shapes = {n: tuple(m.weight.shape) for n, m in linears.items()}
    plan, summary = {}, []  # plan: module name -> [(Layer, scale · alpha / rank)] over all LoRAs
    for source, scale in loras:
        lora = source if isinstance(source, Lora) else read_lora(source)
        if not math.isfinite(scale):
            raise LoadError(f"LoRA {lora.path}: scale {scale} is not a finite number")
        matched = match_lora(lora, shapes)
        for name, layer in matched.items():
            plan.setdefault(name, []).append((layer, scale * layer.factor))
        summary.append(Fused(lora.path, scale, len(matched), tuple(sorted({l.rank for l in matched.values()}))))
    for name in plan:
        w = linears[name].weight
        if (w.dtype not in FUSABLE and not isinstance(linears[name], FP8Linear)) or w.is_meta:
            raise ValueError(f"cannot fuse a LoRA into {name} ({w.dtype} on {w.device}): fuse LoRAs into the "
                             "loaded bf16/fp16/fp32 weights or an FP8Linear (float8_e4m3fn + scales)")
    with torch.no_grad():
        for name, updates in plan.items():
            _fuse_one(linears[name], updates, compute_device)
    return summary


def _fuse_one(module, updates, device):
    weight = module.weight
    device = weight.device if device is None else torch.device(device)
    fp8 = isinstance(module, FP8Linear)
    if fp8:  # the weight the layer computes with, W = q · s per output channel, in float32
        acc = dequantize_rows(weight.to(device), module.weight_scale.to(device))
    else:
        acc = weight.detach().to(device=device, dtype=torch.float32, copy=True)  # [out, in]: this layer only
    for layer, factor in updates:
        acc.addmm_(layer.up.to(device), layer.down.to(device), alpha=factor)  # [out, r] @ [r, in]
    if fp8:
        # requantized per output channel with new scales (the update moves each row's amax); adding the update to
        # a plainly downcast weight instead would round it to the old fp8 grid and show as grid artifacts
        q, scale = quantize_rows(acc)
        weight.copy_(q)
        module.weight_scale.copy_(scale)
    else:
        weight.copy_(acc)  # back into the weight's own dtype and device
