"""RESULTS.md sections for the MMDiT forward (bench_e2e) and the kernels (bench_kernels); used by report.py."""

PROVIDER_NOTES = {
    "ours": "the engine as it runs: ops.attention timed our kernel against cuDNN once per size and kept the faster",
    "ours_triton_attention": "the same with attention held on our Triton kernel (QIE_ATTENTION=triton)",
    "ours_torch_ops": "every fused op on its float32 torch reference (the correctness path, not a baseline)",
}


def e2e_section(name, d):
    env, ceil = d["env"], d["ceilings"]
    peak = ceil["matmul_tflops"]
    out = [f"### Full-size MMDiT forward — `{name}`", "",
           f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. Ceilings measured in the "
           f"same run: bf16 matmul {peak:.0f} TFLOP/s, HBM copy {ceil['copy_gbs']:.0f} GB/s. Random bf16 weights "
           f"({d['weights_gib']:.1f} GiB) shared by both models; 1024² edit = 4096 noisy + 4096 condition + 360 "
           "text tokens (B=2: second row 300 text tokens, padded); 4K = 49152 + 4096 + 360. "
           + " ".join(f"`{k}`: {v}." for k, v in PROVIDER_NOTES.items()), "",
           "| case | provider | ms | TFLOP/s | % of matmul peak | × diffusers eager | × diffusers compiled | peak GiB |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for case, rows in d["cases"].items():
        eager = rows["diffusers"]["ms"]
        comp = rows.get("diffusers_compiled", {}).get("ms")
        for prov, r in rows.items():
            if not isinstance(r, dict):
                continue
            c = f"{r['ms'] / comp:.3f}" if comp else "—"
            out.append(f"| {case} | {prov} | {r['ms']:.1f} | {r['tflops']:.0f} | {100 * r['tflops'] / peak:.1f}% | "
                       f"{r['ms'] / eager:.3f} | {c} | {r['peak_gib']:.1f} |")
    errs = ", ".join(f"{case} {rows['ours_vs_diffusers_rel_l2']:.2e}" for case, rows in d["cases"].items())
    out += ["", f"Relative L2 distance of our velocity to diffusers' (both bf16, all 60 blocks): {errs}.",
            f"Modulation weights (img_mod/txt_mod) that the precompute lets a run drop: "
            f"{d['modulation_weights_gib']:.2f} GiB."]
    if d.get("attention_backends"):
        picks = "; ".join(f"{k.split('|', 4)[-1]} → {v}" for k, v in d["attention_backends"].items())
        out.append(f"Attention backend ops.attention chose in this run: {picks}.")
    return out + [""] + _profile(d)


def _profile(d):
    prof = d.get("profile")
    if not prof:
        return []
    out = ["Where the time goes (torch.profiler, one eager forward each, CUDA kernel time by category; gaps = "
           "wall time not covered by any kernel; `ours` ran the attention backend chosen above):", "",
           "| case | provider | wall ms | GEMM ms (TFLOP/s) | attention ms (TFLOP/s) | our fused norm/modulate/residual "
           "+ q/k norm-RoPE ms | other kernels ms | gaps ms |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for case, provs in prof.items():
        for prov, r in provs.items():
            ms = r["ms"]
            fused = ms.get("norm_modulate_residual", 0.0) + ms.get("qk_norm_rope", 0.0)
            out.append(f"| {case} | {prov} | {r['wall_ms']:.1f} | {ms.get('gemm', 0):.1f} ({r['gemm_tflops']:.0f}) | "
                       f"{ms.get('attention', 0):.1f} ({r['attention_tflops']:.0f}) | {fused:.1f} | "
                       f"{ms.get('other', 0):.1f} | {r['gap_ms']:.1f} |")
    out += ["", "GEMM + attention kernel time alone, against diffusers' eager forward in the same run (what no "
            "amount of fusing the rest can go below, with these GEMMs and this attention):", ""]
    for case, provs in prof.items():
        if "ours" in provs and case in d["cases"]:
            o, eager = provs["ours"]["ms"], d["cases"][case]["diffusers"]["ms"]
            floor = o.get("gemm", 0) + o.get("attention", 0)
            out.append(f"- {case}: {floor:.1f} ms = {floor / eager:.3f}× diffusers eager ({eager:.1f} ms)")
    return out + [""]


def readme_table(d):
    """The short table README.md carries (between its RESULTS markers)."""
    peak = d["ceilings"]["matmul_tflops"]
    env = d["env"]
    rows = [f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; bf16 matmul ceiling "
            f"{peak:.0f} TFLOP/s measured in the same run. Full-size MMDiT forward, random weights:", "",
            "| case | diffusers eager | diffusers compiled | ours | ours / eager | ours / compiled | ours TFLOP/s | "
            "ours, Triton attention only |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for case, r in d["cases"].items():
        e, o = r["diffusers"]["ms"], r["ours"]["ms"]
        c = r.get("diffusers_compiled", {}).get("ms")
        t = r.get("ours_triton_attention", {}).get("ms")
        rows.append(f"| {case} | {e:.0f} ms | {f'{c:.0f} ms' if c else '—'} | {o:.0f} ms | {o / e:.2f} | "
                    f"{f'{o / c:.2f}' if c else '—'} | {r['ours']['tflops']:.0f} ({100 * r['ours']['tflops'] / peak:.0f}%) | "
                    f"{f'{t:.0f} ms ({t / e:.2f})' if t else '—'} |")
    return rows


def readme_attention(d):
    """Attention summary for README: ours vs cuDNN (unmasked) and vs the masked SDPA path."""
    by = {(r["S"], r["masked"], r["provider"]): r for r in d["rows"] if r["op"] == "attention" and "ms" in r}
    peak = d["ceilings"]["matmul_bf16_tflops"]
    out = ["", f"Attention kernel, B1 H24 D128 bf16 ({d['gpu']}, {d['date'][:10]}; matmul ceiling {peak:.0f} TFLOP/s):",
           "", "| S | ours TFLOP/s | cuDNN time / ours | ours masked TFLOP/s | masked SDPA time / ours |",
           "|---:|---:|---:|---:|---:|"]
    for S in sorted({k[0] for k in by}):
        o, c = by[(S, False, "ours")], by[(S, False, "sdpa_cudnn")]
        om, sm = by[(S, True, "ours")], by[(S, True, "sdpa_masked")]
        out.append(f"| {S} | {o['tflops']:.0f} | {c['ms'] / o['ms']:.2f} | {om['tflops']:.0f} | {sm['ms'] / om['ms']:.2f} |")
    return out


MEMORY_OPS = ("copy_same_size", "norm_modulate", "gated_residual", "gated_residual_norm_modulate", "rms_norm_rope")


def kernels_section(name, d, memory=None):
    """Attention vs SDPA backends, the block's GEMMs, memory-bound kernels (from `memory` = (name, data) of a
    later memory-only run when given), block-shape sweeps."""
    c = d["ceilings"]
    mm = c["matmul_bf16_tflops"]
    out = [f"### Kernels — `{name}`", "",
           f"{d['gpu']}, torch {d['torch']}, triton {d['triton']}, {d['date']}. Ceilings measured in the same run: "
           f"bf16 matmul {mm:.0f} TFLOP/s, HBM copy {c['copy_gbs']:.0f} GB/s.", "",
           "Attention, B=1, H=24, D=128, bf16 (`mask`: the last 200 keys are padding text). Each provider timed "
           "three times, interleaved with the others; the median counts:", "",
           "| S | keys | provider | ms | TFLOP/s | % of matmul peak | provider time / ours |", "|---:|---|---|---:|---:|---:|---:|"]
    for r in d["rows"]:
        if r["op"] == "attention" and "ms" in r:
            sp = f"{r['ours_speedup']:.2f}" if "ours_speedup" in r else "—"
            out.append(f"| {r['S']} | {'mask' if r['masked'] else 'full'} | {r['provider']} | {r['ms']:.3f} | "
                       f"{r['tflops']:.0f} | {100 * r['tflops'] / mm:.0f}% | {sp} |")
    sweep = [r for r in d["rows"] if r["op"] == "attention_sweep" and "ms" in r]
    if sweep:
        out += ["", f"Attention block shapes at S={sweep[0]['S']}, no autotuning:", "",
                "| BLOCK_M × BLOCK_N | warps | stages | K/V loads | ms | TFLOP/s |", "|---|---:|---:|---|---:|---:|"]
        for r in sweep:
            out.append(f"| {r['BLOCK_M']} × {r['BLOCK_N']} | {r['num_warps']} | {r['num_stages']} | "
                       f"{'TMA' if r['tma'] else 'pointers'} | {r['ms']:.3f} | {r['tflops']:.0f} |")
    gemms = [r for r in d["rows"] if r["op"] == "gemm"]
    if gemms:
        out += ["", "The block's linears on cuBLAS at their real shapes (bias in the epilogue; GELU too for mlp_up). "
                "M: image tokens 8192 (1024² edit, B=1), 16384 (B=2), 53248 (4K); text tokens 360 / 720:", "",
                "| linear | M | N | K | ms | TFLOP/s | % of matmul ceiling |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in gemms:
            out.append(f"| {r['name']} | {r['M']} | {r['N']} | {r['K']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                       f"{100 * r['tflops'] / mm:.0f}% |")
    src_name, src = memory if memory else (name, d)
    cc = src["ceilings"]["copy_gbs"]
    out += ["", f"Memory-bound kernels, bf16, C=3072 (`{src_name}`, {src['date']}; copy ceiling {cc:.0f} GB/s; "
            "each kernel timed three times, each time right after a same-size copy):", "",
            "| op | S | ms | GB/s | % of copy ceiling | % of the interleaved same-size copy | × torch eager bf16 | "
            "× float32 reference |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in src["rows"]:
        if r["op"] in MEMORY_OPS:
            eager = f"{r['speedup_vs_eager']:.2f}" if "speedup_vs_eager" in r else "—"
            ref = f"{r['speedup_vs_ref']:.2f}" if "speedup_vs_ref" in r else "—"
            near = f"{100 * r['frac_of_interleaved_copy']:.0f}%" if "frac_of_interleaved_copy" in r else "—"
            out.append(f"| {r['op']} | {r['S']} | {r['ms']:.4f} | {r['gbs']:.0f} | {100 * r['frac_of_copy']:.0f}% | "
                       f"{near} | {eager} | {ref} |")
    return out + [""]
