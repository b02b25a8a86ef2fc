"""fp8 activations on the GPU: what quantizing a GEMM input costs in plain torch vs inside our kernels, the block's
stages that way, and a full-width 3-block forward bf16 vs fp8-unfused vs fp8-fused.

Run from the repo root on the device machine (sm89+):
    python -m benchmarks.bench_fp8 --out benchmarks/results/fp8_<gpu>.json [--sections quant,gemm,stages,model]
        [--layers 3]

Shapes are the 1024² edit block's: S = 8552 tokens (8192 image + 360 text), C = 3072, MLP hidden 12288.
- quant: the producers of GEMM inputs at [S, C] and [S, 12288]: torch quantize_rows (+ F.gelu), our quantize /
  gelu_quantize kernels, norm_modulate and gated_residual_norm_modulate with bf16 vs fp8 output. GB/s counts each
  input read once and each output written once, next to the device-to-device copy ceiling.
- gemm: each block GEMM shape, bf16 F.linear vs torch._scaled_mm rowwise alone, vs measured ceilings (bf16 matmul,
  and _scaled_mm rowwise at 8192³).
- stages: the block's three GEMM-fed stages as the engine runs them, three ways: bf16; fp8 unfused (every Linear
  quantizes its input in torch: k8.fp8_linear on a bf16 tensor); fp8 fused (our kernels emit FP8Rows).
  attn_in = norm_modulate + q, k, v GEMMs; attn_out = attention output -> to_out; mlp = gated_residual_norm_modulate
  + up GEMM + GELU + down GEMM.
- model: MMDiT with `--layers` full-width blocks, B=1, zero_cond_t, modulation precomputed: bf16, fp8 with
  QIE_FP8_QUANT=torch (unfused), fp8 fused (default); ms per forward and rel L2 vs bf16.
Times: medians of CUDA-event-timed calls (benchmarks.common.time_ms), short calls looped 10x per event pair.
"""
import argparse
import os
import time
import traceback

import torch
import torch.nn.functional as F

from benchmarks.common import ceilings, env_info, fp8_ceiling, rel_l2, time_ms, write_json
from engine.config import MMDiTConfig
from engine.models.mmdit import MMDiT, modulation_table
from engine.transforms.fp8 import quantize_fp8
from kernels import fp8_linear as k8
from kernels import modulation as M
from kernels import quant_fp8 as Q8
from loaders import assign

S, N_IMG, TXT, C, HIDDEN = 8552, 8192, 360, 3072, 12288
BF16 = torch.bfloat16


def ms(fn, loop=10):
    """Median ms of one fn() call: `loop` calls between each pair of CUDA events."""
    def run():
        for _ in range(loop):
            fn()
    return time_ms(run, warmup=2, reps=15) / loop


def _rand(*shape, std=1.0):
    return torch.randn(*shape, device="cuda", dtype=BF16) * std


def bench_quant(rows, copy_gbs):
    x, y = _rand(1, S, C), _rand(1, S, C)
    gate, shift, scale = (_rand(1, C, std=0.5) for _ in range(3))
    h = _rand(S, HIDDEN, std=2.0)
    e = x.numel()   # elements at [S, C]
    cases = [  # (name, fn, bytes moved once: inputs read + outputs written)
        ("quantize_rows torch [S,C]", lambda: k8.quantize_rows(x[0]), 3 * e + 4 * S),
        ("quantize kernel [S,C]", lambda: Q8.quantize(x[0]), 3 * e + 4 * S),
        ("norm_modulate bf16 out", lambda: M.norm_modulate(x, shift, scale), 4 * e),
        ("norm_modulate fp8 out", lambda: M.norm_modulate(x, shift, scale, q_dtype=torch.float8_e4m3fn), 3 * e + 4 * S),
        ("gated_res_norm_mod bf16 out", lambda: M.gated_residual_norm_modulate(x, gate, y, shift, scale), 8 * e),
        ("gated_res_norm_mod fp8 out", lambda: M.gated_residual_norm_modulate(
            x, gate, y, shift, scale, q_dtype=torch.float8_e4m3fn), 7 * e + 4 * S),
        ("gelu+quantize_rows torch [S,4C]", lambda: k8.quantize_rows(F.gelu(h, approximate="tanh")), 12 * e + 4 * S),
        ("gelu_quantize 2 pass (4096, default)", lambda: Q8.gelu_quantize(h), 12 * e + 4 * S),
        ("gelu_quantize 1 pass (16384)", lambda: Q8.gelu_quantize(h, block_k=16384), 12 * e + 4 * S),
        ("gelu_quantize 2 pass (2048)", lambda: Q8.gelu_quantize(h, block_k=2048), 12 * e + 4 * S),
    ]
    # the launch parameters around the defaults: which the defaults should be on this GPU
    for bk in (2048, 4096, 8192, 16384):
        for nw in (4, 8, 16):
            cases.append((f"sweep gelu_quantize block_k {bk} warps {nw}",
                          lambda bk=bk, nw=nw: Q8.gelu_quantize(h, block_k=bk, num_warps=nw), 12 * e + 4 * S))
    for br in (1, 2, 4, 8):
        for nw in (2, 4, 8):
            cases.append((f"sweep quantize block_r {br} warps {nw}",
                          lambda br=br, nw=nw: Q8.quantize(x[0], block_r=br, num_warps=nw), 3 * e + 4 * S))
    for name, fn, nbytes in cases:
        try:
            t = ms(fn)
        except Exception as err:            # a sweep point that does not compile (registers) is skipped
            print(f"{name}: {type(err).__name__}: {str(err)[:120]}")
            continue
        rows.append({"section": "quant", "name": name, "ms": t, "gbs": nbytes / t / 1e6,
                     "frac_of_copy": nbytes / t / 1e6 / copy_gbs})


def _linear(n_in, n_out):
    w, b = _rand(n_out, n_in, std=0.02), _rand(n_out, std=0.02)
    q, s = k8.quantize_rows(w)
    return w, b, q, s


def bench_gemm(rows, ceil):
    for name, K, N in (("attn (q/k/v/out)", C, C), ("mlp_up", C, HIDDEN), ("mlp_down", HIDDEN, C)):
        x = _rand(S, K)
        w, b, q, s = _linear(K, N)
        xr = Q8.quantize(x)
        flops = 2 * S * K * N
        for provider, fn in (("bf16 F.linear", lambda: F.linear(x, w, b)),
                             ("fp8 _scaled_mm alone", lambda: k8.fp8_linear(xr, q, s, b)),
                             ("fp8 torch quant + _scaled_mm", lambda: k8.fp8_linear(x, q, s, b))):
            t = ms(fn)
            rows.append({"section": "gemm", "name": name, "provider": provider, "M": S, "K": K, "N": N, "ms": t,
                         "tflops": flops / t / 1e9, "frac_of_bf16_mm": flops / t / 1e9 / ceil["matmul_tflops"],
                         "frac_of_fp8_mm": flops / t / 1e9 / ceil["fp8_rowwise_tflops"]})


def bench_stages(rows):
    e4m3 = torch.float8_e4m3fn
    x, y = _rand(1, S, C), _rand(1, S, C)
    gate, shift, scale = (_rand(1, C, std=0.5) for _ in range(3))
    qkv = [_linear(C, C) for _ in range(3)]
    wo, bo, qo, so = _linear(C, C)
    w1, b1, q1, s1 = _linear(C, HIDDEN)
    w2, b2, q2, s2 = _linear(HIDDEN, C)
    stages = {
        "attn_in": (3 * 2 * S * C * C, {
            "bf16": lambda: [F.linear(a, w, b) for a in [M.norm_modulate(x, shift, scale)] for w, b, _, _ in qkv],
            "fp8 unfused": lambda: [k8.fp8_linear(a, q, s, b) for a in [M.norm_modulate(x, shift, scale)]
                                    for _, b, q, s in qkv],
            "fp8 fused": lambda: [k8.fp8_linear(a, q, s, b) for a in [M.norm_modulate(x, shift, scale, q_dtype=e4m3)]
                                  for _, b, q, s in qkv]}),
        "attn_out": (2 * S * C * C, {
            "bf16": lambda: F.linear(x, wo, bo),
            "fp8 unfused": lambda: k8.fp8_linear(x, qo, so, bo),
            "fp8 fused": lambda: k8.fp8_linear(Q8.quantize(x), qo, so, bo)}),
        "mlp": (2 * 2 * S * C * HIDDEN, {
            "bf16": lambda: F.linear(torch._addmm_activation(
                b1, M.gated_residual_norm_modulate(x, gate, y, shift, scale)[1][0], w1.t(), use_gelu=True), w2, b2),
            "fp8 unfused": lambda: k8.fp8_linear(F.gelu(k8.fp8_linear(
                M.gated_residual_norm_modulate(x, gate, y, shift, scale)[1], q1, s1, b1), approximate="tanh"),
                q2, s2, b2),
            "fp8 fused": lambda: k8.fp8_linear(Q8.gelu_quantize(k8.fp8_linear(
                M.gated_residual_norm_modulate(x, gate, y, shift, scale, q_dtype=e4m3)[1], q1, s1, b1)), q2, s2, b2)}),
    }
    for stage, (flops, providers) in stages.items():
        base = None
        for provider, fn in providers.items():
            t = ms(fn, loop=5)
            base = base or t
            rows.append({"section": "stages", "name": stage, "provider": provider, "ms": t,
                         "gemm_tflops_equiv": flops / t / 1e9, "speedup_vs_bf16": base / t})


def full_width_models(layers=3, seed=0, zero_cond_t=True):
    """(bf16 MMDiT, the same with fp8 block Linears) at full width (3072, 24 heads) with `layers` blocks on CUDA;
    random weights N(0, 0.02), norm weights N(1, 0.1), made on the GPU. The two share every tensor but the block
    Linears."""
    cfg = MMDiTConfig(num_layers=layers, zero_cond_t=zero_cond_t)
    with torch.device("meta"):
        bf16, fp8 = MMDiT(cfg), MMDiT(cfg)
    g = torch.Generator("cuda").manual_seed(seed)
    state = {}
    for name, p in bf16.named_parameters():
        t = torch.empty(p.shape, device="cuda", dtype=BF16)
        state[name] = t.normal_(1.0, 0.1, generator=g) if p.dim() == 1 and "norm" in name else t.normal_(0.0, 0.02,
                                                                                                         generator=g)
    assign(bf16, state, "random")
    assign(fp8, dict(state), "random")
    quantize_fp8(fp8)
    return bf16.eval(), fp8.eval()


def model_inputs(model, B=1, grids=((64, 64), (64, 64)), txt=TXT, seed=1):
    """(args, kwargs) for model(...): a noisy 64x64 latent grid and one condition image (8192 tokens), `txt`
    prompt tokens, t = 0.5625, the modulation precomputed as the pipelines do."""
    g = torch.Generator("cuda").manual_seed(seed)
    n = sum(h * w for h, w in grids)
    x = torch.randn(B, n, 64, device="cuda", dtype=BF16, generator=g)
    t_emb = torch.randn(B, txt, 3584, device="cuda", dtype=BF16, generator=g)
    t = torch.full((B,), 0.5625, device="cuda", dtype=BF16)
    with torch.inference_mode():
        mods = modulation_table(model, t[:1])[0]
    shapes = [(1, h, w) for h, w in grids]
    return (x, t_emb, torch.tensor([txt] * B), t, shapes), {"mods": mods}


def bench_model(rows, layers):
    bf16, fp8 = full_width_models(layers)
    args, kw = model_inputs(bf16)
    outs, base = {}, None
    for provider, model, quant in (("bf16", bf16, None), ("fp8 unfused", fp8, "torch"), ("fp8 fused", fp8, None)):
        old = os.environ.pop("QIE_FP8_QUANT", None)
        if quant:
            os.environ["QIE_FP8_QUANT"] = quant
        try:
            with torch.inference_mode():
                fn = lambda: model(*args, **kw)  # noqa: E731
                outs[provider] = fn()
                t = time_ms(fn, warmup=2, reps=10)
        finally:
            os.environ.pop("QIE_FP8_QUANT", None)
            if old is not None:
                os.environ["QIE_FP8_QUANT"] = old
        base = t if provider == "bf16" else base
        rows.append({"section": "model", "name": f"{layers} blocks S={S}", "provider": provider, "ms": t,
                     "ms_per_block": t / layers, "speedup_vs_bf16": base / t,
                     "rel_l2_vs_bf16": rel_l2(outs[provider], outs["bf16"])})


def table(ceil, rows):
    print(f"\nceilings: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, fp8 rowwise _scaled_mm "
          f"{ceil['fp8_rowwise_tflops']:.0f} TFLOP/s, HBM copy {ceil['copy_gbs']:.0f} GB/s")
    for r in rows:
        if "error" in r:
            print(f"{r['section']:<7} ERROR {r['error'][:100]}")
        elif r["section"] == "quant":
            print(f"quant  {r['name']:<37} {r['ms'] * 1e3:8.1f} us {r['gbs']:6.0f} GB/s ({r['frac_of_copy']:.0%} of copy)")
        elif r["section"] == "gemm":
            print(f"gemm   {r['name']:<17} {r['provider']:<30} {r['ms']:7.3f} ms {r['tflops']:6.0f} TFLOP/s "
                  f"({r['frac_of_bf16_mm']:.0%} of bf16 mm, {r['frac_of_fp8_mm']:.0%} of fp8 mm)")
        elif r["section"] == "stages":
            print(f"stage  {r['name']:<9} {r['provider']:<12} {r['ms']:7.3f} ms  x{r['speedup_vs_bf16']:.2f} vs bf16 "
                  f"({r['gemm_tflops_equiv']:.0f} GEMM-TFLOP/s)")
        else:
            print(f"model  {r['name']:<18} {r['provider']:<12} {r['ms']:8.2f} ms ({r['ms_per_block']:.2f} ms/block) "
                  f"x{r['speedup_vs_bf16']:.2f} vs bf16, rel L2 vs bf16 {r['rel_l2_vs_bf16']:.3e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", default="quant,gemm,stages,model")
    ap.add_argument("--layers", type=int, default=3)
    args = ap.parse_args()
    t0 = time.time()
    ceil = ceilings()
    ceil["fp8_rowwise_tflops"] = fp8_ceiling()
    rows = []
    sections = {"quant": lambda: bench_quant(rows, ceil["copy_gbs"]), "gemm": lambda: bench_gemm(rows, ceil),
                "stages": lambda: bench_stages(rows), "model": lambda: bench_model(rows, args.layers)}
    for name in args.sections.split(","):   # a failing section still leaves the others' rows
        try:
            sections[name]()
        except Exception as e:
            traceback.print_exc()
            rows.append({"section": name, "error": repr(e)})
        torch.cuda.empty_cache()
    out = {**env_info(), "ceilings": ceil, "seconds": round(time.time() - t0, 1), "rows": rows}
    write_json(args.out, out)
    table(ceil, rows)
    print(f"{out['gpu']}, torch {out['torch']}, triton {out['triton']}, {out['seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()
