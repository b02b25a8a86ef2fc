"""Qwen-Image-Layered and text-to-image on full-size random weights: time per denoising step and peak VRAM,
ours vs diffusers eager in the same process (issue 13's "640 or 1024?" table).

1. text to image at 1328x1328 (6889 image tokens), CFG: ours one B=2 forward per step, diffusers'
   QwenImagePipeline two B=1 forwards (cond, uncond), as each pipeline's loop does;
2. Layered, 4 layers, at 640 and 1024: (layers + 1) noisy frames + the condition frame (9600 / 24576 image
   tokens), CFG, layer3d rope and additional_t_cond; ours through engine.pipelines.layered.denoise_layers (the
   CLI's loop), diffusers' QwenImageLayeredPipeline's two forwards per step;
3. ours under --vram 24GiB and 16GiB for both Layered sizes: the planner's plan for the job, the blocks it
   streams from pinned host memory, the budget enforced on torch's allocator.
Peak VRAM: torch's max_memory_allocated over a step, weights included: for diffusers every weight is on the
GPU; ours keeps the modulation Linears on the host (the table is computed once per edit, before the loop).
The weights are made on the GPU once and shared by all four models (same parameter names).
Run on the device machine:
    python -m benchmarks.bench_family --out family.json
"""
import argparse
import gc
import os
import time
from types import SimpleNamespace

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")   # as cli.py

import numpy as np
import torch

from benchmarks.bench_offload import SCHEDULER, enforce
from benchmarks.common import ceilings, diffusers_transformer, env_info, rel_l2, time_ms, write_json
from engine.config import MMDiTConfig, SchedulerConfig, VAEConfig
from engine.models.mmdit import MMDiT, modulation_table
from engine.models.text_encoder import TextConfig
from engine.models.vision import VisionConfig
from engine.vram.memory import GiB, Job, model_sizes_from_configs
from loaders import assign

LAYERED = MMDiTConfig(use_additional_t_cond=True, use_layer3d_rope=True)
LAYERS, STEPS = 4, 3
TEXT = {"t2i": [96, 6], "layered": [256, 6]}   # prompt and negative " " tokens after the template's drop
BUDGETS = (24, 16)


def flops(n_img, lens, cfg=MMDiTConfig()):
    d = cfg.dim
    return sum(cfg.num_layers * (24 * d * d * (n_img + L) + 4 * (n_img + L) ** 2 * d) for L in lens)


def text_inputs(lens, seed=1):
    g = torch.Generator("cuda").manual_seed(seed)
    L = max(lens)
    txt = torch.randn(len(lens), L, 3584, device="cuda", dtype=torch.bfloat16, generator=g)
    mask = (torch.arange(L, device="cuda")[None] < torch.tensor(lens, device="cuda")[:, None]).long()
    return txt, mask, torch.tensor(lens)


def peak_of(fn):
    """(result, peak GiB allocated while fn ran, weights included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() / GiB


# --- text to image -------------------------------------------------------------------------------------------

def t2i_case(ref, ours, size=1328):
    grid = (size // 16, size // 16)
    n = grid[0] * grid[1]
    lens = TEXT["t2i"]
    txt, mask, txt_len = text_inputs(lens)
    x = torch.randn(1, n, 64, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(2))
    t = torch.full((1,), 0.75, device="cuda", dtype=torch.bfloat16)
    shapes = [(1, *grid)]

    def ref_fwd(j):
        return ref(hidden_states=x, encoder_hidden_states=txt[j:j + 1, :lens[j]], encoder_hidden_states_mask=None,
                   timestep=t, img_shapes=[shapes], return_dict=False)[0]

    def ref_step():     # QwenImagePipeline: cond, then uncond, B=1 at its own length (all-ones mask: dropped)
        pos, neg = ref_fwd(0), ref_fwd(1)
        return neg + 4.0 * (pos - neg)

    rope = ours.rope(shapes, txt.shape[1], "cuda")
    mods = modulation_table(ours, t)[0]

    def ours_fwd():
        return ours(x.expand(2, -1, -1), txt, txt_len, t.expand(2), shapes, rope=rope, mods=mods)

    def ours_step():
        v = ours_fwd()
        return v[1:] + 4.0 * (v[:1] - v[1:])

    row = {"size": size, "image_tokens": n, "text_tokens": lens}
    with torch.inference_mode():
        for name, fn in (("diffusers", ref_step), ("ours", ours_step)):
            ms = time_ms(fn, warmup=1, reps=5)
            _, peak = peak_of(fn)
            row[name] = {"step_ms": ms, "peak_gib": peak, "tflops": flops(n, lens) / ms / 1e9}
        # the prompt row's velocity (the CFG combination amplifies bf16 rounding by up to |cfg| + |cfg - 1|)
        row["rel_l2"] = rel_l2(ours_fwd()[:1], ref_fwd(0))
    row["ratio"] = row["ours"]["step_ms"] / row["diffusers"]["step_ms"]
    return row


# --- Layered -------------------------------------------------------------------------------------------------

def layered_inputs(res, seed=3):
    lh = lw = res // 8
    n = (lh // 2) * (lw // 2)
    g = torch.Generator("cuda").manual_seed(seed)
    latents = torch.randn(1, (LAYERS + 1) * n, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    cond = torch.randn(1, n, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    shapes = [(1, lh // 2, lw // 2)] * (LAYERS + 2)
    return latents, cond, shapes, n


def schedule(n_cond):
    from engine import scheduler as sched
    sigmas = np.linspace(1.0, 0, STEPS + 1)[:-1]
    return sched.sigmas_for(SchedulerConfig.from_dict(SCHEDULER), STEPS, mu=(n_cond / 256) ** 0.5, sigmas=sigmas)


def ours_layered_steps(mm, res, plan=None, stream=None):
    """STEPS steps of the CLI's loop; per-step seconds (synchronised) and the peak over the steps."""
    from engine.pipelines.layered import denoise_layers
    latents, cond, shapes, n = layered_inputs(res)
    txt, _, txt_len = text_inputs(TEXT["layered"])
    sigmas, timesteps = schedule(n)
    models = SimpleNamespace(transformer=mm, device=torch.device("cuda"), dtype=torch.bfloat16, plan=plan)
    marks = []

    def progress(i):
        torch.cuda.synchronize()
        marks.append((time.perf_counter(), stream.bytes_copied if stream else 0))

    with torch.inference_mode():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        marks.append((time.perf_counter(), stream.bytes_copied if stream else 0))
        out = denoise_layers(models, latents, cond, txt, txt_len, shapes, sigmas, timesteps, 4.0, False, progress)
        torch.cuda.synchronize()
    # marks[0] -> marks[1] includes the modulation table (every block's img_mod/txt_mod visit once)
    return out, {"step_s": [b[0] - a[0] for a, b in zip(marks, marks[1:])],
                 "step_bytes": [b[1] - a[1] for a, b in zip(marks, marks[1:])],
                 "peak_gib": torch.cuda.max_memory_allocated() / GiB}


def diffusers_layered(ref, ours, res):
    """diffusers' step time and peak at `res`, and our prompt-row velocity against its own (one forward at
    sigma 1). Everything it makes is freed on return (no closure keeps the model alive)."""
    latents, cond, shapes, n = layered_inputs(res)
    lens = TEXT["layered"]
    txt, _, txt_len = text_inputs(lens)
    t = torch.full((1,), 1.0, device="cuda", dtype=torch.bfloat16)
    rgb = torch.zeros(1, dtype=torch.long, device="cuda")
    x = torch.cat([latents, cond], 1)

    def fwd(j):
        return ref(hidden_states=x, timestep=t, encoder_hidden_states=txt[j:j + 1, :lens[j]],
                   encoder_hidden_states_mask=None, img_shapes=[shapes], additional_t_cond=rgb,
                   return_dict=False)[0][:, :latents.shape[1]]

    def step():         # QwenImageLayeredPipeline: cond, then uncond, B=1 each
        pos, neg = fwd(0), fwd(1)
        return neg + 4.0 * (pos - neg)

    row = {"resolution": res, "image_tokens": (LAYERS + 2) * n}
    with torch.inference_mode():
        ms = time_ms(step, warmup=1, reps=3)
        _, peak = peak_of(step)
        row["diffusers"] = {"step_ms": ms, "peak_gib": peak,
                            "tflops": flops((LAYERS + 2) * n, lens) / ms / 1e9}
        v = ours(x.expand(2, -1, -1), txt, txt_len, t.expand(2), shapes,
                 additional_t_cond=rgb.expand(2))[:1, :latents.shape[1]]
        row["rel_l2_prompt_row"] = rel_l2(v, fwd(0))
    return row


def layered_sizes():
    return model_sizes_from_configs(LAYERED, (TextConfig(), VisionConfig()), VAEConfig(input_channels=4), 2)


def layered_job(res):
    return Job(res, res, res, res, batch=2, text_len=max(TEXT["layered"]), vl_tokens=0, frames=LAYERS + 1,
               steps=STEPS)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", default="t2i,layered,budgets")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    payload = {"env": env_info(), "ceilings": ceilings(), "layers": LAYERS, "text_tokens": TEXT,
               "t2i": {}, "layered": {}, "budgets": {}}
    ref = diffusers_transformer(LAYERED.num_layers, seed=0, dest="cuda", use_layer3d_rope=True,
                                use_additional_t_cond=True)
    state = dict(ref.state_dict())
    with torch.device("meta"):
        ours, ours_t2i = MMDiT(LAYERED), MMDiT(MMDiTConfig())
    ours = assign(ours, dict(state), "transformer").eval()
    if "t2i" in sections:
        ours_t2i = assign(ours_t2i, {k: v for k, v in state.items() if "addition_t" not in k}, "transformer").eval()
        ref_t2i = diffusers_transformer(LAYERED.num_layers, state=state)
        try:
            payload["t2i"] = t2i_case(ref_t2i, ours_t2i)
        except Exception as e:
            payload["t2i"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        del ref_t2i
        print("t2i", payload["t2i"], flush=True)
        write_json(args.out, payload)
    del ours_t2i
    for res in (640, 1024) if "layered" in sections else ():
        try:
            row = diffusers_layered(ref, ours, res)
        except Exception as e:
            row = {"resolution": res, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        payload["layered"][str(res)] = row
        print("layered", row, flush=True)
        write_json(args.out, payload)

    # ours alone from here: diffusers' model goes, the modulation Linears go to the host (as the CLI places them)
    del ref, state
    for blk in ours.transformer_blocks:
        blk.img_mod.to("cpu")
        blk.txt_mod.to("cpu")
    gc.collect()
    torch.cuda.empty_cache()
    payload["ours_weights_on_gpu_gib"] = torch.cuda.memory_allocated() / GiB   # no modulation Linears
    print(f"ours alone: {payload['ours_weights_on_gpu_gib']:.2f} GiB allocated", flush=True)
    for res in (640, 1024) if "layered" in sections else ():
        try:
            _, r = ours_layered_steps(ours, res)
            r["step_ms"] = 1000 * float(np.median(r["step_s"][1:]))
            r["tflops"] = flops(payload["layered"][str(res)].get("image_tokens", 0), TEXT["layered"]) / r["step_ms"] / 1e9
            payload["layered"][str(res)]["ours"] = r
            d = payload["layered"][str(res)].get("diffusers")
            if d:
                payload["layered"][str(res)]["ratio"] = r["step_ms"] / d["step_ms"]
        except Exception as e:
            payload["layered"][str(res)]["ours_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print("ours layered", res, payload["layered"][str(res)].get("ours"), flush=True)
    write_json(args.out, payload)

    if "budgets" in sections:
        from engine.vram.offload import move_except, stream_blocks
        from engine.vram.planner import plan
        sizes = layered_sizes()
        # back to the host first: as in the CLI, the resident blocks then come to a fresh GPU (evicting blocks
        # from a full one leaves the allocator's segments fragmented, which a budget counts)
        ours.to("cpu")
        gc.collect()
        torch.cuda.empty_cache()
        for res in (640, 1024):
            for gib in BUDGETS:
                key, row, handle = f"{res}@{gib}GiB", {"resolution": res, "budget_gib": gib}, None
                try:
                    p = plan(gib * GiB, layered_job(res), sizes)
                    row.update(plan=p.summary(), mmdit_resident=p.mmdit_resident, cfg_split=p.cfg_split,
                               predicted_denoise_gib=p.peaks["denoise"] / GiB,
                               predicted_streamed_gb_per_step=p.streamed_per_step / 1e9)
                    handle = stream_blocks(ours.transformer_blocks, "cuda", p.mmdit_resident)
                    move_except(ours, "cuda", ours.transformer_blocks)
                    gc.collect()
                    torch.cuda.empty_cache()
                    row["outside_allocator_gib"] = enforce(gib * GiB) / GiB
                    _, r = ours_layered_steps(ours, res, plan=p, stream=handle)
                    r["step_ms"] = 1000 * float(np.median(r["step_s"][1:]))
                    row["ours"] = r
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                finally:
                    torch.cuda.set_per_process_memory_fraction(1.0)
                    if handle is not None:
                        handle.remove()
                    gc.collect()
                    torch.cuda.empty_cache()
                payload["budgets"][key] = row
                print("budget", key, {k: v for k, v in row.items() if k != "plan"}, flush=True)
                write_json(args.out, payload)

    peak = payload["ceilings"]["matmul_tflops"]
    print(f"\n{payload['env']['gpu']}  torch {payload['env']['torch']}  matmul ceiling {peak:.0f} TFLOP/s")
    r = payload["t2i"]
    if "ours" in r:
        print(f"t2i 1328²: diffusers {r['diffusers']['step_ms']:.0f} ms/step ({r['diffusers']['peak_gib']:.1f} GiB), "
              f"ours {r['ours']['step_ms']:.0f} ms/step = x{r['ratio']:.3f}, rel L2 {r['rel_l2']:.2e}")
    for res, r in payload["layered"].items():
        if "ours" in r and "diffusers" in r:
            print(f"Layered {res} x{LAYERS}: diffusers {r['diffusers']['step_ms']:.0f} ms/step "
                  f"{r['diffusers']['peak_gib']:.1f} GiB | ours {r['ours']['step_ms']:.0f} ms/step "
                  f"{r['ours']['peak_gib']:.1f} GiB = x{r['ratio']:.3f} | rel L2 {r.get('rel_l2_prompt_row', 0):.2e}")
        else:
            print("Layered", res, r)
    for key, r in payload["budgets"].items():
        if "ours" in r:
            print(f"Layered {key}: ours {r['ours']['step_ms']:.0f} ms/step, peak {r['ours']['peak_gib']:.1f} GiB, "
                  f"{r['mmdit_resident']} blocks resident, cfg {r['cfg_split']}, "
                  f"streamed {r['ours']['step_bytes'][-1] / 1e9:.1f} GB/step")
        else:
            print("Layered", key, r)


if __name__ == "__main__":
    main()
