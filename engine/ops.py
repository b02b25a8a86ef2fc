"""The one dispatch point for fused ops: a Triton kernel on CUDA tensors, the torch reference elsewhere.

Model code calls ops.<name>(...) and never knows which ran. QIE_OPS=torch forces the references (the
baseline path in benchmarks); QIE_OPS=triton (default) uses a kernel wherever one exists for the inputs;
QIE_OPS=interpret runs the kernels on CPU tensors under the Triton interpreter (the CI's model-level check).
"""
import os

import torch
import torch.nn.functional as F

from kernels import attention as _attention
from kernels import modulation as _modulation
from kernels import qk_rope as _qk_rope


def _triton(t, module, name):
    """The Triton launcher `name` of `module` if the tensor is on CUDA and kernels are enabled, else None.
    QIE_OPS=interpret also sends CPU tensors to the kernels (with TRITON_INTERPRET=1: tests only)."""
    mode = os.environ.get("QIE_OPS", "triton")
    if mode == "torch" or (not t.is_cuda and mode != "interpret"):
        return None
    return getattr(module, name, None)


def attention(q, k, v, kv_len=None, causal=False, scale=None):
    """q [B, Sq, H, D]; k, v [B, Sk, Hk, D]; kv_len int32 [B] valid keys per row (keys past it ignored)."""
    fn = _triton(q, _attention, "attention")
    if fn is not None and fn.supports(q, k, v, causal):
        return fn(q, k, v, kv_len=kv_len, causal=causal, scale=scale)
    return _attention.attention_ref(q, k, v, kv_len=kv_len, causal=causal, scale=scale)


def remember_kernel_choices(folder):
    """Keep the kernels' autotuned choices in `folder` and reuse them in later processes: the same inputs
    then give the same bits in every run on this machine (autotuning alone may differ between runs)."""
    remember = getattr(_attention, "remember_choices", None)
    if remember is not None:
        remember(os.path.join(folder, "attention_choices.json"))


def norm_modulate(x, shift, scale, split=None, eps=1e-6):
    """LayerNorm(x) * (1 + scale) + shift; x [B, S, C], shift/scale [B, C] or [B, 2, C] split at token `split`."""
    fn = _triton(x, _modulation, "norm_modulate")
    if fn is not None:
        return fn(x, shift, scale, split=split, eps=eps)
    return _modulation.norm_modulate_ref(x, shift, scale, split=split, eps=eps)


def gated_residual(x, gate, y, split=None):
    """x + gate * y."""
    fn = _triton(x, _modulation, "gated_residual")
    if fn is not None:
        return fn(x, gate, y, split=split)
    return _modulation.gated_residual_ref(x, gate, y, split=split)


def gated_residual_norm_modulate(x, gate, y, shift, scale, split=None, eps=1e-6):
    """(h, norm_modulate(h)) with h = x + gate * y: one pass over the residual stream."""
    fn = _triton(x, _modulation, "gated_residual_norm_modulate")
    if fn is not None:
        return fn(x, gate, y, shift, scale, split=split, eps=eps)
    return _modulation.gated_residual_norm_modulate_ref(x, gate, y, shift, scale, split=split, eps=eps)


def rms_norm_rope(x, weight, cos, sin, eps=1e-6, out=None):
    """x [B, S, H, D] -> RMSNorm(x) * weight, rotated by (cos, sin) [S, D/2] in interleaved pairs;
    written into `out` (a [B, S, H, D] view) when given."""
    fn = _triton(x, _qk_rope, "rms_norm_rope")
    if fn is not None:
        return fn(x, weight, cos, sin, eps=eps, out=out)
    y = _qk_rope.rms_norm_rope_ref(x, weight, cos, sin, eps=eps)
    return y if out is None else out.copy_(y)


def linear_gelu(x, weight, bias):
    """gelu_tanh(x @ weight.T + bias). On CUDA the GELU runs in the cuBLASLt GEMM epilogue (tanh form), so
    the wide MLP hidden is written once instead of written, read and written again."""
    if x.is_cuda and os.environ.get("QIE_OPS", "triton") != "torch":
        y = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")
