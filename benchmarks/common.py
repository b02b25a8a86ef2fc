"""Shared benchmark helpers: ceilings measured in the same run, timing, result rows with provenance."""
import datetime
import json
import statistics

import torch


def env_info():
    import triton
    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "sm_count": p.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def time_ms(fn, warmup=1, reps=5):
    """Median wall time of fn() in ms, bracketed by CUDA events (synchronised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def ceilings():
    """bf16 matmul TFLOP/s (8192³) and device-to-device copy GB/s (bytes read + written), measured now."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, warmup=3, reps=20)
    src = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    cms = time_ms(lambda: dst.copy_(src), warmup=3, reps=20)
    return {"matmul_tflops": 2 * n ** 3 / ms / 1e9, "copy_gbs": 2 * src.numel() * 2 / cms / 1e6}


def fp8_ceiling(n=8192):
    """fp8 e4m3 rowwise torch._scaled_mm TFLOP/s at n³ (per-token x per-channel scales), measured now."""
    from kernels.fp8_linear import quantize_rows
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    q, s = quantize_rows(a)
    ms = time_ms(lambda: torch._scaled_mm(q, q.t(), scale_a=s[:, None], scale_b=s[None, :],
                                          out_dtype=torch.bfloat16), warmup=3, reps=20)
    return 2 * n ** 3 / ms / 1e9


def rel_l2(a, b):
    """‖a − b‖ / ‖b‖ in float32."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def write_json(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def random_state(module, seed, device="cuda", dest="cpu", pin=False):
    """Random bf16 tensors for every parameter of a meta-built module, made on `device` (fast) and moved
    to `dest`: N(0, 0.02), 1-d norm weights N(1, 0.1). pin: page-locked host copies (torch's allocator)."""
    g = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, p in module.named_parameters():
        t = torch.empty(p.shape, dtype=torch.bfloat16, device=device)
        if p.dim() == 1 and "norm" in name:
            t.normal_(1.0, 0.1, generator=g)
        else:
            t.normal_(0.0, 0.02, generator=g)
        if pin:
            state[name] = torch.empty(p.shape, dtype=t.dtype, pin_memory=True).copy_(t)
        else:
            state[name] = t.to(dest)
    return state


def diffusers_transformer(num_layers=60, seed=0, dest="cuda", pin=False, zero_cond_t=False, state=None, **config):
    """diffusers' QwenImageTransformer2DModel in the real config with random_state weights, built on the
    meta device and filled directly (no 81 GB float32 detour); its RoPE tables stay on the CPU. config: more
    constructor arguments (use_layer3d_rope, use_additional_t_cond). state: these tensors instead of random
    ones (shared, not copied; keys the model lacks are left out)."""
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedLayer3DRope, QwenEmbedRope
    with torch.device("meta"):
        ref = QwenImageTransformer2DModel(num_layers=num_layers, attention_head_dim=128, num_attention_heads=24,
                                          zero_cond_t=zero_cond_t, **config)
    rope = QwenEmbedLayer3DRope if config.get("use_layer3d_rope") else QwenEmbedRope
    ref.pos_embed = rope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)
    own = dict(ref.named_parameters())
    state = random_state(ref, seed, dest=dest, pin=pin) if state is None else {k: v for k, v in state.items()
                                                                             if k in own}
    ref.load_state_dict(state, strict=False, assign=True)
    return ref.eval()
