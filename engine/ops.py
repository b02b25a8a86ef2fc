"""The one dispatch point for fused ops: a Triton kernel on CUDA tensors, the torch reference elsewhere.

Model code calls ops.<name>(...) and never knows which ran. QIE_OPS=torch forces the references (the
baseline path in benchmarks); QIE_OPS=triton (default) uses a kernel wherever one exists for the inputs;
QIE_OPS=interpret runs the kernels on CPU tensors under the Triton interpreter (the CI's model-level check).
QIE_ATTENTION=triton keeps attention on our kernel (no timing against cuDNN; see attention()).
QIE_ATTN_FP8=1 adds our fp8 attention kernel to attention()'s timed choice (off by default: accuracy);
QIE_ATTN_FP8_PV=bf16 makes that kernel's P·V a bf16 dot (V not quantized, P not rounded to e4m3; default fp8);
QIE_ATTN_FP8_QK=int8 gives it int8 Q/K codes (with PV=bf16: the SageAttention-1 recipe; default fp8).
QIE_FP8_QUANT=torch quantizes the fp8 GEMMs' activations at the Linear in plain torch (the unfused baseline);
by default (fused) the kernel producing a GEMM input emits it as FP8Rows where takes_fp8_rows() says so.
"""
import functools
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import attention as _attention
from kernels import attention_fp8 as _attention_fp8
from kernels import fp8_linear as _fp8_linear
from loaders import LoadError, atomic_write_bytes
from kernels import modulation as _modulation
from kernels import qk_rope as _qk_rope
from kernels import quant_fp8 as _quant_fp8

FP8Rows = _fp8_linear.FP8Rows   # an activation as e4m3 rows + per-token float32 scales (kernels/fp8_linear.py)


def _triton(t, module, name):
    """The Triton launcher `name` of `module` if the tensor is on CUDA and kernels are enabled, else None.
    QIE_OPS=interpret also sends CPU tensors to the kernels (with TRITON_INTERPRET=1: tests only)."""
    mode = os.environ.get("QIE_OPS", "triton")
    if mode == "torch" or (not t.is_cuda and mode != "interpret"):
        return None
    return getattr(module, name, None)


def attention(q, k, v, kv_len=None, causal=False, scale=None, kv_host=None, fp8=None):
    """q [B, Sq, H, D]; k, v [B, Sk, Hk, D]; kv_len int32 [B] valid keys per row (keys past it ignored).
    kv_host: the same lengths as host ints, if the caller has them (reading kv_len would wait for the GPU).
    With them, a non-causal bf16/fp16 call may go to torch's cuDNN attention instead of our kernel, where
    that measured faster on this GPU for this size (timed once, then remembered: see _fastest).
    fp8: also time our fp8 kernel (kernels/attention_fp8.py) in that choice; None reads QIE_ATTN_FP8=1. Off by
    default: e4m3 keeps 3 mantissa bits, and its error vs float32 is ~15x the bf16 kernels'."""
    fn = _triton(q, _attention, "attention")
    if fn is None or not fn.supports(q, k, v, causal):
        return _attention.attention_ref(q, k, v, kv_len=kv_len, causal=causal, scale=scale)
    ours = lambda: fn(q, k, v, kv_len=kv_len, causal=causal, scale=scale)  # noqa: E731
    cudnn = fp8_fn = None
    if _cudnn_candidate(q, k, causal, kv_len, kv_host):
        cudnn = lambda: sdpa_rows(q, k, v, kv_host, scale, SDPBackend.CUDNN_ATTENTION)  # noqa: E731
    if _fp8_candidate(q, k, v, causal, fp8):
        pv, qk = _fp8_pv(None), os.environ.get("QIE_ATTN_FP8_QK", "fp8")
        fp8_fn = lambda: _attention_fp8.attention_fp8(q, k, v, kv_len=kv_len, scale=scale, qk=qk, pv=pv)  # noqa: E731
    if cudnn is not None or fp8_fn is not None:
        # bf16 keys stay as they were; the default fp8 kernel keeps "|fp8", another recipe is another candidate
        variant = "" if fp8_fn is None else "|fp8" if (qk, pv) == ("fp8", "fp8") else f"|{qk} pv {pv}"
        key = _backend_key(q, k, kv_host) + variant
        choice = _fastest(key, ours, cudnn, fp8=fp8_fn)
        if choice == "cudnn":
            return cudnn()
        if choice == "fp8":
            return fp8_fn()
    return ours()


def attention_fp8(q, k, v, kv_len=None, scale=None, qk="fp8", pv=None):
    """softmax(q kᵀ · scale) v with an 8-bit Q·Kᵀ (qk "fp8" or "int8" codes) and an fp8 or bf16 P·V (pv; None
    reads QIE_ATTN_FP8_PV, default "fp8") (kernels/attention_fp8.py): q, k, v [B, S, H, D], kv_len int32 [B] or
    None -> [B, Sq, H, D] in q's dtype. Off the GPU (or below sm89) the same quantized math in torch."""
    pv = _fp8_pv(pv)
    fn = _triton(q, _attention_fp8, "attention_fp8")
    if fn is None or not fn.supports(q, k, v):
        return _attention_fp8.attention_fp8_ref(q, k, v, kv_len=kv_len, scale=scale, qk=qk, pv=pv)
    return fn(q, k, v, kv_len=kv_len, scale=scale, qk=qk, pv=pv)


def _fp8_pv(pv):
    return os.environ.get("QIE_ATTN_FP8_PV", "fp8") if pv is None else pv


def _fp8_candidate(q, k, v, causal, fp8):
    if fp8 is None:
        fp8 = os.environ.get("QIE_ATTN_FP8") == "1"
    if not fp8 or causal or not q.is_cuda or os.environ.get("QIE_ATTENTION", "auto") != "auto":
        return False
    fn = getattr(_attention_fp8, "attention_fp8", None)
    return fn is not None and fn.supports(q, k, v)


def sdpa_rows(q, k, v, kv_host=None, scale=None, backend=SDPBackend.CUDNN_ATTENTION):
    """Attention through torch SDPA's `backend`, each row b over its first kv_host[b] keys (one call for
    the batch when every key is valid). q, k, v [B, S, H, D] (views fine) -> [B, Sq, H, D] contiguous."""
    Sk = k.shape[1]
    t = lambda x: x.transpose(1, 2)  # noqa: E731  [B, S, H, D] view -> SDPA's [B, H, S, D]
    with sdpa_kernel(backend):
        if kv_host is None or all(n == Sk for n in kv_host):
            return t(F.scaled_dot_product_attention(t(q), t(k), t(v), scale=scale)).contiguous()
        out = q.new_empty(q.shape)
        for b, n in enumerate(kv_host):
            row = F.scaled_dot_product_attention(t(q[b:b + 1]), t(k[b:b + 1, :n]), t(v[b:b + 1, :n]), scale=scale)
            out[b:b + 1] = t(row)
        return out


def _cudnn_candidate(q, k, causal, kv_len, kv_host):
    if os.environ.get("QIE_ATTENTION", "auto") != "auto" or not q.is_cuda or causal:
        return False
    if kv_len is not None and (kv_host is None or len(kv_host) != q.shape[0]):
        return False                       # the lengths would have to be read back from the GPU
    return (q.dtype in (torch.float16, torch.bfloat16) and q.shape[2] == k.shape[2] and q.shape[-1] in (64, 128)
            and torch.backends.cudnn.is_available())


@functools.lru_cache(maxsize=None)
def _device_name(index):
    return torch.cuda.get_device_name(index)


def _backend_key(q, k, kv_host):
    B, Sq, H, D = q.shape
    masked = kv_host is not None and any(n != k.shape[1] for n in kv_host)
    bucket = 1 << (max(Sq, k.shape[1]) - 1).bit_length()
    return (f"{_device_name(q.device.index)}|torch {torch.__version__}|cudnn {torch.backends.cudnn.version()}"
            f"|{_attention.__name__} {getattr(_attention, '_KERNEL_VERSION', 0)}|B {B}|H {H}|D {D}|S {bucket}"
            f"|masked {int(masked)}")


# Which attention implementation wins, per size class on this GPU: decided once by timing both on the
# call's own inputs, kept in memory and (remember_kernel_choices) on disk, so that later runs pick the
# same one and give the same bits. A backend that fails on the inputs loses.
_BACKENDS, _BACKENDS_PATH = {}, [None]


def _fastest(key, ours, cudnn=None, rounds=3, fp8=None):
    choice = _BACKENDS.get(key)
    if choice is None:
        fns = {"ours": ours, **{n: f for n, f in (("cudnn", cudnn), ("fp8", fp8)) if f is not None}}
        try:
            ours()                         # warm-up: autotuning
            for name in [n for n in fns if n != "ours"]:
                try:
                    fns[name]()            # warm-up: autotuning, cuDNN plan building
                except RuntimeError:       # refused these inputs (or ran out of memory): it loses
                    del fns[name]
            times = {name: [] for name in fns}
            for _ in range(rounds if len(fns) > 1 else 0):  # alternating, so clock drift hits each alike
                for name, fn in fns.items():
                    times[name].append(_time_ms(fn))
            choice = min(times, key=lambda n: sorted(times[n])[len(times[n]) // 2]) if len(fns) > 1 else "ours"
        except RuntimeError:               # failed while timed (or ours failed: its own call will say why)
            choice = "ours"
        _BACKENDS[key] = choice
        _save_json(_BACKENDS_PATH[0], _BACKENDS)
    return choice


def _time_ms(fn):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def _save_json(path, data):
    if path is None:
        return
    try:  # atomic: a concurrent reader sees the old or the new file
        atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode(), force=True)
    except LoadError:
        pass                              # a read-only cache folder costs only the reuse


def remember_kernel_choices(folder):
    """Keep the kernels' autotuned choices in `folder` and reuse them in later processes: the same inputs
    then give the same bits in every run on this machine (autotuning alone may differ between runs)."""
    remember = getattr(_attention, "remember_choices", None)
    if remember is not None:
        remember(os.path.join(folder, "attention_choices.json"))
    path = os.path.join(folder, "attention_backends.json")
    _BACKENDS_PATH[0] = path
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return
    if isinstance(stored, dict):
        for key, choice in stored.items():
            if choice in ("ours", "cudnn", "fp8"):
                _BACKENDS.setdefault(key, choice)


def norm_modulate(x, shift, scale, split=None, eps=1e-6, fp8=False):
    """LayerNorm(x) * (1 + scale) + shift; x [B, S, C], shift/scale [B, C] or [B, 2, C] split at token `split`.
    fp8: as FP8Rows (e4m3 + per-token scales of that value in x's dtype), for Linears that take_fp8_rows."""
    fn = _triton(x, _modulation, "norm_modulate")
    if fn is not None:
        if fp8:
            return fn(x, shift, scale, split=split, eps=eps, q_dtype=torch.float8_e4m3fn)
        return fn(x, shift, scale, split=split, eps=eps)
    out = _modulation.norm_modulate_ref(x, shift, scale, split=split, eps=eps)
    return _quant_fp8.quantize_ref(out) if fp8 else out


def gated_residual(x, gate, y, split=None):
    """x + gate * y."""
    fn = _triton(x, _modulation, "gated_residual")
    if fn is not None:
        return fn(x, gate, y, split=split)
    return _modulation.gated_residual_ref(x, gate, y, split=split)


def gated_residual_norm_modulate(x, gate, y, shift, scale, split=None, eps=1e-6, fp8=False):
    """(h, norm_modulate(h)) with h = x + gate * y: one pass over the residual stream. fp8: the second as FP8Rows."""
    fn = _triton(x, _modulation, "gated_residual_norm_modulate")
    if fn is not None:
        if fp8:
            return fn(x, gate, y, shift, scale, split=split, eps=eps, q_dtype=torch.float8_e4m3fn)
        return fn(x, gate, y, shift, scale, split=split, eps=eps)
    h, out = _modulation.gated_residual_norm_modulate_ref(x, gate, y, shift, scale, split=split, eps=eps)
    return (h, _quant_fp8.quantize_ref(out)) if fp8 else (h, out)


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


def linear_fp8(x, weight, scale, bias=None):
    """x [..., K] @ (weight [N, K] float8_e4m3fn · scale [N] float32 per output channel)ᵀ + bias -> [..., N] in
    x's dtype. On CUDA sm89+ (bf16): torch._scaled_mm with x quantized per token; elsewhere (CPU, older GPUs,
    QIE_OPS=torch) the dequantized weight through F.linear, which is the reference.
    x may be FP8Rows (quantized already by the kernel that produced it): the GEMM takes them as they are, and the
    reference dequantizes both operands (what _scaled_mm computes)."""
    if os.environ.get("QIE_OPS", "triton") != "torch" and _fp8_linear.supports(x, weight, bias):
        return _fp8_linear.fp8_linear(x, weight, scale, bias)
    return _fp8_linear.fp8_linear_ref(x, weight, scale, bias)


def takes_fp8_rows(x, *linears):
    """Whether every Linear of `linears` (the consumers of activation x: a tensor or FP8Rows, or one standing for
    it on the same device and dtype) is an fp8 layer (float8_e4m3fn weight + weight_scale) whose GEMM runs in fp8
    here. Then the op producing x should emit FP8Rows (fp8=True, quantize_fp8, gelu_fp8) and no torch pass
    quantizes it at the Linear. False under QIE_OPS=torch and QIE_FP8_QUANT=torch."""
    if os.environ.get("QIE_OPS", "triton") == "torch" or os.environ.get("QIE_FP8_QUANT", "fused") == "torch":
        return False
    return all(getattr(m, "weight_scale", None) is not None and m.weight.shape[1] % 16 == 0
               and _fp8_linear.supports(x, m.weight, getattr(m, "bias", None)) for m in linears)


def quantize_fp8(x):
    """x [M, K] or [B, S, K] (rows may be strided) -> FP8Rows: per-token e4m3 + scales, quantize_rows' rule,
    in one pass (the attention output feeding to_out/to_add_out: see kernels/quant_fp8.py for why not inside
    attention)."""
    fn = _triton(x, _quant_fp8, "quantize")
    return fn(x) if fn is not None else _quant_fp8.quantize_ref(x)


def gelu_fp8(y):
    """gelu_tanh(y) as FP8Rows, y [M, N] or [B, S, N] (the MLP up-projection's output): the GELU rounded to
    y's dtype, then quantized per token, in one kernel."""
    fn = _triton(y, _quant_fp8, "gelu_quantize")
    return fn(y) if fn is not None else _quant_fp8.gelu_quantize_ref(y)


def gemm_input(x, *linears):
    """x as its consumer Linears take it: quantize_fp8(x) where they take_fp8_rows, else x itself."""
    return quantize_fp8(x) if takes_fp8_rows(x, *linears) else x
