"""Measured VAE activation peaks vs engine.models.vae.activation_bytes, the planner's estimate (bf16, full config).

    python -m benchmarks.calibrate_vae --out vae_memory.json [--trace encode:1024:none]
Each case: peak allocated minus what was allocated before the call (weights and input excluded), next to
the estimate. --trace prints, for one case, the peak each top-level submodule call reached (to find where
an estimate misses).
"""
import argparse
import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from benchmarks.common import env_info, random_state, write_json  # noqa: E402
from engine.config import VAEConfig  # noqa: E402
from engine.vram.memory import activation_bytes  # noqa: E402
from engine.models.vae import QwenImageVAE  # noqa: E402
from loaders import assign  # noqa: E402

GiB = 2 ** 30
CASES = ["encode:1024x1024:none", "encode:1024x1024:96", "encode:1024x1024:64", "encode:1024x1024:32",
         "encode:1536x1024:none", "decode:1024x1024:none", "decode:1024x1024:64",
         "decode:4096x3072:none", "decode:4096x3072:192", "decode:4096x3072:128", "decode:4096x3072:64",
         "decode:4096x3072:32"]


def parse(case):
    kind, size, tile = case.split(":")
    w, h = (int(v) for v in size.split("x"))
    return kind, w, h, None if tile == "none" else int(tile)


def measure(vae, case):
    kind, w, h, tile = parse(case)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    if kind == "encode":
        x = torch.rand(1, 3, h, w, device="cuda", dtype=torch.bfloat16) * 2 - 1
        fn = lambda: vae.encode(x, tile=tile)
    else:
        x = torch.randn(1, vae.cfg.z_dim, h // 8, w // 8, device="cuda", dtype=torch.bfloat16)
        fn = lambda: vae.decode(x, tile=tile)
    fn()                                   # warm-up: cuDNN plans, Triton/cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    est = activation_bytes(vae.cfg, h // 8, w // 8, tile, torch.bfloat16, 1, encode=kind == "encode")
    del out
    return {"measured_gib": measured / GiB, "estimate_gib": est / GiB, "ratio": measured / est}


def trace(vae, case):
    """Peak above the call's start for each submodule call of the path (forward hooks)."""
    rows, stack = [], []

    def pre(name, *_):
        torch.cuda.synchronize()
        stack.append((name, torch.cuda.memory_allocated()))
        torch.cuda.reset_peak_memory_stats()

    def post(name, *_):
        torch.cuda.synchronize()
        n, start = stack.pop()
        rows.append((n, (torch.cuda.max_memory_allocated() - start) / 2 ** 20))

    hooks = []
    for name, m in vae.named_modules():
        if name.count(".") <= 2 and name:
            hooks.append(m.register_forward_pre_hook(lambda mod, a, n=name: pre(n)))
            hooks.append(m.register_forward_hook(lambda mod, a, o, n=name: post(n)))
    measure(vae, case)
    for h in hooks:
        h.remove()
    return sorted(rows, key=lambda r: -r[1])[:12]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--trace", default="")
    args = ap.parse_args()
    cfg = VAEConfig()
    with torch.device("meta"):
        vae = QwenImageVAE(cfg)
    vae = assign(vae, random_state(vae, 0, dest="cuda"), "vae").eval()
    payload = {"env": env_info(), "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "cases": {}}
    for case in args.cases.split(","):
        payload["cases"][case] = measure(vae, case)
        print(f"{case:26s} measured {payload['cases'][case]['measured_gib']:6.2f} GiB  estimate "
              f"{payload['cases'][case]['estimate_gib']:6.2f} GiB  x{payload['cases'][case]['ratio']:.2f}", flush=True)
        write_json(args.out, payload)
    if args.trace:
        payload["trace"] = {args.trace: trace(vae, args.trace)}
        for name, mib in payload["trace"][args.trace]:
            print(f"  {name:40s} {mib:8.0f} MiB")
        write_json(args.out, payload)


if __name__ == "__main__":
    main()
