"""The Qwen2.5-VL text encoder from one .safetensors file (ComfyUI's split_files/text_encoders:
qwen_2.5_vl_7b.safetensors in bf16, qwen_2.5_vl_7b_fp8_scaled.safetensors), checked from its header before any
tensor is read, then read one tensor at a time through safe_open (pickles are never read).

Keys are the published checkpoint's (ComfyUI's Qwen25_7BVLI names them the same): the language model under
`model.` (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.*`,
`model.layers.{i}.mlp.{gate,up,down}_proj.weight`, `model.norm.weight`), the vision tower under `visual.`
(`visual.patch_embed.proj.weight`, the Conv3d [1280, 3, 2, 14, 14]; `visual.blocks.{j}.*`; `visual.merger.*`) and
`lm_head.weight`, read only when decoding (the Layered caption). transformers 5's `model.language_model.` /
`model.visual.` names are read too (loaders.text_encoder_layout renames both).

The fp8 file is loaders/fp8.py's scaled layout: a `scaled_fp8` marker and a float32 `<layer>.scale_weight` (one
number) beside each float8_e4m3fn Linear weight, the vision tower's Linears as well as the language model's. The
language model's 7 Linears per layer may be kept fp8 (keep_fp8: FP8Linear's weight and float32 `weight_scale`
[out], the per-tensor scale repeated per row); every other fp8 tensor is dequantized to the model dtype as it is
read. Mixed files (`weight_scale` + `comfy_quant`) and plain fp8 files (no scales: scale 1) read the same way.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .fp8 import E4M3, quant_plan, read_quantized
from .safetensors_io import LoadError, _few
from .single_file import LOOKS_LIKE, PREFIXES as MMDIT_PREFIXES, ROOTS as MMDIT_ROOTS, _dtype_name, read_header
from .text_encoder_layout import PATCH_EMBED, convert_text_encoder_state

FLAG = "--text-encoder"
HEAD = "lm_head.weight"
ROOTS = ("model.layers.", "model.embed_tokens.", "model.norm.", "model.language_model.", "model.visual.", "visual.")
VAE_ROOTS = dict(LOOKS_LIKE)["a VAE"]
LM_LINEAR = ".self_attn.", ".mlp."     # an engine key `layers.{i}` + one of these + `_proj.weight` is an LM Linear


@dataclass
class TextEncoderFile:
    """What a file's header says: its entries by file key (fp8 scales, markers and configs left out), their engine
    names, the fp8 plan (None: nothing quantized), the file size."""
    path: Path
    own: dict
    names: dict         # file key -> engine key (lm_head: "lm_head.weight")
    quant: object
    size: int

    def fp8_weights(self):
        """File keys of the float8_e4m3fn weights (uint8 containers of a mixed file included)."""
        containers = self.quant.containers if self.quant is not None else ()
        return {k for k, v in self.own.items() if v["dtype"] == E4M3 or k in containers}


def _refuse_not_text_encoder(path, keys):
    """One line saying what a file without Qwen2.5-VL keys looks like (a LoRA, a transformer, a VAE)."""
    lora = [k for k in keys if "lora_" in k or ".lora." in k or k.endswith(".alpha")]
    if lora:
        raise LoadError(f"{path} is a LoRA ({len(lora)} LoRA tensors such as {min(lora)}), not a text encoder; "
                        "LoRAs are given with --lora")
    if any(k.startswith(ROOTS) for k in keys):
        return
    advice = f"{FLAG} takes the Qwen2.5-VL file (e.g. qwen_2.5_vl_7b.safetensors)"
    if any(k.startswith(MMDIT_PREFIXES + MMDIT_ROOTS) for k in keys):
        what, advice = "it looks like a transformer (MMDiT) file", "give it with --transformer; " + advice
    elif any(k.startswith(VAE_ROOTS) for k in keys):
        what = "it looks like a VAE"
    else:
        what = "none of its keys is a Qwen2.5-VL parameter (model.layers.*, visual.*)"
    raise LoadError(f"{path} holds no text-encoder weights: {what} ({len(keys)} tensors such as "
                    f"{min(keys, default='none')}); {advice}")


def _file_key(engine_key):
    """The key a ComfyUI file holds an engine parameter under (for naming what is missing)."""
    if engine_key == PATCH_EMBED[1]:
        return PATCH_EMBED[0]
    return engine_key if engine_key.startswith(("visual.", "lm_head.")) else "model." + engine_key


def check_text_encoder_file(path, expected=None):
    """TextEncoderFile of `path`, every check its header allows done first (a bad file costs no load). expected:
    engine key -> shape (the snapshot's text-encoder config built on the meta device); a missing, extra or
    wrongly shaped tensor is refused in one line naming it. An fp8 file's scales, marker and configs are checked by
    loaders.fp8.quant_plan; an fp8 Linear weight without a scale in a file whose other fp8 weights carry one is
    refused as incomplete."""
    path = Path(path)
    header, metadata, size = read_header(path, FLAG)
    _refuse_not_text_encoder(path, list(header))
    quant = quant_plan(path, header, metadata, "")   # one line for any quantization we do not read
    own = {k: v for k, v in header.items() if quant is None or k not in quant.aux}
    names, shapes = {}, {}
    for k, v in own.items():
        meta = {k: torch.empty(v["shape"], device="meta")}
        for new, t in convert_text_encoder_state(meta, keep_lm_head=True).items():
            names[k], shapes[new] = new, tuple(t.shape)
    info = TextEncoderFile(path, own, names, quant, size)
    if quant is not None and quant.layout != "plain":
        bare = sorted(k for k in info.fp8_weights() if len(own[k]["shape"]) == 2 and k[:-len(".weight")]
                      not in quant.scales and names.get(k) not in ("embed_tokens.weight", HEAD, None))
        if bare:
            raise LoadError(f"{path}: {len(bare)} float8_e4m3fn Linear weight(s) have no scale beside them "
                            f"(scale_weight / weight_scale), e.g. {bare[0]}, while its other fp8 weights carry one; "
                            "the file is incomplete, re-download it")
    if expected is not None:
        file_of = {new: k for k, new in names.items()}
        missing = [_file_key(k) for k in expected if k not in shapes]
        extra = [file_of[k] for k in shapes if k not in expected and k != HEAD]
        wrong = [k for k in expected if k in shapes and shapes[k] != tuple(expected[k])]
        if missing:
            raise LoadError(f"{path}: {len(missing)} text-encoder tensor(s) missing, e.g. {_few(missing, 1)}; is it "
                            "the text encoder of this snapshot (text_encoder/config.json), and complete?")
        if extra:
            raise LoadError(f"{path}: {len(extra)} tensor(s) that text_encoder/config.json has no place for, e.g. "
                            f"{_few(extra, 1)}; is it the text encoder of this snapshot?")
        if wrong:
            k = wrong[0]
            raise LoadError(f"{path}: {len(wrong)} tensor(s) of another shape than text_encoder/config.json gives, "
                            f"e.g. {file_of[k]} is {tuple(own[file_of[k]]['shape'])}, expected "
                            f"{tuple(expected[k])}{' (flattened)' if k == PATCH_EMBED[1] else ''}")
    return info


def lm_linears_fp8(path):
    """Whether every Linear weight of the file's language model is float8_e4m3fn (from the header alone)."""
    info = check_text_encoder_file(path)
    lm = [k for k, new in info.names.items() if new.startswith("layers.") and new.endswith("_proj.weight")
          and any(s in new for s in LM_LINEAR)]
    fp8 = info.fp8_weights()
    return bool(lm) and all(k in fp8 for k in lm)


def read_text_encoder_file(path, dtype, expected=None, keep_fp8=(), lm_head=False):
    """The text encoder's tensors from one file -> (state in the engine's names, info). Floats are cast to `dtype`
    one tensor at a time from the memory-mapped file; keep_fp8: engine layer names (`layers.0.self_attn.q_proj`)
    whose fp8 weight stays float8_e4m3fn with a float32 `<layer>.weight_scale` [out] beside it. lm_head: read
    `lm_head.weight` too (not read otherwise). info: file, bytes, tensors (of the model, in the file), dtypes
    ({"bf16": n} on disk), lm_head ("read" | "not read" | "absent"), fp8 (None, or loaders.fp8.read_quantized's
    info: layout, kept, dequantized, input_scales, dtype)."""
    info = check_text_encoder_file(path, expected)
    wanted = {k: v for k, v in info.own.items() if k in info.names and (lm_head or info.names[k] != HEAD)}
    keep = {k[:-len(".weight")] for k in wanted if k.endswith(".weight") and info.names[k][:-len(".weight")]
            in set(keep_fp8)}
    fp8 = None
    try:
        with safe_open(str(info.path), framework="pt", device="cpu") as f:
            if info.quant is None:
                raw = {k: f.get_tensor(k).to(dtype) if dtype is not None else f.get_tensor(k) for k in wanted}
            else:
                raw, fp8 = read_quantized(f, wanted, info.quant, "", dtype, keep)
    except Exception as e:  # safetensors' own error types for data it cannot map
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise LoadError(f"cannot read {info.path}: {why}; the file is corrupt, re-download it") from None
    state = convert_text_encoder_state(raw, keep_lm_head=lm_head)
    dtypes = {}
    for k in info.names:
        d = _dtype_name(info.own[k]["dtype"])
        dtypes[d] = dtypes.get(d, 0) + 1
    has_head = HEAD in info.names.values()
    return state, dict(file=str(info.path), bytes=info.size, tensors=len(info.names), dtypes=dtypes, fp8=fp8,
                       lm_head="read" if lm_head and has_head else "not read" if has_head else "absent")


def summary(info):
    """One line for the CLI: what the file held and what was made of it."""
    dtypes = ", ".join(f"{n} {d}" for d, n in info["dtypes"].items())
    line = f"text encoder from {Path(info['file']).name}: {info['tensors']} tensors ({dtypes})"
    fp8 = info.get("fp8")
    if fp8:
        line += f"; fp8 ({fp8['layout']}): {fp8['kept']} language-model Linears kept in float8_e4m3fn"
        if fp8["dequantized"]:
            line += (f", {len(fp8['dequantized'])} fp8 tensors dequantized to {fp8['dtype']} "
                     f"(e.g. {min(fp8['dequantized'])})")
        if fp8["input_scales"]:
            line += f", {fp8['input_scales']} input scales ignored"
    if info["lm_head"] == "not read":
        line += "; lm_head.weight not read (the prompt encoding needs no LM head)"
    return line
