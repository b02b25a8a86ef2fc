"""Kernel benchmark on the GPU: measured ceilings, attention vs torch SDPA backends, modulation/rope vs torch.

Run from the repo root:  python -m benchmarks.bench_kernels --out benchmarks/results/kernels_<gpu>.json
  --sweep   also time every attention block config, TMA and pointer K/V loads, at S=8552 (no autotune)
  --quick   S=8552 only
  --sections attention,memory,gemm,sweep   only these

Every number carries its ceiling: attention TFLOP/s (4*B*H*S*S_valid*D flops) next to the bf16 matmul rate
(torch.mm 8192^3), memory-bound kernels GB/s (bytes each tensor must move once) next to a device-to-device
copy counting read + write. Times are triton.testing.do_bench medians; a call slower than 0.5 s (SDPA
mem-efficient at S=53608) is timed 3 times with events instead, to bound the run.
The memory-bound kernels run at the first and last S (8552, 53608). The block's cuBLAS GEMMs are timed
at their real shapes too, against the same matmul ceiling.
"""
import argparse
import datetime
import json
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from kernels import attention as A
from kernels import modulation as M
from benchmarks.common import ceilings as measured_ceilings
from benchmarks.common import time_ms
from kernels import qk_rope as R

B, H, D, C = 1, 24, 128, 3072
DEV, DTYPE = "cuda", torch.bfloat16  # module constants so a CPU dry run can shrink them
SEQS = (8552, 9550, 53608)  # 1024^2 edit (2509/2511 text), original Edit text length, 4K edit
TEXT_PAD = 200  # masked runs: the last 200 keys are padding (kv_len = S - 200)
ROUNDS = 3  # attention: each provider timed this many times, interleaved; the median counts


def ms(fn, slow_s=0.5):
    """Median milliseconds of fn() on the GPU: do_bench for short calls, 3 timed calls for slow ones."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    if time.perf_counter() - t0 > slow_s:
        return time_ms(fn, warmup=0, reps=3)
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def median_ms(fn):
    """Median of ROUNDS ms() calls: one call alone can catch the clocks still ramping up."""
    return sorted(ms(fn) for _ in range(ROUNDS))[ROUNDS // 2]


def ceilings():
    c = measured_ceilings()  # the same measurement bench_e2e uses
    return {"matmul_bf16_tflops": c["matmul_tflops"], "copy_gbs": c["copy_gbs"]}


def _sdpa(backend, qt, kt, vt, mask=None):
    if backend is None:
        return lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return run


def bench_attention(seqs, rows):
    for S in seqs:
        q, k, v = (torch.randn(B, S, H, D, device=DEV, dtype=DTYPE) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # SDPA's own [B, H, S, D] layout
        for masked in (False, True):
            valid = S - TEXT_PAD if masked else S
            kv_len = torch.full((B,), valid, device=DEV, dtype=torch.int32) if masked else None
            mask = (torch.arange(S, device=DEV) < valid)[None, None, None, :] if masked else None
            flops = 4 * B * H * S * valid * D
            providers = {"ours": lambda: A.attention(q, k, v, kv_len=kv_len)}
            if masked:
                providers.update({"sdpa_masked": _sdpa(None, qt, kt, vt, mask),
                                  "sdpa_masked_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION, qt, kt, vt, mask),
                                  "sdpa_masked_efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION, qt, kt, vt, mask)})
            else:
                providers.update({"sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION, qt, kt, vt),
                                  "sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION, qt, kt, vt),
                                  "sdpa_efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION, qt, kt, vt)})
            rounds = {name: [] for name in providers}
            for _ in range(ROUNDS):  # providers alternate, so clock and power drift hit each alike
                for name, fn in providers.items():
                    if isinstance(rounds[name], Exception):
                        continue
                    try:
                        rounds[name].append(ms(fn))
                    except Exception as e:  # a backend that refuses the inputs, or runs out of memory
                        rounds[name] = e
                    torch.cuda.empty_cache()
            times = {}
            for name in providers:
                row = {"op": "attention", "S": S, "masked": masked, "kv_len": valid, "provider": name}
                try:
                    if isinstance(rounds[name], Exception):
                        raise rounds[name]
                    t = sorted(rounds[name])[len(rounds[name]) // 2]
                    times[name] = t
                    row.update(ms=t, tflops=flops / t / 1e9, rounds_ms=rounds[name])
                    if name == "ours":
                        c = A._attn_fwd.best_config
                        row["config"] = (f"BM{c.kwargs['BLOCK_M']} BN{c.kwargs['BLOCK_N']} w{c.num_warps} "
                                         f"s{c.num_stages}")
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
            for row in rows[-len(providers):]:
                if "ms" in row and "ours" in times and row["provider"] != "ours":
                    row["ours_speedup"] = row["ms"] / times["ours"]
        del q, k, v, qt, kt, vt
        torch.cuda.empty_cache()


# (BLOCK_M, BLOCK_N, num_warps, num_stages, tma)
SWEEP = [(128, 128, 8, 3, True), (128, 128, 8, 2, True), (128, 64, 8, 3, True), (128, 64, 8, 4, True),
         (128, 64, 4, 3, True), (64, 64, 4, 3, True), (128, 128, 8, 3, False), (128, 64, 8, 3, False)]


def bench_sweep(rows):
    """Every attention block config at S=SEQS[0], no autotune; then the memory-bound kernels' block shapes."""
    S = SEQS[0]
    q, k, v = (torch.randn(B, S, H, D, device=DEV, dtype=DTYPE) for _ in range(3))
    flops = 4 * B * H * S * S * D
    for bm, bn, w, st, tma in SWEEP:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
        row = {"op": "attention_sweep", "S": S, "tma": tma, **cfg}
        try:
            t = ms(lambda: A._launch(q, k, v, tma=tma, config=cfg))
            row.update(ms=t, tflops=flops / t / 1e9)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
    del q, k, v
    x, y = (torch.randn(B, S, C, device=DEV, dtype=DTYPE) for _ in range(2))
    gate, shift, scale = (torch.randn(B, 2, C, device=DEV, dtype=DTYPE) * 0.1 for _ in range(3))
    n = x.numel() * x.element_size()
    for block_r in (1, 2, 4, 8):
        for w in (4, 8, 16):
            for op, nbytes, residual in (("norm_modulate", 2 * n, False), ("gated_residual_norm_modulate", 4 * n, True)):
                t = ms(lambda: M._launch(x, y, gate, shift, scale, S // 2, 1e-6, residual, True, block_r, w))
                rows.append({"op": op + "_sweep", "S": S, "block": block_r, "num_warps": w, "ms": t,
                             "gbs": nbytes / t / 1e6})
    kx = torch.randn(B, S, 3 * H * D, device=DEV, dtype=DTYPE)[..., H * D:2 * H * D].unflatten(-1, (H, D))
    wt = torch.rand(D, device=DEV, dtype=DTYPE) + 0.5
    cos, sin = torch.rand(S, D // 2, device=DEV), torch.rand(S, D // 2, device=DEV)
    for block_t in (1, 2, 4):
        for w in (2, 4, 8):
            t = ms(lambda: R._launch(kx, wt, cos, sin, 1e-6, block_t=block_t, num_warps=w))
            rows.append({"op": "rms_norm_rope_sweep", "S": S, "block": block_t, "num_warps": w, "ms": t,
                         "gbs": 2 * n / t / 1e6})


def bench_memory_bound(seqs, rows, copy_gbs):
    for S in seqs:
        split = S // 2  # zero_cond_t: first half the t set, second half the t=0 set
        x, y = (torch.randn(B, S, C, device=DEV, dtype=DTYPE) for _ in range(2))
        gate, shift, scale = (torch.randn(B, 2, C, device=DEV, dtype=DTYPE) * 0.1 for _ in range(3))
        idx = (torch.arange(S, device=DEV) >= split).long()

        def eager_norm_mod(h):  # what a plain bf16 torch block does
            return F.layer_norm(h, (C,), eps=1e-6) * (1 + scale[:, idx]) + shift[:, idx]

        def eager_res():
            return x + gate[:, idx] * y

        def eager_fused():
            h = eager_res()
            return h, eager_norm_mod(h)

        qkv = torch.randn(B, S, 3 * H * D, device=DEV, dtype=DTYPE)
        kx = qkv[..., H * D:2 * H * D].unflatten(-1, (H, D))  # strided view of the fused projection
        w = torch.rand(D, device=DEV, dtype=DTYPE) + 0.5
        ang = torch.rand(S, D // 2, device=DEV) * 6
        cos, sin = ang.cos(), ang.sin()
        n = B * S * C * 2  # bytes of one [B, S, C] bf16 tensor
        ops = {
            "norm_modulate": (2 * n, lambda: M.norm_modulate(x, shift, scale, split),
                              lambda: M.norm_modulate_ref(x, shift, scale, split), lambda: eager_norm_mod(x)),
            "gated_residual": (3 * n, lambda: M.gated_residual(x, gate, y, split),
                               lambda: M.gated_residual_ref(x, gate, y, split), eager_res),
            "gated_residual_norm_modulate": (
                4 * n, lambda: M.gated_residual_norm_modulate(x, gate, y, shift, scale, split),
                lambda: M.gated_residual_norm_modulate_ref(x, gate, y, shift, scale, split), eager_fused),
            "rms_norm_rope": (2 * n, lambda: R.rms_norm_rope(kx, w, cos, sin),
                              lambda: R.rms_norm_rope_ref(kx, w, cos, sin), None),
        }
        dst = torch.empty_like(x)
        t = median_ms(lambda: dst.copy_(x))
        rows.append({"op": "copy_same_size", "S": S, "C": C, "provider": "torch", "ms": t, "gbs": 2 * n / t / 1e6,
                     "frac_of_copy": 2 * n / t / 1e6 / copy_gbs})
        for op, (nbytes, ours, ref, eager) in ops.items():
            pairs = [(ms(lambda: dst.copy_(x)), ms(ours)) for _ in range(ROUNDS)]  # interleaved with a copy
            t = sorted(p[1] for p in pairs)[ROUNDS // 2]
            c = sorted(p[0] for p in pairs)[ROUNDS // 2]
            row = {"op": op, "S": S, "C": C, "split": None if op == "rms_norm_rope" else split, "provider": "ours",
                   "ms": t, "gbs": nbytes / t / 1e6, "frac_of_copy": nbytes / t / 1e6 / copy_gbs,
                   "copy_ms_interleaved": c, "frac_of_interleaved_copy": (nbytes / t) / (2 * n / c)}
            row["torch_ref_ms"] = ms(ref)
            row["speedup_vs_ref"] = row["torch_ref_ms"] / t
            if eager is not None:
                row["torch_eager_bf16_ms"] = ms(eager)
                row["speedup_vs_eager"] = row["torch_eager_bf16_ms"] / t
            rows.append(row)
        del x, y, qkv, dst
        torch.cuda.empty_cache()


# rows M of the block's linears: image tokens at B=1 / B=2 (1024² edit), 4K image tokens, text at B=1 / B=2
GEMM_ROWS = (8192, 16384, 53248, 360, 720)


def bench_gemms(rows):
    """The MMDiT block's linears on cuBLAS (bias in the epilogue, GELU too for the MLP's first): how far from
    the 8192³ matmul ceiling each shape runs, and whether one q|k|v GEMM beats three."""
    def lin(n_in, n_out):
        return (torch.randn(n_out, n_in, device=DEV, dtype=DTYPE) * 0.02,
                torch.randn(n_out, device=DEV, dtype=DTYPE) * 0.02)
    w3, b3 = lin(C, 3 * C)
    w1, b1 = lin(C, 4 * C)
    w2, b2 = lin(4 * C, C)
    wq, bq = w3[:C], b3[:C]
    for Mr in GEMM_ROWS:
        x = torch.randn(Mr, C, device=DEV, dtype=DTYPE)
        h = torch.randn(Mr, 4 * C, device=DEV, dtype=DTYPE)
        cases = {"q|k|v x3": (3 * C, C, lambda: [F.linear(x, w3[i * C:(i + 1) * C], b3[i * C:(i + 1) * C])
                                                  for i in range(3)]),
                 "qkv fused": (3 * C, C, lambda: F.linear(x, w3, b3)),
                 "out": (C, C, lambda: F.linear(x, wq, bq)),
                 "mlp_up+gelu": (4 * C, C, lambda: torch._addmm_activation(b1, x, w1.t(), use_gelu=True)),
                 "mlp_down": (C, 4 * C, lambda: F.linear(h, w2, b2))}
        for name, (N, K, fn) in cases.items():
            t = ms(fn)
            rows.append({"op": "gemm", "name": name, "M": Mr, "N": N, "K": K, "ms": t,
                         "tflops": 2 * Mr * N * K / t / 1e9})
        del x, h


def table(ceil, rows):
    print(f"\nceilings: bf16 matmul {ceil['matmul_bf16_tflops']:.0f} TFLOP/s, HBM copy {ceil['copy_gbs']:.0f} GB/s")
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<30} S={r['S']:<6} {r.get('provider', '')} ERROR {r['error'][:80]}")
        elif r["op"] == "attention":
            extra = f"  ours x{r['ours_speedup']:.2f}" if "ours_speedup" in r else f"  {r.get('config', '')}"
            print(f"attention S={r['S']:<6} {'mask' if r['masked'] else 'full'} {r['provider']:<22}"
                  f"{r['ms']:9.3f} ms {r['tflops']:6.0f} TFLOP/s"
                  f" ({r['tflops'] / ceil['matmul_bf16_tflops']:.0%} of mm){extra}")
        elif r["op"] == "attention_sweep":
            print(f"sweep S={r['S']} tma={r['tma']!s:<5} BM{r['BLOCK_M']} BN{r['BLOCK_N']} w{r['num_warps']} "
                  f"s{r['num_stages']} {r['ms']:8.3f} ms {r['tflops']:6.0f} TFLOP/s")
        elif r["op"] == "gemm":
            print(f"gemm {r['name']:<14} M={r['M']:<6} N={r['N']:<6} K={r['K']:<6} {r['ms']:8.3f} ms "
                  f"{r['tflops']:6.0f} TFLOP/s ({r['tflops'] / ceil['matmul_bf16_tflops']:.0%} of mm)")
        elif r["op"].endswith("_sweep"):
            print(f"{r['op']:<36} S={r['S']} block={r['block']} w{r['num_warps']:<3} {r['ms'] * 1e3:7.1f} us "
                  f"{r['gbs']:6.0f} GB/s ({r['gbs'] / ceil['copy_gbs']:.0%} of copy)")
        elif r["op"] == "copy_same_size":
            print(f"{'copy (same size)':<30} S={r['S']:<6} {r['ms'] * 1e3:8.1f} us {r['gbs']:6.0f} GB/s "
                  f"({r['frac_of_copy']:.0%} of copy)")
        else:
            eager = f" eager x{r['speedup_vs_eager']:.2f}" if "speedup_vs_eager" in r else ""
            print(f"{r['op']:<30} S={r['S']:<6} {r['ms'] * 1e3:8.1f} us {r['gbs']:6.0f} GB/s "
                  f"({r['frac_of_copy']:.0%} of copy, {r['frac_of_interleaved_copy']:.0%} of the interleaved "
                  f"same-size copy)  ref x{r['speedup_vs_ref']:.2f}{eager}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", default="", help="comma list of attention,memory,gemm,sweep (default: all "
                    "but sweep, which --sweep adds)")
    args = ap.parse_args()
    seqs = SEQS[:1] if args.quick else SEQS
    t0 = time.time()
    ceil = ceilings()
    rows = []
    sections = {"attention": lambda: bench_attention(seqs, rows),
                "memory": lambda: bench_memory_bound(seqs[:1] + seqs[-1:], rows, ceil["copy_gbs"]),
                "gemm": lambda: bench_gemms(rows), "sweep": lambda: bench_sweep(rows)}
    chosen = args.sections.split(",") if args.sections else [n for n in sections if n != "sweep" or args.sweep]
    for section in (sections[n] for n in chosen):  # a failing section still leaves the others' rows in the JSON
        try:
            section()
        except Exception:
            traceback.print_exc()
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "ceilings": ceil, "seconds": round(time.time() - t0, 1), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    table(ceil, rows)
    print(f"{out['gpu']}, torch {out['torch']}, triton {out['triton']}, {out['seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()
