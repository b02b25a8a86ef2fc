"""The pytest-benchmark kernel suite (benchmarks/test_bench_kernels.py) runs at tiny sizes, its JSON carries
per-call times, rates and ceilings, and benchmarks/report_bench.py turns that JSON into RESULTS.md rows.

The CPU test runs the whole tiny suite in a subprocess (Triton interpreter), the way CI keeps it alive; the
GPU test runs two full-size rows and checks their recorded per-call time against triton's do_bench."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# rows that exist today on any machine (the pending fp8 ops and the SDPA backends depend on the device)
ALWAYS = {("attention", "ours"), ("gemm", "bf16"), ("gemm", "fp8_torch_quant"), ("gemm", "fp8_prequant"),
          ("linear_gelu", "ours"), ("linear_gelu", "torch_eager"), ("norm_modulate", "ours"),
          ("gated_residual", "ours"), ("gated_residual_norm_modulate", "ours"), ("rms_norm_rope", "ours"),
          ("norm_modulate->fp8", "unfused"), ("gated_residual_norm_modulate->fp8", "unfused"),
          ("gelu->fp8", "unfused"), ("quantize_fp8", "unfused")}


def run_suite(out, *select, size):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(select or ["benchmarks/"]),
           "--benchmark-only", "--benchmark-disable-gc", f"--benchmark-json={out}"]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, QIE_BENCH_SIZE=size), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    return json.loads(Path(out).read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return run_suite(tmp_path_factory.mktemp("bench") / "bench_kernels_tiny.json", size="tiny")


def test_tiny_suite_records_rates_and_ceilings(tiny):
    rows = tiny["benchmarks"]
    assert ALWAYS <= {(b["extra_info"]["op"], b["extra_info"]["provider"]) for b in rows}
    q = tiny["qie"]
    assert q["mode"] == "tiny" and q["torch"] == torch.__version__ and q["ceilings"]["matmul_bf16_tflops"] > 0
    for b in rows:
        e, t = b["extra_info"], b["stats"]["median"]
        assert e["mode"] == "tiny" and e["device"] == q["device"] and e["ceilings"] == q["ceilings"], b["name"]
        rate = e["flops"] / t / 1e12 if "flops" in e else e["bytes"] / t / 1e9
        assert rate == pytest.approx(e["tflops" if "flops" in e else "gbs"], rel=1e-9), b["name"]
        assert e["ceiling_value"] == q["ceilings"][e["ceiling"]], b["name"]
        if e["ceiling_value"] is None:  # e.g. fp8 attention on the CPU: no fp8 matmul here to hold it to
            assert e["frac_of_ceiling"] is None, b["name"]
        else:
            assert e["frac_of_ceiling"] == pytest.approx(rate / e["ceiling_value"], rel=1e-9), b["name"]
        if b["stats"]["iterations"] >= 10:  # a round's total (not divided by iterations) would be >= 10x
            assert 0.2 < t * 1e3 / e["single_call_ms"] < 5, (b["name"], t, e["single_call_ms"])


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_report_turns_the_json_into_rows(tiny):
    from benchmarks.report_bench import bench_section
    lines = bench_section("bench_kernels_tiny.json", tiny)
    assert lines[0] == "### Kernels (pytest-benchmark) — `bench_kernels_tiny.json`"
    assert "`tiny` sizes" in lines[2] and tiny["qie"]["device"] in lines[2]
    medians = {(b["group"], b["extra_info"]["provider"]): b["stats"]["median"] for b in tiny["benchmarks"]}
    table = [_cells(x) for x in lines if x.startswith("| ") and not x.startswith("| shape")]
    assert len(table) == len(tiny["benchmarks"])
    for b, cells in zip(tiny["benchmarks"], table):  # the file's order
        e, t = b["extra_info"], b["stats"]["median"]
        shape, provider, ms, rate, frac, vs_base, rounds, iterations = cells
        assert (shape, provider, rounds, iterations) == (e["shape"], e["provider"], str(b["stats"]["rounds"]),
                                                         str(b["stats"]["iterations"]))
        assert float(ms) == pytest.approx(t * 1e3, abs=1e-4)
        value, unit = rate.split()
        assert unit == ("TFLOP/s" if "flops" in e else "GB/s")
        assert float(value) == pytest.approx(e["tflops" if "flops" in e else "gbs"], rel=6e-3)
        if e["frac_of_ceiling"] is None:  # no ceiling for this row on this device
            assert frac == "—", b["name"]
        else:
            assert re.fullmatch(r"\d+% of .+", frac) and int(frac.split("%")[0]) == round(100 * e["frac_of_ceiling"])
        base = medians.get((b["group"], e["baseline"]))
        assert vs_base == ("—" if base is None else f"{t / base:.2f}"), b["name"]
    ops = [x[2:-2] for x in lines if x.startswith("**")]
    assert ops == list(dict.fromkeys(b["extra_info"]["op"] for b in tiny["benchmarks"]))


def test_report_main_picks_up_benchmark_json(tiny, tmp_path, monkeypatch):
    """benchmarks.report reads results/*.json: a pytest-benchmark file there becomes its section of RESULTS.md."""
    from benchmarks import report
    here = tmp_path / "benchmarks"
    (here / "results").mkdir(parents=True)
    (here / "results" / "bench_kernels_tiny.json").write_text(json.dumps(tiny))
    (tmp_path / "README.md").write_text("no markers\n")
    monkeypatch.setattr(report, "HERE", here)
    report.main()
    text = (here / "RESULTS.md").read_text()
    assert "### Kernels (pytest-benchmark) — `bench_kernels_tiny.json`" in text
    from benchmarks.report_bench import bench_section
    assert "\n".join(bench_section("bench_kernels_tiny.json", tiny)) in text


@pytest.mark.gpu
def test_gpu_rows_record_per_call_device_time(tmp_path):
    """Two full-size rows (a compute-bound GEMM, a memory-bound kernel at 4K) timed by the suite agree with
    triton's do_bench of the same call within 10%, and stay under the ceilings measured in the same run."""
    import torch.nn.functional as F
    from triton.testing import do_bench
    from kernels import modulation as M
    suite = "benchmarks/test_bench_kernels.py::"
    d = run_suite(tmp_path / "b.json", suite + "test_gemm[mlp_up-bf16]",
                  suite + "test_modulation[norm_modulate-S53608-ours]", size="full")
    got = {b["extra_info"]["op"]: b for b in d["benchmarks"]}
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(8552, 3072, device="cuda", generator=g).bfloat16()
    w = (torch.randn(12288, 3072, device="cuda", generator=g) * 0.02).bfloat16()
    b = (torch.randn(12288, device="cuda", generator=g) * 0.02).bfloat16()
    h = torch.randn(1, 53608, 3072, device="cuda", generator=g).bfloat16()
    shift, scale = ((torch.randn(1, 2, 3072, device="cuda", generator=g) * 0.1).bfloat16() for _ in range(2))
    ref = {"gemm": do_bench(lambda: F.linear(x, w, b), warmup=25, rep=200, return_mode="median"),
           "norm_modulate": do_bench(lambda: M.norm_modulate(h, shift, scale, 53608 // 2), warmup=25, rep=200,
                                     return_mode="median")}
    for op, ms in ref.items():
        row = got[op]
        t = row["stats"]["median"] * 1e3
        print(f"\n{op}: suite {t:.4f} ms/call ({row['stats']['iterations']} per round), do_bench {ms:.4f} ms, "
              f"{100 * row['extra_info']['frac_of_ceiling']:.0f}% of {row['extra_info']['ceiling']}")
        assert t == pytest.approx(ms, rel=0.10), (op, t, ms)
        assert 0 < row["extra_info"]["frac_of_ceiling"] < 1.05, row["extra_info"]
