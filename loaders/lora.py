"""LoRA files read into one form: module name -> Layer(down [r, in], up [out, r], alpha), float32 on the CPU.

Layouts read (a key's prefix and suffix are stripped; what is left names the module):
  diffusers / PEFT     transformer.<module>.lora_A.weight, .lora_B.weight [, .alpha]; PEFT's `.default.` infix;
                       the `lora_adapter_metadata` JSON diffusers saves (lora_alpha / r, rank and alpha patterns)
  Kohya                lora_unet_<module, `.` written `_`>.lora_down.weight, .lora_up.weight, .alpha
  ComfyUI, Lightning   diffusion_model.<module>.(lora_A|lora_down)... ; and bare <module>.lora_A.weight ...
A module's update is W += scale · alpha / rank · up @ down (alpha absent: alpha = rank, factor 1). Kohya's
flattened names are resolved against the model's own Linear names in `match_lora`: exact, no guessing where
an underscore was a dot. Nothing is unpickled; every error is one LoadError line naming the file.
"""
import json
import math
import re
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from .safetensors_io import LoadError, _few

PREFIXES = ("transformer.", "diffusion_model.", "lora_unet_")
WEIGHT_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(\.default)?\.weight$")
ALPHA_KEY = re.compile(r"(?P<module>.+)\.alpha$")
DORA = ("dora_scale", "lora_magnitude_vector")
# key fragments of other model families: Flux (BFL and diffusers names), Stable Diffusion (UNet, text encoders)
FOREIGN = ("double_blocks", "single_blocks", "single_transformer_blocks", "lora_te", "input_blocks",
           "output_blocks", "middle_block", "down_blocks", "up_blocks", "mid_block")


class Layer(NamedTuple):
    down: torch.Tensor   # [r, in]
    up: torch.Tensor     # [out, r]
    alpha: float | None  # None: alpha = rank
    keys: tuple          # (down key, up key) as written in the file, for messages

    @property
    def rank(self):
        return self.down.shape[0]

    @property
    def factor(self):
        return 1.0 if self.alpha is None else self.alpha / self.rank


class Lora(NamedTuple):
    path: str
    layers: dict  # module name (dotted, or Kohya-flattened until match_lora) -> Layer


def read_lora(path):
    """Read and check one LoRA .safetensors file (tensors and metadata) into a Lora."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata, keys = f.metadata() or {}, list(f.keys())
            if not keys:
                raise LoadError(f"LoRA {path} holds no tensors")
            # what the keys tell is checked before any tensor is read (a transformer given as a LoRA)
            _refuse_foreign(path, keys)
            config = _adapter_config(path, metadata)
            dora = [k for k in keys if any(d in k for d in DORA)]
            if dora or config.get("use_dora"):
                raise LoadError(f"LoRA {path} is a DoRA ({_few(dora) or 'use_dora in its metadata'}); DoRA is not "
                                "supported (its magnitudes cannot be dropped without changing the result); use a "
                                "plain LoRA")
            _group_keys(path, dict.fromkeys(keys))
            tensors = {k: f.get_tensor(k) for k in keys}
    except LoadError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise LoadError(f"cannot read LoRA {path} ({path.stat().st_size} bytes): {str(e).splitlines()[0]}; "
                        "is it a complete .safetensors file? (pickled .pt/.ckpt files are not read)") from None

    parts = _group_keys(path, tensors)
    bad = [f"{k} ({t.dtype}, {tuple(t.shape)})" for k, t in tensors.items() if not _well_formed(k, t)]
    if bad:
        raise LoadError(f"LoRA {path}: {len(bad)} tensor(s) of the wrong kind: {_few(bad)}; LoRA weights are "
                        "2-D float tensors and an alpha is one finite number")
    lone = [e.get("down", e.get("up"))[0] for e in parts.values() if ("down" in e) != ("up" in e)]
    if lone:
        raise LoadError(f"LoRA {path}: {len(lone)} weight(s) without their pair (lora_A needs lora_B, lora_down "
                        f"needs lora_up): {_few(lone)}; the file is incomplete")

    layers, ranks_differ = {}, []
    for module, e in parts.items():
        if "down" not in e:
            continue  # an alpha alone changes nothing (diffusers drops it too)
        (dk, down), (uk, up) = e["down"], e["up"]
        if down.shape[0] != up.shape[1]:
            ranks_differ.append(f"{dk} {tuple(down.shape)} vs {uk} {tuple(up.shape)}")
            continue
        alpha = e["alpha"][1].float().item() if "alpha" in e else None
        alpha = _with_metadata(path, config, module, down.shape[0], alpha)
        layers[module] = Layer(down.float(), up.float(), alpha, (dk, uk))
    if ranks_differ:
        raise LoadError(f"LoRA {path}: {len(ranks_differ)} layer(s) whose down and up ranks differ: "
                        f"{_few(ranks_differ)}")
    return Lora(str(path), layers)


def match_lora(lora, shapes):
    """Resolve a Lora's module names against the model's Linear layers (`shapes`: name -> (out, in)) and check
    every down/up against its layer. Returns {model name: Layer}; raises LoadError before anything is changed."""
    flat = {n.replace(".", "_"): n for n in shapes}  # Kohya: lora_unet_transformer_blocks_0_attn_to_q
    matched, unknown, misfit, twice = {}, [], [], []
    for name, layer in lora.layers.items():
        target = name if name in shapes else flat.get(name)
        if target is None:
            unknown.append(layer.keys[0])
            continue
        if target in matched:
            twice.append(f"{matched[target].keys[0]} and {layer.keys[0]}")
        out_f, in_f = shapes[target]
        if layer.down.shape[1] != in_f or layer.up.shape[0] != out_f:
            misfit.append(f"{layer.keys[0]} {tuple(layer.down.shape)} / {layer.keys[1]} {tuple(layer.up.shape)} "
                          f"vs {target}.weight {(out_f, in_f)}")
        matched[target] = layer
    if unknown:
        raise LoadError(f"LoRA {lora.path}: {len(unknown)} layer(s) match no module of this model: {_few(unknown)}; "
                        "is it a LoRA for this Qwen-Image model?")
    if twice:
        raise LoadError(f"LoRA {lora.path}: {len(twice)} module(s) appear under two names: {_few(twice)}")
    if misfit:
        raise LoadError(f"LoRA {lora.path}: {len(misfit)} layer(s) do not fit their module: {_few(misfit, 1)}; "
                        "is it for another model size?")
    return matched


def _group_keys(path, tensors):
    """{module: {"down" | "up" | "alpha": (key, tensor)}}, the layout's prefix and suffix stripped."""
    parts, odd, twice = {}, [], []
    for key, t in tensors.items():
        name = next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)
        if m := WEIGHT_KEY.match(name):
            slot = "down" if m["kind"] in ("lora_A", "lora_down") else "up"
        elif m := ALPHA_KEY.match(name):
            slot = "alpha"
        else:
            odd.append(key)
            continue
        entry = parts.setdefault(m["module"], {})
        if slot in entry:
            twice.append(f"{entry[slot][0]} and {key}")
        entry[slot] = (key, t)
    if odd:
        raise LoadError(f"LoRA {path}: {len(odd)} key(s) in no LoRA layout we read: {_few(odd)}; expected "
                        "<module>.lora_A/lora_B/lora_down/lora_up.weight and <module>.alpha")
    if twice:
        raise LoadError(f"LoRA {path}: {len(twice)} module(s) appear under two keys: {_few(twice)}")
    return parts


def _well_formed(key, t):
    if key.endswith(".alpha"):
        return t.numel() == 1 and math.isfinite(t.float().item())
    return t.is_floating_point() and t.dim() == 2 and t.numel() > 0  # rank 0 would divide by zero


def _refuse_foreign(path, tensors):
    for marker in FOREIGN:
        hits = [k for k in tensors if marker in k]
        if hits:
            raise LoadError(f"LoRA {path} is for another model, not Qwen-Image: {len(hits)} key(s) name "
                            f"{marker} ({_few(hits)}); use a LoRA trained for Qwen-Image")


def _adapter_config(path, metadata):
    """The transformer's LoraConfig fields from diffusers' `lora_adapter_metadata` ({} when there is none)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise LoadError(f"LoRA {path}: its lora_adapter_metadata is not valid JSON ({e}); re-save the LoRA") from None
    if not isinstance(config, dict):
        raise LoadError(f"LoRA {path}: its lora_adapter_metadata is not a JSON object; re-save the LoRA")
    return {k[len("transformer."):]: v for k, v in config.items() if k.startswith("transformer.")}


def _pattern_value(patterns, module, default):
    """PEFT's rule: the first pattern p for which `(.*\\.)?(p)$` matches the module name wins."""
    for p, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({p})$", module):
            return value
    return default


def _with_metadata(path, config, module, rank, alpha):
    """Fold the metadata's scale (lora_alpha / r, or / sqrt(r) for rsLoRA) into the alpha. diffusers applies both
    a `.alpha` key (pre-scaling the weights) and the metadata (PEFT's scaling), so their factors multiply."""
    if not config:
        return alpha
    r = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))  # LoraConfig's defaults: 8, 8
    lora_alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    if r != rank:
        raise LoadError(f"LoRA {path}: its metadata gives {module} rank {r} but its tensors have rank {rank}; "
                        "re-save the LoRA")
    scale = lora_alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    return (1.0 if alpha is None else alpha / rank) * scale * rank
