"""Full-size MMDiT forward, ours vs diffusers' QwenImageTransformer2DModel in the same process.

Random bf16 weights in the real config are built on the GPU once and shared by both models (our parameter
names equal the checkpoint keys), so 41 GB serves both. `ours` is the engine as it runs (ops.attention
picks our kernel or cuDNN per size, by timing both once); `ours_triton_attention` keeps our kernel.
Run on the device machine:
    python -m benchmarks.bench_e2e --out results.json [--cases 1024_b1,1024_b2,4k_b1] [--compiled 1024_b1,1024_b2]
        [--profile 1024_b1]
"""
import argparse
import os

import torch

from benchmarks.common import ceilings, diffusers_transformer, env_info, time_ms, write_json
from engine import ops
from engine.config import MMDiTConfig
from engine.models.mmdit import MMDiT, modulation_table
from loaders import assign

FULL = MMDiTConfig()  # 60 blocks, 3072 wide, 24 heads x 128
TXT = 360  # text tokens of an Edit-2509/2511 prompt
CASES = {  # name: (batch, noisy latent grid, condition grid, text lengths per row)
    "1024_b1": (1, (64, 64), (64, 64), [TXT]),
    "1024_b2": (2, (64, 64), (64, 64), [TXT, 300]),
    "4k_b1": (1, (192, 256), (64, 64), [TXT]),
}


def build_reference(seed=0):
    """diffusers' model with random bf16 weights made directly on the GPU."""
    return diffusers_transformer(FULL.num_layers, seed, dest="cuda")


def ours_sharing(ref):
    with torch.device("meta"):
        m = MMDiT(FULL)
    return assign(m, dict(ref.state_dict()), "transformer").eval()


def inputs(case, seed=1):
    B, (h, w), (hc, wc), lens = CASES[case]
    g = torch.Generator("cuda").manual_seed(seed)
    N = (h * w + hc * wc)
    L = max(lens)
    x = torch.randn(B, N, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    txt = torch.randn(B, L, 3584, device="cuda", dtype=torch.bfloat16, generator=g)
    mask = (torch.arange(L, device="cuda")[None] < torch.tensor(lens, device="cuda")[:, None]).long()
    t = torch.full((B,), 0.5625, device="cuda", dtype=torch.bfloat16)
    shapes = [(1, h, w), (1, hc, wc)]
    return x, txt, mask, t, shapes, torch.tensor(lens)


def flops(case):
    B, (h, w), (hc, wc), lens = CASES[case]
    N = h * w + hc * wc
    d, layers = FULL.dim, FULL.num_layers
    total = 0
    for L in lens:  # the padded text rows are computed too, but count only useful work
        S = N + L
        total += layers * (24 * d * d * S + 4 * S * S * d)  # 12 d² MACs per token; QK^T and PV
    return total


KERNEL_KINDS = (  # (category, substrings of the CUDA kernel name), first match wins
    ("attention", ("attn_fwd", "flash", "fmha", "cudnn", "attention")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass")),
    ("norm_modulate_residual", ("_modulation_kernel",)),
    ("qk_norm_rope", ("_rms_norm_rope_kernel",)),
)


def kernel_breakdown(fn):
    """GPU time of one fn() call by kernel category (ms), from torch.profiler's CUDA kernel records."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out, counts = {}, {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(key in name for key in keys)), "other")
        out[kind] = out.get(kind, 0.0) + e.time_range.elapsed_us() / 1e3
        counts[kind] = counts.get(kind, 0) + 1
    return {"ms": out, "launches": counts, "kernel_ms": sum(out.values())}


def linear_attention_flops(case):
    """(linear, attention) FLOPs of the useful rows, as flops() counts them."""
    B, (h, w), (hc, wc), lens = CASES[case]
    d, layers, N = FULL.dim, FULL.num_layers, h * w + hc * wc
    return (sum(layers * 24 * d * d * (N + L) for L in lens), sum(layers * 4 * (N + L) ** 2 * d for L in lens))


def profile_case(case, ref, ours, rows):
    """Where the forward's time goes, ours and diffusers eager: kernel categories, and the wall time not
    covered by kernels (launch gaps), with the GEMMs' and attention's achieved TFLOP/s."""
    x, txt, mask, t, shapes, lens = inputs(case)
    dmask = None if bool(mask.all()) else mask
    B = x.shape[0]
    rope = ours.rope(shapes, txt.shape[1], "cuda")
    mods = modulation_table(ours, t[:1])[0]
    fns = {"ours": lambda: ours(x, txt, lens, t, shapes, rope=rope, mods=mods),
           "diffusers": lambda: ref(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=dmask,
                                    timestep=t, img_shapes=[shapes] * B, return_dict=False)[0]}
    lin, att = linear_attention_flops(case)
    result = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            os.environ["QIE_OPS"] = "triton"
            r = kernel_breakdown(fn)
            r["wall_ms"] = rows[name]["ms"]
            r["gap_ms"] = r["wall_ms"] - r["kernel_ms"]
            r["gemm_tflops"] = lin / r["ms"].get("gemm", float("nan")) / 1e9
            r["attention_tflops"] = att / r["ms"].get("attention", float("nan")) / 1e9
            result[name] = r
    return result


def run_case(case, ref, ours, compiled=False):
    x, txt, mask, t, shapes, lens = inputs(case)
    B = x.shape[0]
    # diffusers drops an all-ones mask (the pipeline passes None then)
    dmask = None if bool(mask.all()) else mask
    ref_fn = lambda: ref(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=dmask,
                         timestep=t, img_shapes=[shapes] * B, return_dict=False)[0]
    rope = ours.rope(shapes, txt.shape[1], "cuda")
    mods = modulation_table(ours, t[:1])[0]
    ours_fn = lambda: ours(x, txt, lens, t, shapes, rope=rope, mods=mods)
    rows = {}
    with torch.inference_mode():
        for name, fn, env, attn in [("diffusers" + ("_compiled" if compiled else ""), ref_fn, "triton", "auto"),
                                    ("ours_torch_ops", ours_fn, "torch", "auto"),
                                    ("ours_triton_attention", ours_fn, "triton", "triton"),
                                    ("ours", ours_fn, "triton", "auto")]:
            if compiled and name != "diffusers_compiled":
                continue
            if name == "ours_torch_ops" and case.startswith("4k"):
                continue  # about a minute per call there, and it is the correctness path, not a baseline
            os.environ["QIE_OPS"], os.environ["QIE_ATTENTION"] = env, attn
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            reps = 3 if case.startswith("4k") else 7
            ms = time_ms(fn, warmup=2 if compiled else 1, reps=reps)
            rows[name] = {"ms": ms, "tflops": flops(case) / ms / 1e9,
                          "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                          "activation_peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}
        os.environ["QIE_OPS"], os.environ["QIE_ATTENTION"] = "triton", "auto"
        if not compiled:
            a, b = ours_fn().float(), ref_fn().float()
            rows["ours_vs_diffusers_rel_l2"] = ((a - b).norm() / b.norm()).item()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="1024_b1,1024_b2,4k_b1")
    ap.add_argument("--compiled", default="", help="cases to time again with diffusers' "
                    "compile_repeated_blocks(fullgraph=True), after the eager ones")
    ap.add_argument("--profile", default="", help="cases to break down by kernel category (eager)")
    args = ap.parse_args()
    payload = {"env": env_info(), "ceilings": ceilings(), "cases": {}}
    ref = build_reference()
    ours = ours_sharing(ref)
    payload["weights_gib"] = sum(p.numel() * 2 for p in ref.parameters()) / 2**30
    # the VRAM a resident run frees by dropping img_mod/txt_mod after the precompute
    payload["modulation_weights_gib"] = sum(p.numel() * 2 for n, p in ref.named_parameters() if "_mod." in n) / 2**30
    for case in args.cases.split(","):
        payload["cases"][case] = run_case(case, ref, ours)
        write_json(args.out, payload)
        print(case, payload["cases"][case], flush=True)
    payload["attention_backends"] = dict(ops._BACKENDS)  # what ops.attention chose, per size class
    for case in filter(None, args.profile.split(",")):
        try:
            payload.setdefault("profile", {})[case] = profile_case(case, ref, ours, payload["cases"][case])
        except Exception as e:  # the timings above still stand, and the compiled runs below still run
            print(f"profile {case} failed: {type(e).__name__}: {e}", flush=True)
        write_json(args.out, payload)
    if args.compiled:
        ref.compile_repeated_blocks(fullgraph=True)
        for case in args.compiled.split(","):
            payload["cases"][case].update(run_case(case, ref, ours, compiled=True))
            write_json(args.out, payload)
            print(case, payload["cases"][case], flush=True)
    peak = payload["ceilings"]["matmul_tflops"]
    for case, provs in payload.get("profile", {}).items():
        for name, r in provs.items():
            parts = "  ".join(f"{k} {v:.1f}" for k, v in sorted(r["ms"].items()))
            print(f"{case:8s} {name:10s} wall {r['wall_ms']:.1f} ms = kernels {r['kernel_ms']:.1f} + gaps "
                  f"{r['gap_ms']:.1f} | {parts} | gemm {r['gemm_tflops']:.0f} attn {r['attention_tflops']:.0f} TFLOP/s")
    print(f"\n{payload['env']['gpu']}  matmul ceiling {peak:.0f} TFLOP/s")
    for case, rows in payload["cases"].items():
        base = rows["diffusers"]
        for name, r in rows.items():
            if isinstance(r, dict):
                print(f"{case:8s} {name:20s} {r['ms']:9.1f} ms  {r['tflops']:6.0f} TFLOP/s ({100 * r['tflops'] / peak:4.1f}%)"
                      f"  x{r['ms'] / base['ms']:.3f}  peak {r['peak_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
