"""RESULTS.md and README sections for benchmarks/bench_family.py (Layered 640 vs 1024 with 4 layers, text to
image at 1328²): time per step and peak VRAM, ours vs diffusers eager, and ours under --vram budgets."""


def _head(d):
    env, peak = d["env"], d["ceilings"]["matmul_tflops"]
    return (f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; bf16 matmul ceiling "
            f"{peak:.0f} TFLOP/s measured in the same run. Full-size random bf16 weights (the Layered config: "
            "layer3d rope, additional_t_cond), shared by our models and diffusers'. A step = CFG with both "
            "prompts, as each pipeline's loop runs it: ours one B=2 forward, diffusers two B=1 forwards. Peak = "
            "torch's max allocated over a step, weights included (ours keeps the modulation Linears on the host: "
            "their table is computed once per edit).")


def _layered_rows(d):
    layers = d.get("layers", 4)
    rows = ["| resolution | image tokens | diffusers eager | ours resident | ours / diffusers | ours --vram 24GiB | "
            "ours --vram 16GiB | ours vs diffusers rel L2 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for res, r in d.get("layered", {}).items():
        if "diffusers" not in r or "ours" not in r:
            rows.append(f"| {res} | failed: {str(r.get('error') or r.get('ours_error'))[:80]} | | | | | | |")
            continue
        cells = []
        for gib in (24, 16):
            b = d.get("budgets", {}).get(f"{res}@{gib}GiB", {})
            if "ours" in b:
                cells.append(f"{b['ours']['step_ms'] / 1000:.2f} s, {b['ours']['peak_gib']:.1f} GiB "
                             f"({b['mmdit_resident']}/60 resident, {b['ours']['step_bytes'][-1] / 1e9:.1f} GB streamed)")
            elif "out of memory" in str(b.get("error", "")).lower():
                cells.append("out of memory in this run (see below)")
            else:
                cells.append(f"failed: {str(b.get('error', 'not run'))[:60]}")
        dr, o = r["diffusers"], r["ours"]
        rows.append(f"| {res}² × {layers} layers | {r['image_tokens']} | {dr['step_ms'] / 1000:.2f} s, "
                    f"{dr['peak_gib']:.1f} GiB | {o['step_ms'] / 1000:.2f} s, {o['peak_gib']:.1f} GiB | "
                    f"{r['ratio']:.2f} | {cells[0]} | {cells[1]} | {r['rel_l2_prompt_row']:.1e} |")
    return rows


def _t2i_line(d):
    r = d.get("t2i", {})
    if "ours" not in r:
        return [f"Text to image: failed: {r.get('error', 'not run')}"] if r else []
    return [f"Text to image at {r['size']}² ({r['image_tokens']} image tokens, prompts of {r['text_tokens'][0]} and "
            f"{r['text_tokens'][1]} tokens, CFG): diffusers eager {r['diffusers']['step_ms']:.0f} ms per step, ours "
            f"{r['ours']['step_ms']:.0f} ms ({r['ratio']:.2f}×, {r['ours']['tflops']:.0f} TFLOP/s); prompt-row "
            f"velocity rel L2 {r['rel_l2']:.1e} (bf16 rounding through 60 random blocks)."]


def _answer(d):
    lay, b = d.get("layered", {}), d.get("budgets", {})
    if not all(k in lay and "ours" in lay[k] for k in ("640", "1024")):
        return []
    s640, s1024 = lay["640"]["ours"]["step_ms"], lay["1024"]["ours"]["step_ms"]
    line = (f"640 or 1024? A 1024 split has {lay['1024']['image_tokens'] / lay['640']['image_tokens']:.2f}× the "
            f"tokens and costs {s1024 / s640:.1f}× per step ({s640 / 1000:.2f} s vs {s1024 / 1000:.2f} s here, "
            f"{50 * s640 / 1000:.0f} s vs {50 * s1024 / 1000:.0f} s for 50 steps)")
    if "ours" in b.get("1024@16GiB", {}):
        line += (f"; both run under `--vram 16GiB` with streaming (1024 at {b['1024@16GiB']['ours']['step_ms'] / 1000:.2f} "
                 f"s per step, {b['1024@16GiB']['ours']['step_ms'] / s1024:.2f}× resident, on this GPU's host link)")
    return [line + "."]


def _oom_note(d):
    """A budget run that went out of memory: what its allocator held beyond the plan."""
    out = []
    for key, b in d.get("budgets", {}).items():
        err = str(b.get("error", ""))
        if "out of memory" in err.lower():
            out.append(f"`{key}` went out of memory at {b.get('predicted_denoise_gib', 0):.2f} GiB planned: this run "
                       "first evicted the streamed blocks from a GPU that held the whole model, and (most likely) the allocator's "
                       "half-freed segments counted against the budget (torch: \"" + err[err.find("Of the"):][:120]
                       + "…\"). The benchmark now moves the model to the host first, as the CLI loads it; that "
                       "version has not run yet.")
    return out


def family_section(name, d):
    return ([f"### Layered and text to image — `{name}`", "", _head(d), ""] + _layered_rows(d) + [""]
            + _answer(d) + [""] + _oom_note(d) + [""] + _t2i_line(d))


def readme_family(d):
    return [_head(d), ""] + _layered_rows(d) + [""] + _answer(d) + [""] + _oom_note(d) + [""] + _t2i_line(d)
