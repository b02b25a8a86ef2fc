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


# ---- fp8 forward: compiled files merged per case; load report (synthetic payloads, no GPU) -------------

GiB = 2 ** 30


def _run(date, cases):
    return {"env": {"gpu": "GPU", "torch": "2.x", "triton": "3.x", "date": date},
            "ceilings": {"matmul_tflops": 700.0, "fp8_rowwise_tflops": 1300.0, "copy_gbs": 4000.0},
            "cases": {case: {k: {"ms": ms} for k, ms in rows.items()} for case, rows in cases.items()}}


FORWARD = _run("2026-12-02 04:47 UTC", {
    "1024_b1": dict(diffusers=400.0, ours_bf16=300.0, ours_fp8=240.0, ours_fp8_attention_fp8=260.0),
    "1024_b2": dict(diffusers=800.0, ours_bf16=600.0, ours_fp8=440.0, ours_fp8_attention_fp8=480.0),
    "4k_b1": dict(diffusers=5000.0, ours_bf16=4500.0, ours_fp8=4000.0, ours_fp8_attention_fp8=3500.0)})
# the older file has both 1024² cases (no torchao at B=2), the newer one B=2 alone with its own eager time
COMPILED = [("a_new.json", _run("2026-12-02 04:50 UTC", {
                "1024_b2": dict(diffusers=880.0, diffusers_compiled=700.0, torchao_fp8_compiled=572.0)})),
            ("b_old.json", _run("2026-12-02 02:44 UTC", {
                "1024_b1": dict(diffusers=500.0, diffusers_compiled=450.0, torchao_fp8_compiled=400.0),
                "1024_b2": dict(diffusers=1000.0, diffusers_compiled=830.0)}))]

LOAD = {"env": {"gpu": "GPU", "torch": "2.x", "date": "2026-12-02 04:35 UTC"}, "layers": 60, "bytes": 40 * 10 ** 9,
        "threads": 8, "chunk": 32 << 20, "dropped": True, "floor": {"seconds": 25.0, "gbs": 1.6},
        "load": {name: dict(seconds=s, peak_rss=int(rss * GiB), host_must=must * GiB, resident_blocks=blocks,
                            fingerprint=fp, rss_after_cuda_init=GiB, vram_allocated=20 * GiB)
                 for name, s, rss, must, blocks, fp in (("old resident", 50.0, 30, 12, 60, 7),
                                                        ("new resident", 28.0, 13.5, 12, 60, 7),
                                                        ("old 16 GiB", 52.0, 36, 26, 28, 8),
                                                        ("new 16 GiB", 32.0, 27, 26, 28, 9))},
        "forward_run": {"env": {"date": "2026-12-02 04:44 UTC"}},
        "forward": {"cuda_init": 0.01, "modulation_table_4_steps": 2.0,
                    "forward_0": 1.5, "forward_1": 0.6, "forward_2": 0.6, "forward_3": 0.6},
        "forward_warmed": {"warm_up": 4.0, "forward_0": 0.66, "forward_1": 0.6, "forward_2": 0.6, "forward_3": 0.6,
                           "attention_backends": {"key": "cudnn"}}}


def test_fp8_compiled_merge_newest_case_wins_against_its_own_eager():
    from benchmarks.report_fp8_forward import merge_compiled, readme_fp8_forward
    runs = merge_compiled(COMPILED)
    assert {case: name for case, (name, _) in runs.items()} == {"1024_b1": "b_old.json", "1024_b2": "a_new.json"}
    lines = readme_fp8_forward(FORWARD, runs)
    assert "1024² edit, B=1 from `b_old.json` (GPU, torch 2.x, 2026-12-02 02:44 UTC" in lines[0]
    assert "1024² edit, B=2 (CFG) from `a_new.json` (GPU, torch 2.x, 2026-12-02 04:50 UTC" in lines[0]
    assert "ratio of ratios" in lines[0]
    rows = {c[0]: c for c in (_cells(x) for x in lines if x.startswith("| ") and not x.startswith("| case"))}
    # compiled cells against the compiled file's eager; ours / torchao = (ours / forward eager) / (torchao / its eager)
    assert rows["1024² edit, B=1"][5:] == ["450 ms (0.90)", "400 ms (0.80)", "0.600 (missed)", "0.750 (met)"]
    assert rows["1024² edit, B=2 (CFG)"][5:] == ["700 ms (0.80)", "572 ms (0.65)", "0.550 (missed)", "0.846 (missed)"]
    assert rows["4K edit, B=1"][1:] == ["5000 ms", "4500 ms (0.90)", "4000 ms (0.80)", "3500 ms (0.70)",
                                        "not measured", "not measured", "0.700 (missed)", "not measured"]


def test_report_main_merges_every_compiled_file_and_fills_load(tmp_path, monkeypatch):
    from benchmarks import report
    here = tmp_path / "benchmarks"
    (here / "results").mkdir(parents=True)
    for name, d in COMPILED:
        (here / "results" / f"fp8_compiled_{name}").write_text(json.dumps(d))
    (here / "results" / "fp8_forward_x.json").write_text(json.dumps(FORWARD))
    (here / "results" / "load_x.json").write_text(json.dumps(LOAD))
    (tmp_path / "README.md").write_text("a\n<!-- FP8:start -->\nold\n<!-- FP8:end -->\nb\n"
                                        "<!-- LOAD:start -->\n<!-- LOAD:end -->\nc\n")
    monkeypatch.setattr(report, "HERE", here)
    report.main()
    readme = (tmp_path / "README.md").read_text()
    assert "\nold\n" not in readme and readme.startswith("a\n") and readme.endswith("<!-- LOAD:end -->\nc\n")
    assert "| 1024² edit, B=2 (CFG) | 800 ms |" in readme and "572 ms (0.65)" in readme and "400 ms (0.80)" in readme
    assert "| new resident | 28.0 |" in readme
    assert "### Loading from disk and the first forward — `load_x.json`" in (here / "RESULTS.md").read_text()


def test_load_report_rows_and_first_forward():
    from benchmarks.report_load import load_section, readme_load
    lines = readme_load(LOAD)
    assert lines[0].startswith("GPU, torch 2.x, 2026-12-02 04:35 UTC; 40.0 GB on disk")
    assert "read floor 25.0 s = 1.60 GB/s (the same files read with the reader's 8 threads and 32 MiB reads" in lines[0]
    rows = {c[0]: c[1:] for c in (_cells(x) for x in lines if x.startswith("| ") and not x.startswith("| case"))}
    # s, GB/s = 40 GB / s, s / 25 s floor, peak RSS against host must + 2 GiB, blocks, fingerprint against old's
    assert rows == {
        "old resident": ["50.0", "0.80", "2.00 (missed)", "30.00 (missed)", "12.00 + 2 = 14.00", "60/60", "—"],
        "new resident": ["28.0", "1.43", "1.12 (met)", "13.50 (met)", "12.00 + 2 = 14.00", "60/60", "yes"],
        "old 16 GiB": ["52.0", "0.77", "2.08 (missed)", "36.00 (missed)", "26.00 + 2 = 28.00", "28/60", "—"],
        "new 16 GiB": ["32.0", "1.25", "1.28 (missed)", "27.00 (met)", "26.00 + 2 = 28.00", "28/60", "**no**"]}
    first = [x for x in lines if x.startswith("- ")]
    assert len(first) == 2 and "2026-12-02 04:44 UTC" in lines[lines.index(first[0]) - 2]
    assert first[0].startswith("- `forward`, nothing warmed: forwards 1.500, 0.600, 0.600, 0.600 s; first / second "
                               "2.50 (target ≤ 1.2: missed), first − second +0.900 s; CUDA init 0.010 s, "
                               "modulation table (4 steps) 2.000 s")
    assert "first / second 1.10 (target ≤ 1.2: met)" in first[1] and "warm_up 4.000 s" in first[1]
    assert first[1].endswith("; attention backend cudnn")
    section = load_section("load_x.json", LOAD)
    assert section[0] == "### Loading from disk and the first forward — `load_x.json`"
    assert ("| new resident | 28.0 | 1.43 | 1.12 (met) | 13.50 (met) | 12.00 + 2 = 14.00 | 60/60 | yes | 1.00 | 20.00 "
            "| 7 |") in section


TRACE = {"argv": ["edit", "--model", "M"], "env": {"gpu": "GPU", "torch": "2.x", "date": "2026-12-02 05:07 UTC"},
         "snapshot": "12 blocks", "checkouts": {"old": "before", ".": "after"},
         "runs": [dict(case="old", root="old", flags=[], wall_s=25.0, start_s=0.1, main_s=24.0, stage_sum_s=12.0,
                       main_outside_stages_s=12.0, teardown_s=0.9, denoise=None),
                  dict(case="new_exit", root=".", flags=["fast-exit"], wall_s=14.0, start_s=0.1, main_s=13.4,
                       stage_sum_s=7.5, main_outside_stages_s=5.9, teardown_s=0.5,
                       denoise={"table": 0.0, "steps": [0.26, 0.13, 0.13, 0.13]}),
                  dict(case="broken", error="Traceback\nRuntimeError: boom")]}


def test_trace_report_rows():
    from benchmarks.report_serve import readme_serve, readme_trace
    lines = readme_trace(TRACE)
    assert lines[0].startswith("GPU, torch 2.x, 2026-12-02 05:07 UTC; `cli.py edit --model M`") and "12 blocks" in lines[0]
    assert "- `old`: before" in lines and "- `.`: after" in lines
    rows = {c[0]: c[1:] for c in (_cells(x) for x in lines if x.startswith("| ") and not x.startswith("| run"))}
    assert rows["old"] == ["`old`", "25.00", "0.10", "24.00", "12.00", "12.00", "0.90", "–", "not printed", "–"]
    # first / later = 0.26 / mean(0.13, 0.13, 0.13)
    assert rows["new_exit"] == ["`.` (fast-exit)", "14.00", "0.10", "13.40", "7.50", "5.90", "0.50", "0.00",
                                "0.26 0.13 0.13 0.13", "2.00"]
    assert rows["broken"][1] == "failed: RuntimeError: boom"
    serve = {"env": TRACE["env"], "size": 1024, "steps": 4,
             "serve": {"start_s": 20.0, "rss_ready": GiB, "edit": {"first_s": 2.2, "median_s": 1.7267,
                                                                   "stage_sum_s": 1.5, "ratio": 1.1511},
                       "bad": {"right": 25, "requests": 25, "health_ready": True, "rss_after": GiB}}}
    text = "\n".join(readme_serve(serve))
    assert "latency / compute 1.151 (target ≤ 1.15: missed)" in text and "health ready after: yes" in text
