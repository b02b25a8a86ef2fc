"""Edit-2509/2511 on full-size random weights, ours vs diffusers in the same process:
1. the MMDiT forward at the Plus shape (two 1 MP condition images: 3 x 4096 image tokens + 430 text
   tokens), B=1 and B=2 (CFG rows of 430 and 380 text tokens), zero_cond_t on as in 2511;
2. fusing a rank-64 LoRA over every Linear of the 60 blocks (the Lightning files' `diffusion_model.`
   lora_A/lora_B layout), file read included; diffusers' load_lora_weights + fuse_lora on the same file;
3. a whole 2511 Lightning edit (4 steps, CFG 1, sampler lightning) with two 1 MP images from prompt
   embeddings, per stage, against QwenImageEditPlusPipeline on the same weights.
The weights are made on the GPU once and shared by both models (our parameter names are the checkpoint's).
Run on the device machine:
    python -m benchmarks.bench_plus --out results.json
"""
import argparse
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.common import ceilings, diffusers_transformer, env_info, random_state, time_ms, write_json
from engine.config import MMDiTConfig, RunOptions, VAEConfig
from engine.models.mmdit import MMDiT, modulation_table
from engine.models.vae import QwenImageVAE
from loaders import assign

PLUS = MMDiTConfig(zero_cond_t=True)          # the 2511 transformer
GRID = (64, 64)                               # a 1 MP image's token grid (1024 px / 16)
CASES = {"plus_b1": [430], "plus_b2": [430, 380]}
RANK = 64


def inputs(lens, seed=1):
    g = torch.Generator("cuda").manual_seed(seed)
    B, L, N = len(lens), max(lens), 3 * GRID[0] * GRID[1]
    x = torch.randn(B, N, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    txt = torch.randn(B, L, 3584, device="cuda", dtype=torch.bfloat16, generator=g)
    mask = (torch.arange(L, device="cuda")[None] < torch.tensor(lens, device="cuda")[:, None]).long()
    t = torch.full((B,), 0.5625, device="cuda", dtype=torch.bfloat16)
    return x, txt, mask, t, [(1, *GRID)] * 3, torch.tensor(lens)


def flops(lens):
    N, d = 3 * GRID[0] * GRID[1], PLUS.dim
    return sum(PLUS.num_layers * (24 * d * d * (N + L) + 4 * (N + L) ** 2 * d) for L in lens)


def forward_case(lens, ref, ours):
    x, txt, mask, t, shapes, txt_len = inputs(lens)
    dmask = None if bool(mask.all()) else mask      # the pipeline drops an all-ones mask
    ref_fn = lambda: ref(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=dmask,
                         timestep=t, img_shapes=[shapes] * len(lens), return_dict=False)[0]
    rope = ours.rope(shapes, txt.shape[1], "cuda")
    mods = modulation_table(ours, t[:1])[0]
    ours_fn = lambda: ours(x, txt, txt_len, t, shapes, rope=rope, mods=mods)
    rows = {}
    with torch.inference_mode():
        for name, fn in (("diffusers", ref_fn), ("ours", ours_fn), ("diffusers_again", ref_fn)):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            ms = time_ms(fn, warmup=1, reps=7)
            rows[name] = {"ms": ms, "tflops": flops(lens) / ms / 1e9,
                          "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        a, b = ours_fn().float(), ref_fn().float()
        rows["ours_vs_diffusers_rel_l2"] = ((a - b).norm() / b.norm()).item()
    # diffusers timed before and after ours: the baseline is their mean (clock drift shows as their spread)
    rows["diffusers_ms"] = (rows["diffusers"]["ms"] + rows["diffusers_again"]["ms"]) / 2
    rows["ratio"] = rows["ours"]["ms"] / rows["diffusers_ms"]
    return rows


def profile_case(lens, ref, ours, rows):
    """Where the forward's time goes at the Plus shape, ours and diffusers (bench_e2e's kernel categories),
    with the GEMMs' and attention's achieved TFLOP/s."""
    from benchmarks.bench_e2e import kernel_breakdown
    x, txt, mask, t, shapes, txt_len = inputs(lens)
    dmask = None if bool(mask.all()) else mask
    rope = ours.rope(shapes, txt.shape[1], "cuda")
    mods = modulation_table(ours, t[:1])[0]
    fns = {"ours": lambda: ours(x, txt, txt_len, t, shapes, rope=rope, mods=mods),
           "diffusers": lambda: ref(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=dmask,
                                    timestep=t, img_shapes=[shapes] * len(lens), return_dict=False)[0]}
    N, d = 3 * GRID[0] * GRID[1], PLUS.dim
    lin = sum(PLUS.num_layers * 24 * d * d * (N + L) for L in lens)
    att = sum(PLUS.num_layers * 4 * (N + L) ** 2 * d for L in lens)
    out = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            r = kernel_breakdown(fn)
            r["wall_ms"] = rows["ours"]["ms"] if name == "ours" else rows["diffusers_ms"]
            r["gap_ms"] = r["wall_ms"] - r["kernel_ms"]
            r["gemm_tflops"] = lin / r["ms"].get("gemm", float("nan")) / 1e9
            r["attention_tflops"] = att / r["ms"].get("attention", float("nan")) / 1e9
            out[name] = r
    return out


def lora_targets(model):
    return [n for n, m in model.transformer_blocks.named_modules() if isinstance(m, torch.nn.Linear)]


def write_lora(path, model, seed=3):
    """A rank-64 LoRA on every Linear of every block, `diffusion_model.` lora_A/lora_B in bf16 with alpha."""
    from safetensors.torch import save_file
    g = torch.Generator("cuda").manual_seed(seed)
    state = {}
    for name in lora_targets(model):
        lin = model.transformer_blocks.get_submodule(name)
        key = f"diffusion_model.transformer_blocks.{name}"
        state[key + ".lora_A.weight"] = (torch.randn(RANK, lin.in_features, device="cuda", generator=g) * 0.01
                                         ).to(torch.bfloat16).cpu()
        state[key + ".lora_B.weight"] = (torch.randn(lin.out_features, RANK, device="cuda", generator=g) * 0.01
                                         ).to(torch.bfloat16).cpu()
        state[key + ".alpha"] = torch.tensor(float(RANK))
    save_file(state, str(path))
    return len(state) // 3, sum(t.numel() * t.element_size() for t in state.values())


def time_fuse(path, ours, ref):
    from engine.transforms.lora import fuse_loras
    out = {}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    summary = fuse_loras(ours, [(path, 1.0)], compute_device="cuda")
    torch.cuda.synchronize()
    out["ours_s"] = time.perf_counter() - t0
    out["ours_summary"] = str(summary)[:300]
    try:    # diffusers + peft on the same file and weights (fused twice now: only the time matters)
        from diffusers import QwenImageEditPlusPipeline
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sd = QwenImageEditPlusPipeline.lora_state_dict(str(path))
        QwenImageEditPlusPipeline.load_lora_into_transformer(sd, transformer=ref, adapter_name="bench")
        ref.fuse_lora(lora_scale=1.0)
        torch.cuda.synchronize()
        out["diffusers_s"] = time.perf_counter() - t0
        ref.unload_lora()
    except Exception as e:
        out["diffusers_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def random_images(n, size=(1024, 1024), seed=5):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def whole_edit(ours_cfg_model, ref, vae_state, fp8=False):
    """A 2511 Lightning edit (4 steps, CFG 1) of two 1 MP images from prompt embeddings, ours per stage and
    diffusers' pipeline, twice each (the first pays autotuning and cuDNN's plan choice); fp8: then ours again
    with fp8 block Linears (quantizes the model in place: run it last)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

    from engine import scheduler as sched
    from engine.pipelines.common import edit
    from engine.pipelines.edit_plus import SPEC
    from engine.pipelines.load import place_models
    from loaders.vae_layout import to_3d
    cfg = VAEConfig()
    with torch.device("meta"):
        vae = QwenImageVAE(cfg)
    vae = assign(vae, dict(vae_state), "vae").eval()
    models = place_models(ours_cfg_model, vae, sched.LIGHTNING, "cuda", torch.bfloat16)
    models.spec = SPEC
    images = random_images(2)
    g = torch.Generator().manual_seed(9)
    pe = torch.randn(1, 430, 3584, generator=g).to(torch.bfloat16)
    opts = RunOptions(steps=4, cfg=1.0, seed=0, sampler="lightning")
    out = {"ours": []}
    for _ in range(2):
        models.timings.clear()
        t0 = time.perf_counter()
        img = edit(models, images, pe.cuda(), None, None, None, opts)
        out["ours"].append({"total_s": time.perf_counter() - t0, **models.timings})
    with torch.device("meta"):
        dvae = AutoencoderKLQwenImage(**{k: (list(v) if isinstance(v, tuple) else v)
                                         for k, v in cfg.__dict__.items()})
    dvae.load_state_dict(to_3d(dict(vae_state), cfg), strict=True, assign=True)
    lightning = {k: getattr(sched.LIGHTNING, k) for k in sched.LIGHTNING.__dataclass_fields__}
    pipe = QwenImageEditPlusPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**lightning), vae=dvae.cuda().eval(),
                                     text_encoder=None, tokenizer=None, processor=None, transformer=ref)
    out["diffusers"] = []
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        want = pipe(image=images, prompt_embeds=pe.cuda(), prompt_embeds_mask=None, true_cfg_scale=1.0,
                    num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(0)).images[0]
        torch.cuda.synchronize()
        out["diffusers"].append({"total_s": time.perf_counter() - t0})
    diff = np.abs(np.asarray(img).astype(int) - np.asarray(want).astype(int))
    out["ours_vs_diffusers_pixels"] = {"max": int(diff.max()), "mean": float(diff.mean()), "size": img.size}
    if fp8:   # the same edit with the block Linears quantized in place (--weights fp8 on load does the same)
        from engine.transforms.fp8 import quantize_fp8
        del pipe
        out["fp8_layers"] = quantize_fp8(ours_cfg_model, compute_device="cuda")
        out["ours_fp8"] = []
        for _ in range(2):
            models.timings.clear()
            t0 = time.perf_counter()
            img8 = edit(models, images, pe.cuda(), None, None, None, opts)
            out["ours_fp8"].append({"total_s": time.perf_counter() - t0, **models.timings})
        diff = np.abs(np.asarray(img8).astype(int) - np.asarray(img).astype(int))
        out["ours_fp8_vs_ours_bf16_pixels"] = {"max": int(diff.max()), "mean": float(diff.mean())}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--lora-file", default="/tmp/bench_lora_r64.safetensors")
    ap.add_argument("--sections", default="forward,edit,lora", help="any of forward,profile,edit,lora")
    ap.add_argument("--fp8", action="store_true", help="the whole edit also with fp8 block Linears (after lora)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    payload = {"env": env_info(), "ceilings": ceilings(), "cases": {}}
    ref = diffusers_transformer(PLUS.num_layers, seed=0, dest="cuda", zero_cond_t=True)
    with torch.device("meta"):
        ours = MMDiT(PLUS)
    ours = assign(ours, dict(ref.state_dict()), "transformer").eval()
    for case, lens in CASES.items() if sections & {"forward", "profile"} else ():
        try:
            payload["cases"][case] = forward_case(lens, ref, ours)
            if "profile" in sections:
                payload.setdefault("profile", {})[case] = profile_case(lens, ref, ours, payload["cases"][case])
        except Exception as e:      # the other sections still run
            payload["cases"][case] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        write_json(args.out, payload)
        print(case, payload["cases"][case], flush=True)

    if "edit" in sections:
        with torch.device("meta"):
            vae_meta = QwenImageVAE(VAEConfig())
        vae_state = random_state(vae_meta, seed=2, dest="cuda")
        try:
            payload["edit"] = whole_edit(ours, ref, vae_state, fp8=args.fp8 and "lora" not in sections)
        except Exception as e:
            payload["edit"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        write_json(args.out, payload)
        print("edit", payload["edit"], flush=True)

    if "lora" in sections:
        try:
            n, nbytes = write_lora(args.lora_file, ours)
            payload["lora"] = {"rank": RANK, "modules": n, "file_gib": nbytes / 2**30,
                               **time_fuse(args.lora_file, ours, ref)}
        except Exception as e:
            payload["lora"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        write_json(args.out, payload)

    peak = payload["ceilings"]["matmul_tflops"]
    print(f"\n{payload['env']['gpu']}  matmul ceiling {peak:.0f} TFLOP/s")
    for case, r in payload["cases"].items():
        if "error" in r:
            print(case, r["error"])
            continue
        print(f"{case}: diffusers {r['diffusers_ms']:.1f} ms (runs {r['diffusers']['ms']:.1f} / "
              f"{r['diffusers_again']['ms']:.1f}), ours {r['ours']['ms']:.1f} ms = x{r['ratio']:.3f} "
              f"({r['ours']['tflops']:.0f} TFLOP/s, {100 * r['ours']['tflops'] / peak:.0f}%), rel L2 "
              f"{r['ours_vs_diffusers_rel_l2']:.2e}")
    for case, provs in payload.get("profile", {}).items():
        for name, r in provs.items():
            parts = "  ".join(f"{k} {v:.1f}" for k, v in sorted(r["ms"].items()))
            print(f"{case} {name:10s} wall {r['wall_ms']:.1f} ms = kernels {r['kernel_ms']:.1f} + gaps "
                  f"{r['gap_ms']:.1f} | {parts} | gemm {r['gemm_tflops']:.0f} attn {r['attention_tflops']:.0f} TFLOP/s")
    lo = payload.get("lora", {})
    if "ours_s" in lo:
        print(f"LoRA rank {RANK} on {lo['modules']} Linears ({lo['file_gib']:.2f} GiB file): ours {lo['ours_s']:.2f} s, "
              f"diffusers {lo.get('diffusers_s', lo.get('diffusers_error'))}")
    elif lo:
        print("LoRA", lo)
    e = payload.get("edit", {})
    if "ours" in e:
        print(f"2511 Lightning edit, 2 images: ours {e['ours'][-1]}, diffusers {e['diffusers'][-1]}, "
              f"pixels {e['ours_vs_diffusers_pixels']}")
        if "ours_fp8" in e:
            print(f"  with fp8 block Linears: {e['ours_fp8'][-1]}, vs ours bf16 pixels {e['ours_fp8_vs_ours_bf16_pixels']}")
    elif e:
        print("edit", e)


if __name__ == "__main__":
    main()
