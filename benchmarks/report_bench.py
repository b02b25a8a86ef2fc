"""RESULTS.md section for a pytest-benchmark JSON of the kernel suite (benchmarks/test_bench_kernels.py).

    python -m benchmarks.report_bench FILE.json      # print the section
    python -m benchmarks.report                      # RESULTS.md: a section per results/bench_*.json

One table per op family; a row per (size, provider) in the suite's order, with the median per-call time, the
rate, the rate as a share of the ceiling measured in the same session, and the time against the group's baseline
provider (the row named in its extra_info) from the same run.
"""
import json
import sys

RATE = {"tflops": "TFLOP/s", "gbs": "GB/s"}
CEILING_NAME = {"matmul_bf16_tflops": "bf16 matmul", "matmul_fp8_rowwise_tflops": "fp8 rowwise matmul",
                "matmul_fp8_tensor_tflops": "fp8 per-tensor matmul", "copy_gbs": "copy"}


def _fmt_rate(v):
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def bench_rows(d):
    """(op, shape, provider, row cells) per benchmark with a timing, in the file's order."""
    medians = {(b["group"], b["extra_info"].get("provider")): b["stats"]["median"] for b in d["benchmarks"]}
    out = []
    for b in d["benchmarks"]:
        e, t = b["extra_info"], b["stats"]["median"]
        unit = "tflops" if "tflops" in e else "gbs"
        frac = e.get("frac_of_ceiling")
        base = medians.get((b["group"], e.get("baseline")))
        cells = [e["shape"], e["provider"], f"{t * 1e3:.4f}", f"{_fmt_rate(e[unit])} {RATE[unit]}",
                 f"{100 * frac:.0f}% of {CEILING_NAME.get(e['ceiling'], e['ceiling'])}" if frac is not None else "—",
                 f"{t / base:.2f}" if base else "—", str(b["stats"]["rounds"]), str(b["stats"]["iterations"])]
        out.append((e["op"], cells))
    return out


def bench_section(name, d):
    """Markdown lines for one pytest-benchmark JSON written by the kernel suite."""
    q = d.get("qie") or d["machine_info"].get("qie", {})
    c = q.get("ceilings") or {}
    peaks = ", ".join(f"{CEILING_NAME.get(k, k)} {_fmt_rate(v)} {'GB/s' if k.endswith('gbs') else 'TFLOP/s'}"
                      for k, v in c.items() if v)
    out = [f"### Kernels (pytest-benchmark) — `{name}`", "",
           f"{q.get('device', '?')}, torch {q.get('torch', '?')}, triton {q.get('triton', '?')}, "
           f"{d['datetime'][:16].replace('T', ' ')} UTC, `{q.get('mode', '?')}` sizes"
           + (" (tiny shapes under the Triton interpreter: the times only show the suite runs)"
              if q.get("mode") == "tiny" else "") + f". Ceilings measured in the same session: {peaks}. "
           "Times are medians of per-call device time (CUDA events; wall time on a CPU), `iterations` calls per "
           "round; "
           "`× baseline` is this row's time over the baseline provider's in the same group and run.", ""]
    rows = bench_rows(d)
    for op in dict.fromkeys(op for op, _ in rows):
        out += [f"**{op}**", "", "| shape | provider | ms | rate | of ceiling | × baseline | rounds | iterations |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        out += ["| " + " | ".join(cells) + " |" for o, cells in rows if o == op]
        out.append("")
    return out


if __name__ == "__main__":
    path = sys.argv[1]
    with open(path) as f:
        print("\n".join(bench_section(path.rsplit("/", 1)[-1], json.load(f))))
