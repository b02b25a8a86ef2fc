"""The MMDiT from one .safetensors file (ComfyUI / single-file layout): which tensors are the transformer, one-line
refusals, and a cast per tensor while reading.

Keys are diffusers' parameter names (`transformer_blocks.0.attn.to_q.weight`, `img_in.weight`, ...), bare or under
`model.diffusion_model.` / `diffusion_model.`; an all-in-one checkpoint keeps its VAE and text encoder beside them
under other prefixes (`first_stage_model.`, `text_encoders.`, ...), which are counted and ignored. The header is read
here, not by safetensors, so that a pickle, a truncated download, an fp8 or a LoRA file is named for what it is
before any tensor is read.
"""
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .fp8 import describe as describe_fp8, quant_plan, read_quantized
from .safetensors_io import LoadError, check_keys

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# the MMDiT's top-level modules: a key under none of them is not a transformer parameter
ROOTS = ("transformer_blocks.", "img_in.", "txt_in.", "txt_norm.", "time_text_embed.", "norm_out.", "proj_out.")
# ComfyUI's flag for Edit-2511 (condition tokens take the t=0 modulation): an empty tensor, not a parameter
MARKER_2511 = "__index_timestep_zero__"
FLOATS = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64"}
# what a file that holds no MMDiT looks like, by key prefix (after the transformer prefix is stripped)
LOOKS_LIKE = (("a VAE", ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "first_stage_model.", "vae.")),
              ("a text encoder", ("model.layers.", "model.embed_tokens.", "model.language_model.", "model.visual.",
                                  "visual.", "lm_head.", "text_encoders.", "cond_stage_model.", "language_model.")))


def read_header(path, flag="--transformer"):
    """{key: {"dtype", "shape", "data_offsets"}}, the header's metadata dict and the file size. A safetensors file
    is 8 bytes little-endian header length, the header as JSON, then the tensor bytes. flag: the option that took
    the file, for the refusals."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise LoadError(f"{path} is empty; re-download it")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            if head[:1] == b"\x80" or head[:2] == b"PK":  # pickle protocol 2+ / torch.save's zip
                raise LoadError(f"{path} is a pickled PyTorch checkpoint (.ckpt/.pt/.bin), not safetensors; "
                                "pickles are never loaded here: use the .safetensors release of this model")
            if len(head) < 9 or head[8:9] != b"{":
                raise LoadError(f"{path} is not a safetensors file (no safetensors header); "
                                f"{flag} takes a .safetensors file")
            n = struct.unpack("<Q", head[:8])[0]
            if 8 + n > size:
                raise LoadError(f"{path} is truncated ({size} bytes, its header alone needs {8 + n}); re-download it")
            f.seek(8)
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError):
        raise LoadError(f"{path} has a corrupt safetensors header; re-download it") from None
    except OSError as e:
        raise LoadError(f"cannot read {path}: {e.strerror}") from None
    metadata = header.pop("__metadata__", None) or {}
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        bad = [k for k, v in header.items() if not isinstance(v["dtype"], str) or not isinstance(v["shape"], list)]
    except (TypeError, KeyError, IndexError, ValueError):
        raise LoadError(f"{path} has a corrupt safetensors header; re-download it") from None
    if bad:
        raise LoadError(f"{path} has a corrupt safetensors header (entry {bad[0]}); re-download it")
    if 8 + n + end > size:
        raise LoadError(f"{path} is truncated ({size} bytes, its header promises {8 + n + end}); re-download it")
    return header, metadata, size


def _dtype_name(code):
    """safetensors dtype code -> torch's name: F8_E4M3 -> float8_e4m3fn, F8_E5M2FNUZ -> float8_e5m2fnuz."""
    if code.startswith("F8_"):
        return "float8_" + code[3:].lower() + ("fn" if code == "F8_E4M3" else "")
    return FLOATS.get(code, code.lower())


def _refuse_not_mmdit(path, keys):
    """One line saying what a file with no MMDiT keys looks like (a LoRA, a VAE, a text encoder)."""
    lora = [k for k in keys if "lora_" in k or ".lora." in k or k.endswith(".alpha")]
    if lora:
        raise LoadError(f"{path} is a LoRA ({len(lora)} LoRA tensors such as {min(lora)}), not a transformer; "
                        "pass it with --lora")
    if not any(k.startswith(ROOTS) for k in keys):
        what = next((name for name, roots in LOOKS_LIKE if any(k.startswith(roots) for k in keys)), None)
        kind = f"it looks like {what}" if what else "none of its keys is an MMDiT parameter"
        raise LoadError(f"{path} holds no transformer weights: {kind} ({len(keys)} tensors such as "
                        f"{min(keys, default='none')}); --transformer takes the diffusion model file")


def check_transformer_file(path, expected=None):
    """Everything about a transformer file that its header tells, before any tensor is read (a bad file costs
    no load): -> (header, size, prefix, own header entries with the prefix stripped, 2511 marker present).
    An fp8 file's scales, markers and quantization configs are not among its own entries."""
    return _check_file(path, expected)[:5]


def _check_file(path, expected=None):
    """check_transformer_file's answer and the file's loaders.fp8.Fp8Plan (None: nothing quantized). Of the
    tensors, only ComfyUI's small per-layer `.comfy_quant` configs are read here."""
    path = Path(path)
    header, metadata, size = read_header(path)
    prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in header)), "")
    own = {k[len(prefix):]: v for k, v in header.items() if k.startswith(prefix)}  # prefix stripped
    marker = MARKER_2511 in own or MARKER_2511 in header
    own.pop(MARKER_2511, None)
    _refuse_not_mmdit(path, list(own))
    quant = quant_plan(path, own, metadata, prefix)  # one line for any quantization we do not read
    if quant is not None:
        own = {k: v for k, v in own.items() if k not in quant.aux}
    if expected is not None:  # shapes from the header: a mismatch costs no read
        check_keys(expected, {k: torch.empty(v["shape"], device="meta") for k, v in own.items()}, str(path))
    return header, size, prefix, own, marker, quant


def read_transformer_file(path, dtype=None, expected=None, keep_fp8=()):
    """The MMDiT's tensors from one .safetensors file -> (state, info).

    state: our parameter names -> tensors, floats cast to `dtype` one tensor at a time from the memory-mapped file
    (the peak is the state plus one tensor). expected (key -> shape, optional) is checked against the header before
    any tensor is read. info, for the caller to print: file, bytes, prefix ("" when bare), tensors (read),
    dtypes ({"bf16": n} on disk), ignored (tensors of other components), ignored_prefixes ({"first_stage_model.": n}),
    index_timestep_zero (the 2511 marker: the caller turns zero_cond_t on), fp8 (None, or for an fp8 file
    loaders.fp8.read_quantized's info). keep_fp8: layer names whose fp8 weights stay fp8, each with a float32
    `<layer>.weight_scale` [out] beside it; every other fp8 tensor is dequantized to `dtype` as it is read."""
    path = Path(path)
    header, size, prefix, own, marker, quant = _check_file(path, expected)
    others = [k for k in header if not k.startswith(prefix)]
    state, fp8 = {}, None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if quant is None:
                for k in own:
                    t = f.get_tensor(prefix + k)
                    state[k] = t.to(dtype) if dtype is not None else t
            else:  # fp8 kept where keep_fp8 says, dequantized elsewhere: loaders/fp8.py
                state, fp8 = read_quantized(f, own, quant, prefix, dtype, set(keep_fp8))
    except Exception as e:  # safetensors' own error types for data it cannot map
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise LoadError(f"cannot read {path}: {why}; the file is corrupt, re-download it") from None

    ignored = {}
    for k in others:
        if k != MARKER_2511:  # a bare marker beside prefixed keys
            root = k.split(".", 1)[0] + "."
            ignored[root] = ignored.get(root, 0) + 1
    dtypes = {}
    for v in own.values():
        dtypes[_dtype_name(v["dtype"])] = dtypes.get(_dtype_name(v["dtype"]), 0) + 1
    info = dict(file=str(path), bytes=size, prefix=prefix, tensors=len(own), dtypes=dtypes,
                ignored=sum(ignored.values()), ignored_prefixes=ignored, index_timestep_zero=marker, fp8=fp8)
    return state, info


def summary(info):
    """One line for the CLI: what the file held and what was made of it."""
    dtypes = ", ".join(f"{n} {d}" for d, n in info["dtypes"].items())
    line = f"transformer from {Path(info['file']).name}: {info['tensors']} tensors ({dtypes})"
    if info["ignored"]:
        parts = ", ".join(f"{p} {n}" for p, n in info["ignored_prefixes"].items())
        line += f"; {info['ignored']} tensors of other components ignored ({parts})"
    if info["index_timestep_zero"]:
        line += "; Edit-2511 marker: zero_cond_t on"
        if info.get("overrides", {}).get("zero_cond_t"):
            line += " (transformer/config.json said false)"
    if info.get("fp8"):
        line += "; " + describe_fp8(info["fp8"])
    return line
