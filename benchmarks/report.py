"""Regenerate benchmarks/RESULTS.md from benchmarks/results/*.json:  python -m benchmarks.report"""
import json
from pathlib import Path

HERE = Path(__file__).parent


def _e2e(name, d):
    env, ceil = d["env"], d["ceilings"]
    peak = ceil["matmul_tflops"]
    out = [f"### Full-size MMDiT forward — `{name}`", "",
           f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. Ceilings measured in the "
           f"same run: bf16 matmul {peak:.0f} TFLOP/s, HBM copy {ceil['copy_gbs']:.0f} GB/s. Random bf16 weights "
           f"({d['weights_gib']:.1f} GiB) shared by both models; 1024² edit = 4096 noisy + 4096 condition + 360 "
           "text tokens (B=2: second row 300 text tokens, padded); 4K = 49152 + 4096 + 360. "
           "`ours_torch_ops` is our model with every fused op on its float32 torch reference (the correctness "
           "path, not a speed baseline).", "",
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
            f"{d['modulation_weights_gib']:.2f} GiB.", ""]
    return out


def readme_table(d):
    """The short table README.md carries (between its RESULTS markers)."""
    peak = d["ceilings"]["matmul_tflops"]
    env = d["env"]
    rows = [f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; bf16 matmul ceiling "
            f"{peak:.0f} TFLOP/s measured in the same run. Full-size MMDiT forward, random weights:", "",
            "| case | diffusers eager | diffusers compiled | ours | ours / eager | ours / compiled | ours TFLOP/s |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for case, r in d["cases"].items():
        e, o = r["diffusers"]["ms"], r["ours"]["ms"]
        c = r.get("diffusers_compiled", {}).get("ms")
        rows.append(f"| {case} | {e:.0f} ms | {f'{c:.0f} ms' if c else '—'} | {o:.0f} ms | {o / e:.2f} | "
                    f"{f'{o / c:.2f}' if c else '—'} | {r['ours']['tflops']:.0f} ({100 * r['ours']['tflops'] / peak:.0f}%) |")
    return rows


def readme_attention(d):
    """Attention summary for README: ours vs cuDNN (unmasked) and vs the masked SDPA path."""
    by = {(r["S"], r["masked"], r["provider"]): r for r in d["rows"] if r["op"] == "attention"}
    peak = d["ceilings"]["matmul_bf16_tflops"]
    out = ["", f"Attention kernel, B1 H24 D128 bf16 ({d['gpu']}, {d['date'][:10]}; matmul ceiling {peak:.0f} TFLOP/s):",
           "", "| S | ours TFLOP/s | ours / cuDNN time | ours masked TFLOP/s | ours / masked SDPA time |",
           "|---:|---:|---:|---:|---:|"]
    for S in sorted({k[0] for k in by}):
        o, c = by[(S, False, "ours")], by[(S, False, "sdpa_cudnn")]
        om, sm = by[(S, True, "ours")], by[(S, True, "sdpa_masked")]
        out.append(f"| {S} | {o['tflops']:.0f} | {o['ms'] / c['ms']:.2f} | {om['tflops']:.0f} | {om['ms'] / sm['ms']:.2f} |")
    return out


def update_readme(rows):
    path = HERE.parent / "README.md"
    text = path.read_text()
    start, end = "<!-- RESULTS:start -->", "<!-- RESULTS:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        path.write_text(head + start + "\n" + "\n".join(rows) + "\n" + end + rest.split(end, 1)[1])


def _kernels(name, d):
    c = d["ceilings"]
    out = [f"### Kernels — `{name}`", "",
           f"{d['gpu']}, torch {d['torch']}, triton {d['triton']}, {d['date']}. Ceilings measured in the same run: "
           f"bf16 matmul {c['matmul_bf16_tflops']:.0f} TFLOP/s, HBM copy {c['copy_gbs']:.0f} GB/s.", "",
           "Attention, B=1, H=24, D=128, bf16 (`mask`: the last 200 keys are padding text):", "",
           "| S | keys | provider | ms | TFLOP/s | % of matmul peak | ours is × faster |", "|---:|---|---|---:|---:|---:|---:|"]
    for r in d["rows"]:
        if r["op"] == "attention":
            sp = f"{r['ours_speedup']:.2f}" if "ours_speedup" in r else "—"
            out.append(f"| {r['S']} | {'mask' if r['masked'] else 'full'} | {r['provider']} | {r['ms']:.3f} | "
                       f"{r['tflops']:.0f} | {100 * r['tflops'] / c['matmul_bf16_tflops']:.0f}% | {sp} |")
    out += ["", "Memory-bound kernels, bf16, C=3072:", "",
            "| op | S | ms | GB/s | % of copy ceiling | × torch eager bf16 | × float32 reference |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        if r["op"] in ("norm_modulate", "gated_residual", "gated_residual_norm_modulate", "rms_norm_rope",
                       "copy_same_size"):
            eager = f"{r['speedup_vs_eager']:.2f}" if "speedup_vs_eager" in r else "—"
            ref = f"{r['speedup_vs_ref']:.2f}" if "speedup_vs_ref" in r else "—"
            out.append(f"| {r['op']} | {r['S']} | {r['ms']:.4f} | {r['gbs']:.0f} | {100 * r['frac_of_copy']:.0f}% | "
                       f"{eager} | {ref} |")
    return out + [""]


def main():
    lines = ["# Measured results", "", "Generated by `python -m benchmarks.report` from `benchmarks/results/*.json`;"
             " do not edit by hand. Every time is a median of repeated runs; every ratio is against a baseline "
             "measured in the same run on the same GPU.", ""]
    readme = {}
    for path in sorted((HERE / "results").glob("*.json")):  # for README, the last file of each kind wins
        d = json.loads(path.read_text())
        if "cases" in d:
            lines += _e2e(path.name, d)
            readme["e2e"] = readme_table(d)
        elif "rows" in d:
            lines += _kernels(path.name, d)
            readme["kernels"] = readme_attention(d)
    update_readme(readme.get("e2e", []) + readme.get("kernels", []))
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    print("\n".join(main()))
