"""The full-size MMDiT forward with fp8 weights (issue 11's table), every variant in one process on the same
random weights:
    diffusers bf16 eager, ours bf16, ours fp8 (block Linears e4m3 with per-channel scales, fp8 GEMMs fed by our
    fused quantizing kernels), ours fp8 with the fp8 attention kernel, diffusers bf16
    compile_repeated_blocks(fullgraph=True), diffusers + torchao Float8DynamicActivationFloat8WeightConfig(PerRow)
    compiled (the weights quantized in place last: it rewrites diffusers' Linears).
Cases: 1024² B=1 and B=2 (CFG rows of 360 and 300 text tokens) and 4K B=1 (benchmarks.bench_e2e's shapes); the
compiled variants at 1024² only (a compile per shape costs minutes). Also: rel L2 of ours-fp8 vs ours-bf16 and
torchao-fp8 vs diffusers-bf16 (same inputs, same weights), the fp8 model's resident VRAM at 1024² B=2, and where
ours-fp8's forward time goes (kernel categories), the input of an RTX 4090 projection; CUDA-graph
replays of ours (no host gaps) and the host-side op profile unless --no-graph.
Run on the device machine (torchao carried as a wheel):
    python -m benchmarks.bench_fp8_forward --out fp8.json [--cases 1024_b1,1024_b2,4k_b1] [--compiled 1024_b1,1024_b2]
"""
import argparse
import gc
import os
import time
import traceback

import torch

from benchmarks.bench_e2e import FULL, build_reference, flops, inputs, kernel_breakdown
from benchmarks.common import ceilings, env_info, fp8_ceiling, rel_l2, time_ms, write_json
from engine.models.mmdit import MMDiT, modulation_table
from loaders import assign


def ours_models(ref):
    """(ours bf16, ours fp8): both built on the meta device and given ref's tensors (no copy); the fp8 one then
    has its block Linears quantized on the GPU (new fp8 tensors: 13.6 GB), its other weights still shared."""
    from engine.transforms.fp8 import quantize_fp8
    with torch.device("meta"):
        bf16, fp8 = MMDiT(FULL), MMDiT(FULL)
    state = dict(ref.state_dict())
    bf16 = assign(bf16, dict(state), "transformer").eval()
    fp8 = assign(fp8, dict(state), "transformer").eval()
    t0 = time.perf_counter()
    n = quantize_fp8(fp8, compute_device="cuda")
    torch.cuda.synchronize()
    return bf16, fp8, {"layers": n, "quantize_s": time.perf_counter() - t0}


def case_fns(case, ref, bf16, fp8):
    """Forward closures (diffusers, ours bf16, ours fp8) on the case's inputs; bf16 None: diffusers' only."""
    x, txt, mask, t, shapes, lens = inputs(case)
    B = x.shape[0]
    dmask = None if bool(mask.all()) else mask           # the pipeline drops an all-ones mask
    ref_fn = lambda: ref(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=dmask,
                         timestep=t, img_shapes=[shapes] * B, return_dict=False)[0]
    if bf16 is None:
        return ref_fn, None, None
    lens = lens.pin_memory()                             # its copy to the GPU can be captured (graphed)
    rope = bf16.rope(shapes, txt.shape[1], "cuda")
    mods = modulation_table(bf16, t[:1])[0]              # the same table serves both: modulation stays bf16
    ours = lambda m: (lambda: m(x, txt, lens, t, shapes, rope=rope, mods=mods))
    return ref_fn, ours(bf16), ours(fp8)


def graphed(fn):
    """fn replayed from a CUDA graph captured after two warm-up calls on a side stream (the forward's launches
    recorded once): what the forward costs with no host work between kernels."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return lambda: (graph.replay(), out)[1]


def host_profile(fn, top=20):
    """The CPU side of one fn() call: the ops with the most self CPU time (us, calls), and the wall time."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return {"wall_ms": 1000 * (time.perf_counter() - t0),
            "ops": [[e.key, round(e.self_cpu_time_total), e.count] for e in rows]}


def time_row(fn, case, warmup=1):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = time_ms(fn, warmup=warmup, reps=3 if case.startswith("4k") else 7)
    return {"ms": ms, "tflops": flops(case) / ms / 1e9,
            "activation_peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}


def with_env(name, value, fn):
    """fn() with environment variable `name` set to `value` (None: unset), restored after."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="1024_b1,1024_b2,4k_b1")
    ap.add_argument("--compiled", default="1024_b1,1024_b2")
    ap.add_argument("--no-torchao", action="store_true")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph rows and the host profiles")
    ap.add_argument("--diffusers-only", action="store_true",
                    help="only diffusers: eager (the baseline), compiled and torchao fp8 compiled")
    args = ap.parse_args()
    cases = args.cases.split(",")
    payload = {"env": env_info(), "ceilings": {**ceilings(), "fp8_rowwise_tflops": fp8_ceiling()}, "cases": {}}
    ref = build_reference()
    outputs = {}
    if args.diffusers_only:
        for case in cases:
            ref_fn = case_fns(case, ref, None, None)[0]
            with torch.inference_mode():
                payload["cases"][case] = {"diffusers": time_row(ref_fn, case)}
                outputs[case] = ref_fn().float().cpu()
            print(case, payload["cases"][case], flush=True)
        compiled_rows(args, payload, ref, cases, outputs)
        return
    bf16, fp8, payload["quantize"] = ours_models(ref)
    from engine.transforms.fp8 import fp8_summary
    n, fp8_bytes, wide = fp8_summary(fp8)
    payload["fp8_layers"] = {"count": n, "gib": fp8_bytes / 2**30, "bf16_gib": wide / 2**30}
    for case in cases:
        rows = payload["cases"].setdefault(case, {})
        try:
            ref_fn, bf16_fn, fp8_fn = case_fns(case, ref, bf16, fp8)
            with torch.inference_mode():
                rows["diffusers"] = time_row(ref_fn, case)
                rows["ours_bf16"] = time_row(bf16_fn, case)
                rows["ours_fp8"] = time_row(fp8_fn, case)
                rows["ours_fp8_attention_fp8"] = with_env("QIE_ATTN_FP8", "1", lambda: time_row(fp8_fn, case))
                for name, fn in () if args.no_graph else (("ours_bf16_graph", bf16_fn), ("ours_fp8_graph", fp8_fn)):
                    try:   # the same forward without host gaps: is the eager one waiting on Python?
                        rows[name] = time_row(graphed(fn), case)
                    except Exception as e:
                        rows[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    torch.cuda.synchronize()
                want, got_bf16, got_fp8 = ref_fn().float(), bf16_fn().float(), fp8_fn().float()
                got_fp8_attn = with_env("QIE_ATTN_FP8", "1", lambda: fp8_fn().float())
                rows["rel_l2"] = {"ours_bf16_vs_diffusers": rel_l2(got_bf16, want),
                                  "ours_fp8_vs_ours_bf16": rel_l2(got_fp8, got_bf16),
                                  "ours_fp8_attn_fp8_vs_ours_bf16": rel_l2(got_fp8_attn, got_bf16)}
                outputs[case] = want.cpu()
                if case.startswith("1024"):
                    rows["profile_ours_fp8"] = kernel_breakdown(fp8_fn)
                    rows["profile_ours_bf16"] = kernel_breakdown(bf16_fn)
                    if not args.no_graph:
                        rows["host_ours_fp8"] = host_profile(fp8_fn)
                        rows["host_ours_bf16"] = host_profile(bf16_fn)
            for k in [k for k in rows if k.startswith("ours_") and isinstance(rows[k], dict) and "ms" in rows[k]]:
                rows[k]["vs_diffusers"] = rows[k]["ms"] / rows["diffusers"]["ms"]
        except Exception as e:
            traceback.print_exc()
            rows["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        write_json(args.out, payload)
        print(case, {k: v for k, v in rows.items() if not k.startswith(("profile", "host"))}, flush=True)

    # what a resident 1024² fp8 edit holds: the fp8 model's own weights (its tensors, counted once; the
    # modulation Linears excluded: precomputed, then on the host) plus the forward's measured activation peak
    try:
        seen, weights = set(), 0
        for name, t in fp8.state_dict().items():
            if ".img_mod." in name or ".txt_mod." in name or t.untyped_storage().data_ptr() in seen:
                continue
            seen.add(t.untyped_storage().data_ptr())
            weights += t.untyped_storage().nbytes()
        act = payload["cases"].get("1024_b2", {}).get("ours_fp8", {}).get("activation_peak_gib")
        payload["fp8_resident_1024_b2"] = {"weights_gib": weights / 2**30, "activation_peak_gib": act,
                                           "peak_gib": None if act is None else weights / 2**30 + act}
    except Exception as e:
        traceback.print_exc()
        payload["fp8_resident_1024_b2"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    write_json(args.out, payload)
    print("fp8 resident", payload["fp8_resident_1024_b2"], flush=True)
    del bf16, fp8
    gc.collect()
    torch.cuda.empty_cache()
    compiled_rows(args, payload, ref, cases, outputs)


def compiled_rows(args, payload, ref, cases, outputs):
    """diffusers compile_repeated_blocks(fullgraph=True), then torchao fp8 rowwise compiled, on the cases asked."""
    compiled = [c for c in args.compiled.split(",") if c in cases and "error" not in payload["cases"][c]]
    if compiled:
        try:
            ref.compile_repeated_blocks(fullgraph=True)
            for case in compiled:
                fn = case_fns(case, ref, None, None)[0]
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    compile_s = time.perf_counter() - t0
                    payload["cases"][case]["diffusers_compiled"] = {**time_row(fn, case, warmup=2),
                                                                    "first_call_s": compile_s}
                write_json(args.out, payload)
                print(case, "compiled", payload["cases"][case]["diffusers_compiled"], flush=True)
        except Exception as e:
            traceback.print_exc()
            payload["compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if compiled and not args.no_torchao:
        try:
            import torchao
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
            payload["torchao"] = torchao.__version__
            quantize_(ref.transformer_blocks, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
            for case in compiled:
                fn = case_fns(case, ref, None, None)[0]
                with torch.inference_mode():
                    row = time_row(fn, case, warmup=2)
                    row["rel_l2_vs_diffusers_bf16"] = rel_l2(fn().float().cpu(), outputs[case])
                payload["cases"][case]["torchao_fp8_compiled"] = row
                write_json(args.out, payload)
                print(case, "torchao", row, flush=True)
        except Exception as e:
            traceback.print_exc()
            payload["torchao_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    write_json(args.out, payload)
    print_table(payload)


def print_table(payload):
    c = payload["ceilings"]
    print(f"\n{payload['env']['gpu']}  bf16 {c['matmul_tflops']:.0f}  fp8 {c['fp8_rowwise_tflops']:.0f} TFLOP/s")
    for case, rows in payload["cases"].items():
        if "diffusers" not in rows:
            print(case, rows.get("error"))
            continue
        base = rows["diffusers"]["ms"]
        for name, r in list(rows.items()):
            if isinstance(r, dict) and isinstance(r.get("ms"), float):
                print(f"{case:8s} {name:24s} {r['ms']:8.1f} ms  x{r['ms'] / base:.3f}  {r['tflops']:5.0f} TFLOP/s")
        for name in ("ours_bf16", "ours_fp8"):
            prof = rows.get(f"profile_{name}")
            if prof and name in rows:
                print(f"{case:8s} {name}: kernels {prof['kernel_ms']:.1f} ms of {rows[name]['ms']:.1f} ms wall "
                      f"({sum(prof['launches'].values())} launches) {dict((k, round(v, 1)) for k, v in prof['ms'].items())}")
        print(f"{case:8s} rel L2 {rows.get('rel_l2')}  torchao vs bf16 "
              f"{rows.get('torchao_fp8_compiled', {}).get('rel_l2_vs_diffusers_bf16')}")
    print("fp8 resident 1024² B=2:", payload.get("fp8_resident_1024_b2"))


if __name__ == "__main__":
    main()
