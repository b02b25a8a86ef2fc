"""pytest-benchmark harness for the kernel suite (benchmarks/test_bench_kernels.py).

    python -m pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results/bench_kernels_<gpu>.json

Sizes: QIE_BENCH_SIZE=full (the model's shapes; default with CUDA) or tiny (a few dozen tokens; default
without CUDA, where the Triton kernels run under TRITON_INTERPRET=1 so CI keeps every row alive).

What pytest-benchmark records is per-call device time: the `benchmark` marker added below swaps its timer for
`device_clock` (CUDA events on the GPU's timeline, read after the queue drains), and `bench` runs each row
through `benchmark.pedantic` with `iterations` calls per round, which pytest-benchmark divides out. Every row's
TFLOP/s or GB/s and the ceiling it is held against, measured once in this session, go into `extra_info`.
"""
import math
import os
import platform
import statistics
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # before any kernels module is imported: they read it at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = Path(__file__).parent
CUDA = torch.cuda.is_available()
MODE = os.environ.get("QIE_BENCH_SIZE", "full" if CUDA else "tiny")
DEVICE = "cuda" if CUDA else "cpu"
_SESSION = {}  # ceilings and environment, for the JSON hooks below


def device_clock():
    """Seconds on the GPU's timeline since the first call (an event recorded and waited for), so that the
    difference of two calls is the device time of the work queued between them; wall time without CUDA."""
    if not CUDA:
        return time.perf_counter()
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    e.synchronize()
    start = _SESSION.setdefault("clock_start", e)
    return start.elapsed_time(e) / 1e3


def per_call_s(fn, calls=1, rounds=3):
    """Median seconds of one fn() over `rounds` rounds of `calls` back-to-back calls (device_clock)."""
    times = []
    for _ in range(rounds):
        t0 = device_clock()
        for _ in range(calls):
            fn()
        times.append((device_clock() - t0) / calls)
    return statistics.median(times)


def env_info():
    import triton
    return {"device": torch.cuda.get_device_name() if CUDA else f"cpu ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "mode": MODE, "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}


def _warm(fn, seconds=0.5 if CUDA else 0.0):
    """Run fn for `seconds` (at least twice) so that the GPU's clocks have ramped up before a ceiling is timed."""
    t0 = time.perf_counter()
    fn(), fn()
    while time.perf_counter() - t0 < seconds:
        per_call_s(fn, calls=10, rounds=1)


def _fp8_tflops(n, rowwise):
    a = torch.randn(n, n, device=DEVICE).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=DEVICE).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
    sa, sb = ((torch.ones(n, 1, device=DEVICE), torch.ones(1, n, device=DEVICE)) if rowwise
              else (torch.ones((), device=DEVICE), torch.ones((), device=DEVICE)))
    fn = lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
    _warm(fn)
    return 2 * n ** 3 / per_call_s(fn, calls=10 if CUDA else 1, rounds=5) / 1e12


def measure_ceilings():
    """bf16 matmul TFLOP/s (n³), fp8 e4m3 torch._scaled_mm TFLOP/s (rowwise and per-tensor scales), and copy
    GB/s (bytes read + written), measured now: n = 8192 and 512 MiB on the GPU, small sizes on the CPU."""
    n, copy_elems = (8192, 1 << 28) if CUDA else (256, 1 << 22)
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    mm = lambda: a @ b  # noqa: E731
    _warm(mm)
    out = {"matmul_bf16_tflops": 2 * n ** 3 / per_call_s(mm, calls=10 if CUDA else 1, rounds=5) / 1e12}
    for key, rowwise in (("matmul_fp8_rowwise_tflops", True), ("matmul_fp8_tensor_tflops", False)):
        try:  # no fp8 GEMM before sm89; on the CPU the fp8 rows run the bf16 reference, held to the bf16 peak
            out[key] = _fp8_tflops(n, rowwise) if CUDA else None
        except (RuntimeError, NotImplementedError):
            out[key] = None
    src = torch.randn(copy_elems, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    cp = lambda: dst.copy_(src)  # noqa: E731
    cp(), cp()
    out["copy_gbs"] = 2 * src.numel() * src.element_size() / per_call_s(cp, calls=20 if CUDA else 1, rounds=5) / 1e9
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    """Tiny CPU rows: one thread is as fast, and 2 OpenMP threads on a shared 2-core CI machine run several
    times slower while a neighbour holds a core (tests/conftest.py's one_thread, for the same reason)."""
    n = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ceilings():
    if "ceilings" not in _SESSION:
        _SESSION["ceilings"] = measure_ceilings()
    return _SESSION["ceilings"]


CEILING_KEY = {"matmul_bf16": "matmul_bf16_tflops", "matmul_fp8": "matmul_fp8_rowwise_tflops", "copy": "copy_gbs"}


def _plan(t):
    """(iterations, rounds) for a call of t seconds: rounds of >= 20 ms on the GPU (2 ms on the CPU), so
    launch gaps and the clock's own wait are amortised; about 2 s per row on the GPU, at least 3 rounds."""
    round_s, budget_s, lo, hi = (0.02, 2.0, 3, 15) if MODE == "full" else (0.002, 0.2, 2, 3)
    iterations = max(1, min(1000, math.ceil(round_s / max(t, 1e-7))))
    rounds = max(lo, min(hi, int(budget_s / (iterations * max(t, 1e-7)))))
    return iterations, rounds


@pytest.fixture
def bench(benchmark, ceilings):
    """bench(fn, op=, provider=, shape=, flops= | nbytes=, ceiling=, baseline=, **info): time fn() through
    benchmark.pedantic and record rates, the ceiling and the environment in benchmark.extra_info."""
    def run(fn, *, op, provider, shape, ceiling, baseline, flops=None, nbytes=None, **info):
        assert (flops is None) != (nbytes is None), "a row is compute-bound (flops) or memory-bound (nbytes)"
        for _ in range(2):  # compile, autotune, cuDNN plans
            fn()
        single = per_call_s(fn)
        iterations, rounds = _plan(single)
        benchmark.group = f"{op} {shape}"
        benchmark.extra_info.update(op=op, provider=provider, shape=shape, baseline=baseline, **info,
                                    single_call_ms=single * 1e3, **env_info(), ceilings=ceilings)
        benchmark.pedantic(fn, rounds=rounds, iterations=iterations)
        if benchmark.stats is None:  # --benchmark-disable: fn ran once, nothing was timed
            return
        t = benchmark.stats.stats.median  # seconds per call
        rate, unit = (flops / t / 1e12, "tflops") if flops is not None else (nbytes / t / 1e9, "gbs")
        peak = ceilings[CEILING_KEY[ceiling]]
        benchmark.extra_info.update({"flops" if flops is not None else "bytes": flops or nbytes, unit: rate,
                                     "ceiling": CEILING_KEY[ceiling], "ceiling_value": peak,
                                     "frac_of_ceiling": rate / peak if peak else None})
    return run


def pytest_collection_modifyitems(config, items):
    """This folder's benchmarks read device_clock; items elsewhere in the session are left alone."""
    for item in items:
        if HERE in Path(str(item.fspath)).parents and "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark(timer=device_clock))


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["qie"] = env_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["qie"] = dict(env_info(), ceilings=_SESSION.get("ceilings"))
