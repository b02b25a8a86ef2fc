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


def write_json(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
