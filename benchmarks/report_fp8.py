"""RESULTS.md section for benchmarks/bench_fp8.py (fp8 GEMMs at the block's shapes, the quantizing kernels, the
block's stages and a 3-block full-width forward: bf16 vs fp8 with torch quantization vs fp8 fed by our fused
kernels)."""


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
