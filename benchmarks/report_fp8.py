"""RESULTS.md sections for benchmarks/bench_fp8.py (fp8 GEMMs at the block's shapes, the quantizing kernels, the
block's stages and a 3-block full-width forward: bf16 vs fp8 with torch quantization vs fp8 fed by our fused
kernels) and benchmarks/bench_attention_fp8.py (the fp8 attention against cuDNN bf16, the block-config sweep)."""


# what a result file's run differed in from the code it sits beside
NOTES = {"fp8_kernels_h200.json": "Run before the GELU+quantize kernel's default became the two-pass variant "
                                  "(its `2 pass (4096)` row): the `mlp` stage here used the one-pass kernel."}


def _head(name, d):
    c = d["ceilings"]
    return [f"### fp8 kernels and block stages — `{name}`", "",
            f"{d['gpu']}, torch {d['torch']}, triton {d['triton']}, {d['date']}; ceilings measured in the same run: "
            f"bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s, fp8 rowwise `_scaled_mm` {c['fp8_rowwise_tflops']:.0f} "
            f"TFLOP/s, copy {c['copy_gbs']:.0f} GB/s. 8552 tokens (a 1 MP edit), C = 3072, MLP 12288. "
            + NOTES.get(name, ""), ""]


def fp8_section(name, d):
    rows = d["rows"]
    out = _head(name, d)
    quant = [r for r in rows if r["section"] == "quant"]
    if quant:
        out += ["| quantizing kernel | ms | GB/s | of copy |", "|---|---:|---:|---:|"]
        out += [f"| {r['name']} | {r['ms']:.4f} | {r['gbs']:.0f} | {100 * r['frac_of_copy']:.0f}% |" for r in quant]
        out.append("")
    gemm = [r for r in rows if r["section"] == "gemm"]
    if gemm:
        out += ["| GEMM | provider | ms | TFLOP/s | of bf16 ceiling | of fp8 ceiling |", "|---|---|---:|---:|---:|---:|"]
        out += [f"| {r['name']} {r['M']}×{r['K']}→{r['N']} | {r['provider']} | {r['ms']:.4f} | {r['tflops']:.0f} | "
                f"{100 * r['frac_of_bf16_mm']:.0f}% | {100 * r['frac_of_fp8_mm']:.0f}% |" for r in gemm]
        out.append("")
    staged = [r for r in rows if r["section"] in ("stages", "model")]
    if staged:
        base = {r["name"]: r["ms"] for r in staged if r.get("provider") == "bf16"}
        out += ["| block stage | provider | ms | × bf16 |", "|---|---|---:|---:|"]
        for r in staged:
            ratio = r["ms"] / base[r["name"]] if r["name"] in base else float("nan")
            out.append(f"| {r['name']} | {r['provider']} | {r['ms']:.3f} | {ratio:.2f} |")
        out.append("")
    return out


def attention_fp8_section(name, d):
    """benchmarks/bench_attention_fp8.py: each provider against cuDNN bf16 of the same run, then the block-config
    sweep (attend only, no autotuning) when it ran."""
    c = d["ceilings"]
    out = [f"### fp8 attention — `{name}`", "",
           f"{d['gpu']}, torch {d['torch']}, triton {d['triton']}, {d['date']}; ceilings measured in the same run: "
           f"bf16 matmul {c['matmul_tflops']:.0f}, fp8 `_scaled_mm` {c['fp8_mm_tflops']:.0f} TFLOP/s. B=1, H=24, "
           f"D=128, Gaussian inputs; rel L2 against float32 attention on {d['ref_rows']} query rows. `total` = "
           "quantize + attend (what the forward runs), `attend` the attention kernel alone.", "",
           "| S | provider | ms | TFLOP/s | × cuDNN bf16 | rel L2 | config |", "|---:|---|---:|---:|---:|---:|---|"]
    for r in d["rows"]:
        if r.get("op") == "sweep" or "provider" not in r:
            continue
        if "error" in r:
            out.append(f"| {r['S']} | {r['provider']} | failed: {r['error'][:80]} | | | | |")
            continue
        rate = f"{r['tflops']:.0f}" if "tflops" in r else "–"
        xc = f"{r['x_cudnn']:.2f}" if "x_cudnn" in r else "–"
        err = f"{r['rel_l2']:.1e}" if r.get("rel_l2") is not None else "–"
        out.append(f"| {r['S']} | {r['provider']} | {r['ms']:.3f} | {rate} | {xc} | {err} | {r.get('config', '')} |")
    parts = [r for r in d["rows"] if r.get("op") == "quantize_kernel"]
    if parts:
        out += ["", "The quantize pass kernel by kernel (device time per call, torch.profiler; bytes it reads and "
                "writes):", "", "| S | Q·K / P·V | kernel | µs | MB moved | GB/s |", "|---:|---|---|---:|---:|---:|"]
        out += [f"| {r['S']} | {r['qk']} / {r['pv']} | `{r['kernel']}` | {r['us']:.1f} | {r['bytes'] / 1e6:.0f} | "
                f"{r['gbs']:.0f} |" for r in parts]
    sweep = [r for r in d["rows"] if r.get("op") == "sweep"]
    if sweep:
        out += ["", "Block configs, attend only, no autotuning (`ws`: the compiler's warp specialization of the key "
                "loop; BLOCK_N 256 spans two K-scale blocks, scaled per key; `vs first` is the rel L2 against the "
                "first row's output, the same math summed in another order):", "",
                "| S | Q·K / P·V | loads | BLOCK_M × BLOCK_N | warps | stages | ws | ms | TFLOP/s | vs first |",
                "|---:|---|---|---|---:|---:|---|---:|---:|---:|"]
        for r in sweep:
            res = (f"{r['ms']:.3f} | {r['tflops']:.0f} | {r['rel_l2_vs_first']:.1e}" if "ms" in r
                   else f"failed: {r['error'][:60]} | | ")
            out.append(f"| {r['S']} | {r['qk']} / {r['pv']} | {'TMA' if r['tma'] else 'pointers'} | "
                       f"{r['BLOCK_M']} × {r['BLOCK_N']} | {r['num_warps']} | {r['num_stages']} | "
                       f"{'yes' if r.get('WS') else ''} | {res} |")
    return out + [""]
