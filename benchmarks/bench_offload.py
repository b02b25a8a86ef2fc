"""Whole edits under a VRAM budget on full-size random weights, and diffusers' group offloading beside them.

Two parts, run one after the other as separate processes (each builds its own random bf16 weights; 128 GiB
of host RAM holds one set at a time):
    python -m benchmarks.bench_offload ours --out ours.json --tokenizer DIR
    python -m benchmarks.bench_offload diffusers --out ref.json [--text-lengths 1246,1233]
ours: text encoder, VAE encode, denoising with CFG and VAE decode through engine.pipelines.common, with the plan the
planner makes for each budget; the budget is enforced with torch.cuda.set_per_process_memory_fraction
(minus what the process holds outside torch's allocator), so going over fails instead of passing quietly.
Per stage: time and peak VRAM; per step: time and bytes streamed. Also the host-to-device bandwidth, and
the 4096x3072 VAE decode tiled under 2 GiB.
diffusers: QwenImageTransformer2DModel's forward under apply_group_offloading(block_level, one block per
group, use_stream=True) at the text lengths ours saw, and AutoencoderKLQwenImage's 4096x3072 decode tiled
and untiled.
"""
import argparse
import gc
import json
import os
import resource
import time
import traceback

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")   # as cli.py

import numpy as np
import torch
from PIL import Image

from benchmarks.common import diffusers_transformer, env_info, random_state, time_ms, write_json
from engine.config import MMDiTConfig, RunOptions, SchedulerConfig, VAEConfig
from engine.models.mmdit import MMDiT
from engine.vram.memory import GiB, Job, activation_bytes, model_sizes_from_configs
from engine.vram.planner import plan, smallest_budget
from engine.models.text_encoder import TextConfig, TextEncoder
from engine.models.vae import QwenImageVAE
from engine.models.vision import VisionConfig
from loaders import assign

SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                 max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False,
                 time_shift_type="exponential", use_beta_sigmas=False, use_dynamic_shifting=True,
                 use_exponential_sigmas=False, use_karras_sigmas=False)   # Qwen-Image-Edit's scheduler_config
JOBS = {"1024": (1024, 1024, 3), "4k": (4096, 3072, 2)}   # output width, height, steps (1 MP condition image)
PROMPT, NEGATIVE = "put a red hat on the cat and make the background a snowy street", " "


def build_ours(cfgs, seed=0, device="cuda"):
    """Our MMDiT, text encoder and VAE in the given configs with random bf16 weights, on the host."""
    mcfg, (tcfg, vcfg), vae_cfg = cfgs
    with torch.device("meta"):
        mm, te, vae = MMDiT(mcfg), TextEncoder(tcfg, vcfg), QwenImageVAE(vae_cfg)
    out = []
    for i, (m, where) in enumerate([(mm, "transformer"), (te, "text_encoder"), (vae, "vae")]):
        out.append(assign(m, random_state(m, seed + i, device), where).eval())
        gc.collect()
    return out


def test_image(size=1024, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    a = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 127 // size], -1)
    a = (a + rng.integers(0, 32, a.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(a)


def _cuda_outside_allocator():
    """Bytes the process holds on the GPU outside torch's caching allocator (context, modules)."""
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def enforce(budget):
    """Limit torch's allocator so that it plus what the process holds outside it stays within `budget`."""
    total = torch.cuda.get_device_properties(0).total_memory
    outside = _cuda_outside_allocator()
    torch.cuda.set_per_process_memory_fraction(max(budget - outside, 0) / total)
    return outside


def h2d_bandwidth(nbytes=1 << 30, reps=10):
    """GB/s of one host->device copy from registered (pinned) host memory, the way the streamer copies."""
    from engine.vram.offload import _host_buffer, _unregister
    host, ptr = _host_buffer(nbytes, pin=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ms = time_ms(lambda: dev.copy_(host, non_blocking=True), warmup=2, reps=reps)
    if ptr is not None:
        _unregister(ptr, host)
    return nbytes / ms / 1e6


def _release(models, *modules):
    """Back to a clean GPU: the transformer's stream removed, every weight on the host (also after a
    failed run: place_models removes its own stream when it fails)."""
    if models is not None and models.stream is not None:
        models.stream.remove()
    for m in modules:
        m.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_edit(name, budget, mode, job_key, mm, te, vae, processor, sizes, device="cuda"):
    """One whole edit under `budget` (None: no budget, everything resident). Returns a result row."""
    from engine.pipelines.common import edit, place_models, run_text_encoder
    w, h, steps = JOBS[job_key]
    image = test_image()
    job = Job(w, h, 1024, 1024, batch=2, steps=steps)
    cuda = device == "cuda"
    row = {"job": job_key, "width": w, "height": h, "steps": steps, "mode": mode}
    p = plan(budget, job, sizes, mode) if budget is not None else None
    if p is not None:
        row.update(budget_gib=budget / GiB, plan=p.summary(), mmdit_resident=p.mmdit_resident,
                   te_resident=p.te_resident, vision_resident=p.vision_resident, encode_tile=p.encode_tile,
                   decode_tile=p.decode_tile, cfg_split=p.cfg_split,
                   predicted_gib={k: v / GiB for k, v in p.peaks.items()},
                   predicted_streamed_gb_per_step=p.streamed_per_step / 1e9)
        print(p.summary(), flush=True)
    models = None
    try:
        if cuda:
            torch.cuda.empty_cache()
            row["outside_allocator_gib"] = (enforce(budget) if budget is not None else _cuda_outside_allocator()) / GiB
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        if p is None:
            te.to(device)
        rows = run_text_encoder(processor, te, [(image, [PROMPT, NEGATIVE])], device, plan=p)[0]
        te.to("cpu")
        if cuda:
            torch.cuda.empty_cache()
            row["text_peak_gib"] = torch.cuda.max_memory_allocated() / GiB
            row["text_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
            torch.cuda.reset_peak_memory_stats()
        row["text_s"] = time.perf_counter() - t0
        row["text_lengths"] = [r[0].shape[1] for r in rows]
        t0 = time.perf_counter()
        models = place_models(mm, vae, SchedulerConfig.from_dict(SCHEDULER), device, torch.bfloat16, p)
        row["place_s"] = time.perf_counter() - t0
        marks = []

        def progress(i):
            if cuda:
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), models.stream.bytes_copied if models.stream else 0))

        opts = RunOptions(steps=steps, cfg=4.0, seed=0, width=w, height=h)
        t0 = time.perf_counter()
        edit(models, image, rows[0][0], rows[0][1], rows[1][0], rows[1][1], opts, progress=progress)
        row["edit_s"] = time.perf_counter() - t0
        row["stage_s"] = dict(models.timings)
        row["stage_peak_gib"] = {k: a / GiB for k, (a, _) in models.peaks.items()}
        row["stage_peak_reserved_gib"] = {k: r / GiB for k, (_, r) in models.peaks.items()}
        row["step_s"] = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
        row["step_bytes"] = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
        row["ok"] = True
    except torch.cuda.OutOfMemoryError as e:
        traceback.print_exc()
        row.update(ok=False, error="out of memory: " + str(e).splitlines()[0][:300])
    except Exception as e:   # record and go on to the next run
        traceback.print_exc()
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        _release(models, mm, vae, te)
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
    row["host_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    print(name, json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)
    return row


def vae_decode_ours(vae, budget=2 * GiB, hw=(384, 512)):
    """Our 4096x3072 decode, tiled with the largest tile whose estimated peak (weights + activations, 5%
    margin) fits `budget`, with torch's allocator capped at `budget` (peak allocated, as diffusers' figure
    is counted; the CUDA context is not in it); and untiled, uncapped."""
    from engine.vram.planner import VAE_TILES, MARGIN_FRACTION
    weights = sum(p.numel() * 2 for p in vae.parameters())
    tile = next(t for t in VAE_TILES[1:]
                if (weights + activation_bytes(vae.cfg, *hw, t, torch.bfloat16)) * (1 + MARGIN_FRACTION) <= budget)
    vae.to("cuda")
    z = torch.randn(1, vae.cfg.z_dim, *hw, device="cuda", dtype=torch.bfloat16)
    total = torch.cuda.get_device_properties(0).total_memory
    out = {}
    with torch.inference_mode():
        for name, t, limit in [("ours_tiled", tile, budget), ("ours_untiled", None, None)]:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            if limit is not None:
                torch.cuda.set_per_process_memory_fraction(limit / total)
            try:
                ms = time_ms(lambda: vae.decode(z, tile=t), warmup=1, reps=3)
                out[name] = {"ms": ms, "tile": t, "budget_gib": None if limit is None else limit / GiB,
                             "peak_gib": torch.cuda.max_memory_allocated() / GiB,
                             "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB}
            except torch.cuda.OutOfMemoryError as e:
                traceback.print_exc()
                out[name] = {"tile": t, "error": "out of memory: " + str(e).splitlines()[0][:200]}
            torch.cuda.set_per_process_memory_fraction(1.0)
            print(name, out[name], flush=True)
    vae.to("cpu")
    torch.cuda.empty_cache()
    return out


def main_ours(args):
    from engine.text.processor import Processor
    cfgs = (MMDiTConfig(), (TextConfig(), VisionConfig()), VAEConfig())
    sizes = model_sizes_from_configs(cfgs[0], cfgs[1], cfgs[2], 2)
    payload = {"env": env_info(), "h2d_gbs": h2d_bandwidth(), "runs": {}}
    print("H2D GB/s", payload["h2d_gbs"], flush=True)
    t0 = time.perf_counter()
    mm, te, vae = build_ours(cfgs)
    payload["build_s"] = time.perf_counter() - t0
    payload["weights_gib"] = {n: sum(p.numel() * 2 for p in m.parameters()) / GiB
                              for n, m in [("transformer", mm), ("text_encoder", te), ("vae", vae)]}
    processor = Processor.load_folders(args.tokenizer, args.tokenizer)
    payload["vae_decode_4096x3072"] = vae_decode_ours(vae)
    write_json(args.out, payload)
    smallest = {k: smallest_budget(Job(w, h, 1024, 1024, batch=2, steps=s), sizes, "stream")
                for k, (w, h, s) in JOBS.items()}
    payload["smallest_budget_gib"] = {k: v / GiB for k, v in smallest.items()}
    for spec in args.runs.split(","):
        job_key, what = spec.split(":")
        if what == "resident":
            budget, mode = None, None
        elif what == "min":
            budget, mode = smallest[job_key], "stream"
        else:
            budget, mode = int(float(what) * GiB), "auto"
        payload["runs"][spec] = run_edit(spec, budget, mode, job_key, mm, te, vae, processor, sizes)
        write_json(args.out, payload)
    print_ours(payload)


def print_ours(payload):
    print(f"\n{payload['env']['gpu']}  H2D {payload['h2d_gbs']:.1f} GB/s")
    for spec, r in payload["runs"].items():
        if not r.get("ok"):
            print(f"{spec:12s} FAILED {r.get('error')}")
            continue
        peak = max([r["text_peak_gib"]] + list(r["stage_peak_gib"].values()))
        print(f"{spec:12s} step {1000 * r['step_s'][-1]:8.1f} ms  {r['step_bytes'][-1] / 1e9:5.1f} GB/step  "
              f"peak alloc {peak:5.2f} GiB  edit {r['edit_s']:6.1f} s  text {r['text_s']:5.1f} s")


# ---- diffusers ---------------------------------------------------------------------------------------

def diffusers_forward(ref, batch, grid, lens, seed=1):
    (h, w), (hc, wc) = grid, (64, 64)
    g = torch.Generator("cuda").manual_seed(seed)
    N, L = h * w + hc * wc, max(lens)
    x = torch.randn(batch, N, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    txt = torch.randn(batch, L, 3584, device="cuda", dtype=torch.bfloat16, generator=g)
    mask = (torch.arange(L, device="cuda")[None] < torch.tensor(lens[:batch], device="cuda")[:, None]).long()
    mask = None if bool(mask.all()) else mask
    t = torch.full((batch,), 0.5, device="cuda", dtype=torch.bfloat16)
    return lambda: ref(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=mask, timestep=t,
                       img_shapes=[[(1, h, w), (1, hc, wc)]] * batch, return_dict=False)[0]


def main_diffusers(args):
    from diffusers import AutoencoderKLQwenImage
    from diffusers.hooks import apply_group_offloading
    lens = [int(v) for v in args.text_lengths.split(",")]
    payload = {"env": env_info(), "forward": {}, "vae_decode_4096x3072": {}}
    with torch.device("meta"):
        vae = AutoencoderKLQwenImage()
    vae.load_state_dict(random_state(vae, 7, dest="cuda"), strict=False, assign=True)
    vae.eval()
    z = torch.randn(1, 16, 1, 384, 512, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for name, tiled in [("diffusers_tiled", True), ("diffusers_untiled", False)]:
            vae.use_tiling = tiled
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                ms = time_ms(lambda: vae.decode(z, return_dict=False)[0], warmup=1, reps=3)
                payload["vae_decode_4096x3072"][name] = {"ms": ms, "peak_gib": torch.cuda.max_memory_allocated() / GiB}
            except torch.cuda.OutOfMemoryError as e:
                payload["vae_decode_4096x3072"][name] = {"error": "out of memory: " + str(e).splitlines()[0][:200]}
            print(name, payload["vae_decode_4096x3072"][name], flush=True)
    del vae, z
    torch.cuda.empty_cache()
    write_json(args.out, payload)
    t0 = time.perf_counter()
    # pinned already: the group offloader's pin_memory() then keeps these instead of making a second copy
    ref = diffusers_transformer(pin=True)
    apply_group_offloading(ref, onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    payload["setup_s"] = time.perf_counter() - t0
    cases = {"1024_b1": (1, (64, 64), "1024"), "1024_b2": (2, (64, 64), "1024"), "4k_b1": (1, (192, 256), "4k")}
    with torch.inference_mode():
        for case, (batch, grid, job) in cases.items():
            row_lens = lens
            fn = diffusers_forward(ref, batch, grid, row_lens)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            ms = time_ms(fn, warmup=1, reps=2 if job == "4k" else 4)
            payload["forward"][case] = {"ms": ms, "text_lengths": row_lens[:batch],
                                        "peak_gib": torch.cuda.max_memory_allocated() / GiB,
                                        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB}
            print(case, payload["forward"][case], flush=True)
            write_json(args.out, payload)
    payload["host_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    write_json(args.out, payload)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["ours", "diffusers"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", help="folder with the Qwen tokenizer.json (ours)")
    ap.add_argument("--text-lengths", default="1246,1233",
                    help="diffusers: text tokens of the cond and uncond rows (what ours' processor made of "
                         "PROMPT and NEGATIVE with the test image: ours.json's text_lengths)")
    ap.add_argument("--runs", default="1024:16,1024:min,4k:16,4k:min,1024:resident,4k:resident,4k:6",
                    help="job:budget list; budget = GiB, 'min' (the planner's smallest) or 'resident'")
    args = ap.parse_args()
    (main_ours if args.part == "ours" else main_diffusers)(args)


if __name__ == "__main__":
    main()
