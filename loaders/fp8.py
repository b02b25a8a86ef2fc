"""fp8 transformer files (ComfyUI layouts), read keeping the fp8 weights in fp8: never expanded in full.

Layouts (`own`: the transformer's header entries, the file's key prefix stripped):
  plain   `*_fp8_e4m3fn`: float8_e4m3fn weights and no scales (scale 1).
  scaled  `*_fp8_scaled`: a `scaled_fp8` marker tensor (its dtype names the weights' fp8 type; a float32 marker
          means e4m3fn, as ComfyUI reads it) and `<layer>.scale_weight` (a float32 number, or one per output
          channel). `<layer>.scale_input` are activation scales for ComfyUI's static fp8 matmul: ignored here,
          where activations are quantized per token at run time.
  mixed   ComfyUI's quantized format: `<layer>.weight_scale` (and `.input_scale`, ignored likewise); the layers
          and their formats named by `<layer>.comfy_quant` tensors (the JSON config as uint8 bytes) or by the
          `_quantization_metadata` entry of the safetensors metadata ({"format_version", "layers": {name:
          {"format": ...}}}, names as written in the file, with or without its prefix). A layer's fp8 weight may
          be stored as float8_e4m3fn or in a uint8 container. Formats read: float8_e4m3fn (and the per-row variant
          float8_e4m3fn_rowwise); a weight_scale is one number or one per output channel ([out] or [out, 1]).
A scale dequantizes its layer's weight: W = weight.float() · scale. Anything else quantized (float8_e5m2, e4m3fnuz,
int8, nvfp4, mxfp8, block-wise scales, ...) is refused with one line naming it.
"""
import json
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from .safetensors_io import LoadError, _few

FLOAT_CODES = ("BF16", "F16", "F32", "F64")
E4M3 = "F8_E4M3"
MARKER = "scaled_fp8"
FORMATS = ("float8_e4m3fn", "float8_e4m3fn_rowwise")
WEIGHT_SCALES = (".scale_weight", ".weight_scale")
INPUT_SCALES = (".scale_input", ".input_scale")
OTHER_SCALES = (".weight_scale_2", ".pre_quant_scale")  # two-level (nvfp4) and smoothing scales: other recipes


@dataclass
class Fp8Plan:
    """What a file's header (and its small config tensors) say about its quantization."""
    layout: str                                      # "plain" | "scaled" | "mixed"
    scales: dict = field(default_factory=dict)       # layer -> its weight-scale key
    aux: set = field(default_factory=set)            # keys that are not model tensors: marker, scales, configs
    containers: set = field(default_factory=set)     # weight keys stored as uint8, read as float8_e4m3fn
    input_scales: int = 0                            # activation scales ignored


def _dtype_name(code):
    """safetensors dtype code -> torch's name: F8_E4M3 -> float8_e4m3fn, F8_E5M2 -> float8_e5m2, F32 -> float32."""
    if code.startswith("F8_"):
        return "float8_" + code[3:].lower() + ("fn" if code == E4M3 else "")
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "I8": "int8", "U8": "uint8",
            "F4": "float4"}.get(code, code.lower())


def _layer_configs(path, own, metadata, prefix):
    """{layer: (format, where it was named)} from `_quantization_metadata` and `<layer>.comfy_quant` tensors."""
    configs = {}
    raw = metadata.get("_quantization_metadata")
    if raw is not None:
        try:
            layers = json.loads(raw)["layers"]
            items = list(layers.items())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise LoadError(f"{path}: its _quantization_metadata is not the JSON ComfyUI writes "
                            '({"layers": {name: {"format": ...}}}); re-download the file') from None
        for name, conf in items:
            layer = name[len(prefix):] if prefix and name.startswith(prefix) else name
            if layer + ".weight" in own:  # names of other components (an all-in-one file) are not ours
                fmt = conf.get("format") if isinstance(conf, dict) else conf
                configs[layer] = (fmt, "_quantization_metadata")
    keys = [k for k in own if k.endswith(".comfy_quant")]
    if keys:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in keys:
                try:
                    conf = json.loads(f.get_tensor(prefix + k).numpy().tobytes())
                    fmt = conf.get("format") if isinstance(conf, dict) else None
                except (ValueError, UnicodeDecodeError, TypeError):
                    raise LoadError(f"{path}: {prefix + k} is not a JSON quantization config; re-download the "
                                    "file") from None
                configs[k[:-len(".comfy_quant")]] = (fmt, k)
    return configs


def quant_plan(path, own, metadata, prefix):
    """The file's Fp8Plan, or None when nothing in it is quantized. Raises LoadError (one line) for any
    quantization this engine does not read."""
    configs = _layer_configs(path, own, metadata, prefix)
    bad = [f"{layer} is {fmt!r} (in {where})" for layer, (fmt, where) in configs.items() if fmt not in FORMATS]
    if bad:
        raise LoadError(f"{path}: {len(bad)} layer(s) of a quantization format this engine does not read: "
                        f"{_few(bad, 1)}; only float8_e4m3fn fp8 files are read (use an fp8_e4m3fn, fp8_scaled "
                        "or bf16 file)")
    other = [k for k in own if k.endswith(OTHER_SCALES)]
    if other:
        raise LoadError(f"{path}: {len(other)} scale tensor(s) of another quantization recipe, e.g. {min(other)} "
                        "(two-level or smoothing scales, as nvfp4/AWQ files have); only float8_e4m3fn fp8 files "
                        "are read")
    marker = own.get(MARKER)
    if marker is not None and marker["dtype"] not in (E4M3, "F32"):
        raise LoadError(f"{path}: its scaled_fp8 marker is {_dtype_name(marker['dtype'])}, so its weights are "
                        f"{_dtype_name(marker['dtype'])}; only float8_e4m3fn fp8 files are read")

    plan = Fp8Plan("mixed" if configs or any(k.endswith(".weight_scale") for k in own)
                   else "scaled" if marker is not None or any(k.endswith(".scale_weight") for k in own) else "plain")
    plan.aux = {k for k in own if k == MARKER or k.endswith(WEIGHT_SCALES + INPUT_SCALES + (".comfy_quant",))}
    plan.input_scales = sum(k.endswith(INPUT_SCALES) for k in own)
    foreign = []
    for k, v in own.items():
        code = v["dtype"]
        if k in plan.aux or code in FLOAT_CODES or code == E4M3:
            continue
        if code == "U8" and k.endswith(".weight") and k[:-len(".weight")] in configs:
            plan.containers.add(k)   # ComfyUI's uint8 storage of a float8_e4m3fn layer
        else:
            foreign.append(k)
    if foreign:
        e5m2 = [k for k in foreign if own[k]["dtype"] == "F8_E5M2"]
        k = min(e5m2 or foreign)
        raise LoadError(f"{path}: {len(e5m2 or foreign)} tensor(s) of a quantized or non-float dtype this engine "
                        f"does not read, e.g. {k} is {_dtype_name(own[k]['dtype'])}; only float8_e4m3fn fp8 "
                        "files are read (use an fp8_e4m3fn, fp8_scaled or bf16 file)")

    for k in sorted(own):
        if k.endswith(WEIGHT_SCALES):
            layer = k.rsplit(".", 1)[0]
            _check_scale(path, own, k, layer)
            if layer in plan.scales:
                raise LoadError(f"{path}: layer {layer} has two weight scales ({plan.scales[layer]} and {k})")
            plan.scales[layer] = k
    missing = sorted(layer for layer in configs if layer not in plan.scales)
    if missing:
        raise LoadError(f"{path}: {len(missing)} layer(s) named float8_e4m3fn ({configs[missing[0]][1]}) have no "
                        f"weight_scale: {_few(missing)}; the file is incomplete")
    fp8 = [k for k, v in own.items() if v["dtype"] == E4M3 and k not in plan.aux] + sorted(plan.containers)
    if not (fp8 or plan.scales or configs or marker is not None):
        return None
    return plan


def _check_scale(path, own, key, layer):
    w = own.get(layer + ".weight")
    if w is None:
        raise LoadError(f"{path}: {key} scales no weight (there is no {layer}.weight)")
    s = own[key]
    numel = 1
    for d in s["shape"]:
        numel *= d
    out = w["shape"][0] if w["shape"] else 1
    if s["dtype"] not in FLOAT_CODES or not (numel == 1 or s["shape"] in ([out], [out, 1])):
        raise LoadError(f"{path}: {key} is {_dtype_name(s['dtype'])} {s['shape']}: a weight scale is one float or "
                        f"one per output channel ([{out}]); block-wise or other scales are not read")


def _per_row(scale, rows):
    """A weight's scale (None: 1; one number; one per row) -> float32 [rows]."""
    if scale is None:
        return torch.ones(rows, dtype=torch.float32)
    scale = scale.float().reshape(-1)
    return (scale.expand(rows) if scale.numel() == 1 else scale).contiguous()


def read_quantized(f, own, plan, prefix, dtype, keep):
    """The transformer's tensors from an open safe_open file -> (state, info). A 2-D fp8 weight of a layer in
    `keep` stays float8_e4m3fn with `<layer>.weight_scale` float32 [out] beside it (what FP8Linear holds); every
    other fp8 tensor, and any scaled weight, is dequantized (float32 · scale) to `dtype` one tensor at a time; the
    rest is cast to `dtype`. info: layout, kept (layers), dequantized (fp8 tensors outside `keep`), input_scales."""
    state, kept, dequantized = {}, [], []
    dtype = dtype or torch.float32
    for k in own:
        if k in plan.aux:
            continue
        t = f.get_tensor(prefix + k)
        if k in plan.containers:
            t = t.view(torch.float8_e4m3fn)
        layer = k[:-len(".weight")] if k.endswith(".weight") else None
        skey = plan.scales.get(layer)
        if skey is None and t.dtype != torch.float8_e4m3fn:
            state[k] = t.to(dtype)
            continue
        scale = None if skey is None else f.get_tensor(prefix + skey)
        if t.dtype == torch.float8_e4m3fn and t.dim() == 2 and layer in keep:
            state[k], state[layer + ".weight_scale"] = t, _per_row(scale, t.shape[0])
            kept.append(layer)
            continue
        if t.dtype == torch.float8_e4m3fn and layer not in keep:
            dequantized.append(k)
        w = t.float()
        if scale is not None:
            w = w * (scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float().reshape(()))
        state[k] = w.to(dtype)
    return state, dict(layout=plan.layout, kept=len(kept), dequantized=dequantized, input_scales=plan.input_scales,
                       dtype=str(dtype).replace("torch.", ""))


def describe(fp8):
    """One clause of the load summary for read_quantized's info."""
    line = f"fp8 ({fp8['layout']}): {fp8['kept']} block Linears kept in float8_e4m3fn"
    if fp8["dequantized"]:
        line += (f", {len(fp8['dequantized'])} fp8 tensors dequantized to {fp8['dtype']} "
                 f"(e.g. {min(fp8['dequantized'])})")
    if fp8["input_scales"]:
        line += f", {fp8['input_scales']} input scales ignored (activations are quantized per token)"
    return line
