"""Regenerate benchmarks/RESULTS.md from benchmarks/results/*.json:  python -m benchmarks.report"""
import json
from pathlib import Path

from benchmarks.report_kernels import e2e_section, kernels_section, readme_attention, readme_table
from benchmarks.report_bench import bench_section
from benchmarks.report_family import family_section, readme_family
from benchmarks.report_fp8 import attention_fp8_section, fp8_section
from benchmarks.report_fp8_forward import fp8_forward_section, merge_compiled, readme_fp8_forward
from benchmarks.report_load import load_section, readme_load
from benchmarks.report_plus import plus_section, readme_plus
from benchmarks.report_serve import first_step_section, readme_serve, readme_trace, serve_section, trace_section

HERE = Path(__file__).parent


def update_readme(rows, marker="RESULTS"):
    path = HERE.parent / "README.md"
    text = path.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        path.write_text(head + start + "\n" + "\n".join(rows) + "\n" + end + rest.split(end, 1)[1])


def _vae_memory(name, d):
    env = d["env"]
    out = [f"### VAE activation memory vs the planner's estimate — `{name}`", "",
           f"{env['gpu']}, torch {env['torch']}, {env['date']}, `{d.get('alloc_conf')}`; bf16, full config; peak "
           "allocated above the weights and the input, second call of each case.", "",
           "| case (op:size:tile) | measured GiB | estimate GiB | measured / estimate |", "|---|---:|---:|---:|"]
    for case, r in d["cases"].items():
        out.append(f"| {case} | {r['measured_gib']:.2f} | {r['estimate_gib']:.2f} | {r['ratio']:.2f} |")
    return out + [""]


PCIE4_GBS = 25.0   # a PCIe 4.0 x16 link in practice, for the projection


def _offload_rows(ours, ref):
    """One row per budgeted run: plan, peaks, step time, overlap efficiency, ratio to group offloading."""
    fwd = ref["forward"]
    diffusers_step = {"1024": (fwd["1024_b2"]["ms"], 2 * fwd["1024_b1"]["ms"]), "4k": (None, 2 * fwd["4k_b1"]["ms"])}
    rows = []
    for spec, r in ours["runs"].items():
        job, what = spec.split(":")
        if not r.get("ok"):
            rows.append(dict(spec=spec, job=job, failed=r.get("error", "?")))
            continue
        resident = ours["runs"].get(f"{job}:resident", {})
        step_ms = 1000 * r["step_s"][-1]
        bytes_ = r["step_bytes"][-1]
        compute = 1000 * resident["step_s"][-1] if resident.get("ok") else None
        link = bytes_ / ours["h2d_gbs"] / 1e6
        peak = max([r["text_peak_gib"]] + list(r["stage_peak_gib"].values()))
        reserved = max([r["text_peak_reserved_gib"]] + list(r["stage_peak_reserved_gib"].values()))
        b2, b1x2 = diffusers_step[job]
        rows.append(dict(
            spec=spec, job=job, budget=r.get("budget_gib"), resident=r.get("mmdit_resident", 60),
            split=r.get("cfg_split", "batched"), dec_tile=r.get("decode_tile"),
            predicted=max(r["predicted_gib"].values()) if "predicted_gib" in r else None, peak=peak,
            in_use=reserved + r["outside_allocator_gib"], step=step_ms, gb=bytes_ / 1e9,
            eff=step_ms / max(compute, link) if compute else None, compute=compute,
            pcie4=max(compute, bytes_ / PCIE4_GBS / 1e6) if compute else None,
            vs_b2=step_ms / b2 if b2 else None, vs_b1x2=step_ms / b1x2, edit=r["edit_s"], text=r["text_s"]))
    return rows


def _offload(ours, ref, names):
    env = ours["env"]
    fwd, vae_o, vae_d = ref["forward"], ours["vae_decode_4096x3072"], ref["vae_decode_4096x3072"]
    f = lambda v, fmt: "—" if v is None else format(v, fmt)
    out = [f"### Whole edits under a VRAM budget — `{names}`", "",
           f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; ours and diffusers ran "
           f"one after the other on one lease of the machine. Host-to-device bandwidth measured in the same run: "
           f"{ours['h2d_gbs']:.1f} GB/s (pinned). Random bf16 weights in the full configs (MMDiT "
           f"{ours['weights_gib']['transformer']:.1f} GiB, text encoder {ours['weights_gib']['text_encoder']:.1f} GiB, "
           f"VAE {ours['weights_gib']['vae']:.2f} GiB). Each edit: text encoder (prompt + negative prompt, 1024² "
           "image), VAE encode of the 1024² condition image, CFG 4 with both rows, VAE decode. The budget is enforced "
           "with `torch.cuda.set_per_process_memory_fraction` (budget minus what the process holds outside torch's "
           "allocator); `min` is the planner's smallest budget. Step time: the last step of the edit, one sample, "
           "GPU synchronised (the first step pays the cold start). Plans are the ones the planner made at run "
           "time: since then its estimate for per-row CFG grew by one residual row (the measured 4.84 GiB below), "
           "so today `1024:min` and `4k:6` would run CFG as two B=1 forwards.", "",
           "| run | budget | blocks resident | CFG rows | decode tile | predicted peak | measured peak (allocated) | "
           "in use (reserved + outside) | step ms | GB streamed / step | overlap eff. | × diffusers B=2 | "
           "× diffusers 2×B=1 | PCIe 4 step ms (proj.) |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in _offload_rows(ours, ref):
        if "failed" in r:
            out.append(f"| {r['spec']} | failed: {r['failed'][:80]} |" + " |" * 12)
            continue
        out.append(f"| {r['spec']} | {f(r['budget'], '.2f')} GiB | {r['resident']}/60 | {r['split']} | "
                   f"{r['dec_tile'] or 'none'} | {f(r['predicted'], '.2f')} GiB | {r['peak']:.2f} GiB | "
                   f"{r['in_use']:.2f} GiB | {r['step']:.0f} | {r['gb']:.1f} | {f(r['eff'], '.3f')} | "
                   f"{f(r['vs_b2'], '.3f')} | {r['vs_b1x2']:.3f} | {f(r['pcie4'], '.0f')} |")
    out += ["", "Overlap efficiency = step time / max(resident step time, streamed bytes / measured H2D bandwidth): "
            "1 is perfect overlap, above 1 is time lost to streaming. "
            f"PCIe 4 projection = max(resident step time, streamed bytes / {PCIE4_GBS:.0f} GB/s). The diffusers pipeline "
            "runs CFG as two B=1 forwards; `× diffusers B=2` compares with one batched B=2 forward instead.", "",
            "diffusers' `apply_group_offloading(offload_type='block_level', num_blocks_per_group=1, use_stream=True)`, "
            "MMDiT forward alone, same text lengths:", "", "| case | ms | peak allocated GiB |", "|---|---:|---:|"]
    for case, r in fwd.items():
        out.append(f"| {case} (text {r['text_lengths']}) | {r['ms']:.0f} | {r['peak_gib']:.2f} |")
    out += ["", "VAE decode of a 4096×3072 image (latents 384×512), bf16:", "",
            "| provider | ms | × diffusers tiled | peak allocated GiB |", "|---|---:|---:|---:|"]
    base = vae_d["diffusers_tiled"]["ms"]
    for name, r in list(vae_o.items()) + list(vae_d.items()):
        if "ms" not in r:
            out.append(f"| {name} | failed | | |")
            continue
        label = name + (f" (tile {r['tile']} latent px, allocator capped at {r['budget_gib']:.0f} GiB)"
                        if r.get("tile") else "")
        out.append(f"| {label} | {r['ms']:.0f} | {r['ms'] / base:.3f} | {r['peak_gib']:.2f} |")
    out += ["", "Predicted (planner) vs measured peak allocated, per stage, GiB:", "",
            "| run | text | VAE encode | denoise | VAE decode |", "|---|---|---|---|---|"]
    for spec, r in ours["runs"].items():
        if r.get("ok") and "predicted_gib" in r:
            p, m = r["predicted_gib"], r["stage_peak_gib"]
            out.append(f"| {spec} | {p['text']:.2f} / {r['text_peak_gib']:.2f} | {p['vae_encode']:.2f} / "
                       f"{m['vae_encode']:.2f} | {p['denoise']:.2f} / {m['denoise']:.2f} | "
                       f"{p['vae_decode']:.2f} / {m['vae_decode']:.2f} |")
    return out + [""]


def readme_offload(ours, ref):
    env = ours["env"]
    out = [f"{env['gpu']}, torch {env['torch']}, {env['date'][:10]}; full-size random weights; budget enforced; "
           f"H2D {ours['h2d_gbs']:.0f} GB/s measured in the same run. Step = one denoising step with CFG (both rows).",
           "", "| run | budget | CFG rows | peak in use | step | × diffusers group offload (B=2 / 2×B=1) | overlap eff. |",
           "|---|---:|---|---:|---:|---:|---:|"]
    for r in _offload_rows(ours, ref):
        if "failed" in r or r["budget"] is None or r["eff"] is None:
            continue
        b2 = f"{r['vs_b2']:.2f} / " if r["vs_b2"] else "— / "
        out.append(f"| {r['spec']} | {r['budget']:.2f} GiB | {r['split']} | {r['in_use']:.2f} GiB | {r['step']:.0f} ms | "
                   f"{b2}{r['vs_b1x2']:.2f} | {r['eff']:.2f} |")
    v, d = ours["vae_decode_4096x3072"].get("ours_tiled", {}), ours and ref["vae_decode_4096x3072"]
    if "ms" in v:
        out += ["", f"VAE decode 4096×3072: ours tiled {v['ms']:.0f} ms at {v['peak_gib']:.2f} GiB peak, diffusers "
                f"tiled {d['diffusers_tiled']['ms']:.0f} ms ({v['ms'] / d['diffusers_tiled']['ms']:.2f}×), diffusers "
                f"untiled {d['diffusers_untiled']['ms']:.0f} ms at {d['diffusers_untiled']['peak_gib']:.0f} GiB."]
    return out


# file name prefix -> (RESULTS.md section, README rows, README marker); the last file of a kind fills the marker
SECTIONS = {"family_": (family_section, readme_family, "FAMILY"), "trace_cli": (trace_section, readme_trace, "TRACE"),
            "serve_": (serve_section, readme_serve, "SERVE"), "load_": (load_section, readme_load, "LOAD")}


def main():
    lines = ["# Measured results", "", "Generated by `python -m benchmarks.report` from `benchmarks/results/*.json`;"
             " do not edit by hand. Kernel and forward times are medians of repeated runs; the whole-edit step times "
             "are single steps (said there). Every ratio is against a baseline measured in the same run on the "
             "same GPU.", ""]
    readme = {}
    offload, fp8, compiled = {}, {}, []
    for path in sorted((HERE / "results").glob("*.json")):  # for README, the last file of each kind wins
        d = json.loads(path.read_text())
        if path.name.startswith("offload_"):
            offload["ours" if "runs" in d else "ref"] = (path.name, d)
        elif path.name.startswith("fp8_compiled"):        # every one: merged per case below
            compiled.append((path.name, d))
        elif path.name.startswith(("fp8_forward", "plus_fp8")):   # paired below
            fp8[path.name.split("_")[1].replace("fp8", "edit")] = (path.name, d)
        elif path.name.startswith("plus_"):
            lines += plus_section(path.name, d)
            if "ours_s" in d.get("lora", {}):     # the full run, not a profile-only one
                update_readme(readme_plus(d), "PLUS")
        elif path.name.startswith("attention_fp8"):
            lines += attention_fp8_section(path.name, d)
        elif path.name.startswith("fp8_kernels"):
            lines += fp8_section(path.name, d)
        elif path.name.startswith("trace_first"):
            lines += first_step_section(path.name, d)
        elif path.name.startswith(tuple(SECTIONS)):
            section, readme_rows, marker = SECTIONS[next(p for p in SECTIONS if path.name.startswith(p))]
            lines += section(path.name, d)
            update_readme(readme_rows(d), marker)
        elif path.name.startswith("vae_memory"):
            lines += _vae_memory(path.name, d)
        elif "benchmarks" in d and "machine_info" in d:   # pytest-benchmark JSON of benchmarks/test_bench_*.py
            lines += bench_section(path.name, d)
        elif "cases" in d:
            lines += e2e_section(path.name, d)
            readme["e2e"] = readme_table(d)
        elif path.name.startswith("kernels_memory"):
            continue                       # merged into its kernels_ file's section below
        elif "rows" in d:
            memory = path.with_name(path.name.replace("kernels_", "kernels_memory_"))
            extra = (memory.name, json.loads(memory.read_text())) if memory.exists() else None
            lines += kernels_section(path.name, d, extra)
            readme["kernels"] = readme_attention(d)
    if "forward" in fp8:
        (fn, f), runs, edit = fp8["forward"], merge_compiled(compiled), fp8.get("edit")
        lines += fp8_forward_section(fn, f, runs, edit)
        update_readme(readme_fp8_forward(f, runs, edit), "FP8")
    if "ours" in offload and "ref" in offload:
        (on, o), (rn, r) = offload["ours"], offload["ref"]
        lines += _offload(o, r, f"{on}` + `{rn}")
        update_readme(readme_offload(o, r), "OFFLOAD")
    update_readme(readme.get("e2e", []) + readme.get("kernels", []))
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    print("\n".join(main()))
