"""FP8 weights for a built MMDiT: its block Linears rewritten as FP8Linear (e4m3fn weight, float32 scale per output
channel, bias in the model dtype), which call ops.linear_fp8. The model never knows: the transform swaps modules.

Which layers: the twelve Linears of each block that carry the per-token work (q/k/v/out of both streams and both
MLPs). The modulation Linears (img_mod/txt_mod: precomputed once per edit, then dropped or left on the host),
img_in, txt_in, norm_out and proj_out stay in the model dtype.

Parameter names do not change (`transformer_blocks.0.attn.to_q.weight` plus `.weight_scale` beside it), so an fp8
state dict assigns onto a model whose Linears were swapped on the meta device (`use_fp8_linears`), and streaming
(engine.vram.offload) packs an fp8 weight and its scale into a block's flat buffer like any other parameter.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.fp8_linear import dequantize_rows, quantize_rows  # the rule the GEMM's scales assume

from engine import ops
from engine.models.mmdit import GeluProj

BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                 "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                 "txt_mlp.net.2")


class FP8Linear(nn.Module):
    """y = x @ (weight.float() · weight_scale[:, None])ᵀ + bias; weight float8_e4m3fn [out, in], weight_scale
    float32 [out], bias [out] in the model dtype (or None)."""

    def __init__(self, weight, weight_scale, bias=None):
        super().__init__()
        if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
            raise ValueError(f"FP8Linear wants a 2-D float8_e4m3fn weight, got {weight.dtype} {tuple(weight.shape)}")
        if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (weight.shape[0],):
            raise ValueError(f"FP8Linear wants a float32 scale of shape ({weight.shape[0]},), "
                             f"got {weight_scale.dtype} {tuple(weight_scale.shape)}")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def like(cls, linear):
        """An empty FP8Linear of `linear`'s shape on its device (meta, for assigning a state dict onto)."""
        out_f, in_f = linear.weight.shape
        dev = linear.weight.device
        bias = None if linear.bias is None else torch.empty_like(linear.bias)
        return cls(torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn, device=dev),
                   torch.empty(out_f, dtype=torch.float32, device=dev), bias)

    def forward(self, x):
        return ops.linear_fp8(x, self.weight, self.weight_scale, self.bias)

    def dequantized(self, dtype=torch.float32):
        """The weight this layer computes with: [out, in] in `dtype`."""
        return dequantize_rows(self.weight, self.weight_scale, dtype)

    def extra_repr(self):
        out_f, in_f = self.weight.shape
        return f"in_features={in_f}, out_features={out_f}, bias={self.bias is not None}, float8_e4m3fn"


class FP8GeluProj(nn.Module):
    """GeluProj over an FP8Linear: gelu_tanh(proj(x)). The bf16 module fuses the GELU into the GEMM
    (ops.linear_gelu); torch._scaled_mm has no activation epilogue, so here it is a separate op, which with
    fp8_out (the down-projection takes FP8Rows) also quantizes the hidden for the next fp8 GEMM (ops.gelu_fp8).
    That fused GELU is the tanh form computed as a sigmoid (kernels/quant_fp8.py): within one bf16 step of the
    unfused F.gelu (equal in 98.4% of values on the H200)."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x, fp8_out=False):
        y = self.proj(x)   # [..., 4C] in the model dtype
        return ops.gelu_fp8(y) if fp8_out else F.gelu(y, approximate="tanh")


def fp8_layer_names(num_layers):
    """Names of the Linears that are kept in fp8, for a model of `num_layers` blocks."""
    return [f"transformer_blocks.{i}.{n}" for i in range(num_layers) for n in BLOCK_LINEARS]


def _swap(model, name, new):
    """Put FP8Linear `new` where Linear `name` was (a GeluProj's proj: the GeluProj becomes an FP8GeluProj)."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, (GeluProj, FP8GeluProj)) and attr == "proj":
        grand_name, _, slot = parent_name.rpartition(".")
        setattr(model.get_submodule(grand_name), slot, FP8GeluProj(new))
    else:
        setattr(parent, attr, new)  # also for ModuleList slots ("to_out.0", "net.2")


def use_fp8_linears(model, names, allowed=None):
    """Swap the Linears `names` for empty FP8Linears of the same shape and device (for a model built on the meta
    device, before a state dict with fp8 weights and their `weight_scale` is assigned). allowed: the layers that
    may be fp8 (default: an MMDiT's block Linears). Returns the model."""
    allowed = set(fp8_layer_names(len(model.transformer_blocks)) if allowed is None else allowed)
    for name in names:
        if name not in allowed:
            raise ValueError(f"{name} is not one of the Linears kept in fp8")
        old = model.get_submodule(name)
        if not isinstance(old, FP8Linear):
            _swap(model, name, FP8Linear.like(old))
    return model


def quantize_fp8(model, compute_device=None):
    """Quantize the block Linears of a built MMDiT in place, one layer at a time (never a second copy of the
    model): scale = amax(|W| per output row) / 448, W · (1 / scale) rounded to e4m3fn. The arithmetic runs in
    float32 on `compute_device` (default: where each weight lives); the fp8 weight goes back where the weight
    was. Layers that are FP8Linear already are left as they are. Returns the number of layers quantized."""
    return quantize_linears(model, fp8_layer_names(len(model.transformer_blocks)), compute_device)


# the Qwen2.5-VL language model's per-token Linears (attention and SwiGLU MLP of each decoder layer); the
# vision tower, the embeddings, the final norm and the LM head stay in the model dtype
TEXT_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")


def text_fp8_layer_names(num_layers):
    """Names of the text encoder's Linears that may be fp8, for a language model of `num_layers` layers."""
    return [f"layers.{i}.{n}" for i in range(num_layers) for n in TEXT_LINEARS]


def quantize_text_encoder_fp8(text_encoder, compute_device=None):
    """--text-weights fp8: the language model's layer Linears to float8_e4m3fn with one scale per output channel
    (quantize_fp8's rule and in-place swap; those already fp8, from an fp8 file, are left). Returns the number of
    layers quantized."""
    return quantize_linears(text_encoder, text_fp8_layer_names(len(text_encoder.layers)), compute_device)


def quantize_linears(model, names, compute_device=None):
    """The Linears `names` of `model` swapped for FP8Linears, one at a time (see quantize_fp8)."""
    n = 0
    with torch.no_grad():
        for name in names:
            old = model.get_submodule(name)
            if isinstance(old, FP8Linear):
                continue
            w = old.weight
            dev = w.device if compute_device is None else torch.device(compute_device)
            q, scale = quantize_rows(w.detach().to(dev))
            _swap(model, name, FP8Linear(q.to(w.device), scale.to(w.device), old.bias))
            n += 1
    return n


def fp8_summary(model):
    """(layers in fp8, their bytes, bytes the same layers take in the model dtype)."""
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    fp8 = sum(m.weight.numel() + 4 * m.weight_scale.numel() for m in layers)
    wide = model.img_in.weight.element_size() * sum(m.weight.numel() for m in layers)
    return len(layers), fp8, wide
