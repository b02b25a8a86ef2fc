"""Several GPUs, full-size random weights: one MMDiT step (the forward of one denoise step, as the loop runs
it) on one GPU vs split over the ranks with engine.parallel:
  1024_cfg  1024² edit with CFG (B=2: 4096 noisy + 4096 condition tokens, text rows of 360 and 300):
            one GPU batched vs cfg-parallel (a row per rank) and vs seq-parallel (both rows, half the tokens);
  4k        4K edit (3072x4096: 49152 noisy + 4096 condition tokens + 360 text = 53608), B=1:
            one GPU vs seq-parallel (Ulysses);
  4k_cfg    (--cases) the 4K edit with CFG: one GPU batched vs cfg-parallel vs seq-parallel.
Reported per case: ms per step (median of CUDA-event timings on rank 0), the speedup, TFLOP/s per GPU, the
split output's relative L2 error against the one-GPU output, and the all-to-all time of seq-parallel, both
inside the step (CUDA events around every exchange: the time the step spends there, waits included) and alone
(the same exchanges at the same sizes, nothing else running). The one-GPU rows run on rank 0 while the other
ranks wait at a barrier. Targets (issue 14): >= 1.9x for cfg at 1024², >= 1.85x for seq at 4K.
Run on the device machine (nvidia-h200-x2):
    torchrun --nproc-per-node 2 -m benchmarks.bench_parallel --out benchmarks/results/parallel_h200x2.json
CPU check of the same code (tiny model, gloo; tests/test_parallel.py runs it):
    torchrun --nproc-per-node 2 -m benchmarks.bench_parallel --tiny --out /tmp/parallel_tiny.json
"""
import argparse
import datetime
import os
import statistics
import time

import torch
import torch.distributed as dist

from engine.config import MMDiTConfig
from engine.models.mmdit import MMDiT, modulation_table
from engine.parallel.denoise import forward_all
from engine.parallel.world import World
from loaders import assign

FULL = MMDiTConfig()
TINY = MMDiTConfig(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48,
                   axes_dims_rope=(8, 12, 12))
CASES = {  # name: (noisy grid, condition grid, text length per row)
    "1024_cfg": ((64, 64), (64, 64), [360, 300]),
    "4k": ((192, 256), (64, 64), [360]),
    "4k_cfg": ((192, 256), (64, 64), [360, 300]),
}
TINY_CASES = {"1024_cfg": ((6, 5), (3, 4), [9, 5]), "4k": ((8, 9), (3, 4), [9])}


def inputs(cfg, case, device, dtype, table, seed=1):
    """(x, txt, txt_len, t, img_shapes): the same on every rank (same seed, same device kind)."""
    (h, w), (hc, wc), lens = table[case]
    g = torch.Generator(device).manual_seed(seed)
    B, N, L = len(lens), h * w + hc * wc, max(lens)
    x = torch.randn(B, N, cfg.in_channels, device=device, dtype=dtype, generator=g)
    txt = torch.randn(B, L, cfg.joint_attention_dim, device=device, dtype=dtype, generator=g)
    t = torch.full((B,), 0.5625, device=device, dtype=dtype)
    return x, txt, torch.tensor(lens), t, [(1, h, w), (1, hc, wc)]


def flops(cfg, case, table):
    (h, w), (hc, wc), lens = table[case]
    N, d = h * w + hc * wc, cfg.dim
    return sum(cfg.num_layers * (24 * d * d * (N + L) + 4 * (N + L) ** 2 * d) for L in lens)


def random_model(cfg, device, dtype, seed=0):
    """MMDiT with N(0, 0.02) weights (norm weights N(1, 0.1)) made on `device`: the same on every rank."""
    with torch.device("meta"):
        m = MMDiT(cfg)
    g = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, p in m.named_parameters():
        t = torch.empty(p.shape, dtype=dtype, device=device)
        t.normal_(1.0, 0.1, generator=g) if p.dim() == 1 and "norm" in name else t.normal_(0.0, 0.02, generator=g)
        state[name] = t
    return assign(m, state, "transformer").eval()


class Clock:
    """Wall time of a call: CUDA events on the GPU (no sync inside), perf_counter on the CPU."""

    def __init__(self, cuda):
        self.cuda = cuda

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, since):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            e.synchronize()
            return since.elapsed_time(e)
        return (time.perf_counter() - since) * 1000

    def median(self, fn, warmup=2, reps=5):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            dist.barrier()      # the ranks start each rep together
            s = self.start()
            fn()
            times.append(self.ms(s))
        return statistics.median(times)


class ExchangeTimer:
    """Times every exchange of a Ulysses instance during a forward (events recorded, read after)."""

    def __init__(self, uly, cuda):
        self.uly, self.cuda, self.spans, self.saved = uly, cuda, [], {}

    def __enter__(self):
        for name in ("to_heads", "to_tokens", "gather_heads"):
            fn = getattr(self.uly, name)
            self.saved[name] = fn
            setattr(self.uly, name, self._timed(fn))
        return self

    def _timed(self, fn):
        def run(*a):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                y = fn(*a)
                end.record()
                self.spans.append((start, end))
            else:
                t0 = time.perf_counter()
                y = fn(*a)
                self.spans.append((t0, time.perf_counter()))
            return y
        return run

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.uly, name, fn)

    def total_ms(self):
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.spans)
        return sum(b - a for a, b in self.spans) * 1000


def standalone_exchange_ms(uly, cfg, B, N, L, device, dtype, clock):
    """One step's exchanges alone: per block q/k/v to heads, the output back, the text heads gathered."""
    P, H, D = uly.size, cfg.num_attention_heads, cfg.attention_head_dim
    n = -(-N // P)
    qkv = [torch.randn(B, n + L, H, D, device=device, dtype=dtype) for _ in range(3)]
    joint = torch.empty(3, B, N + L, H // P, D, device=device, dtype=dtype)
    out = torch.randn(B, N + L, H // P, D, device=device, dtype=dtype)
    res = torch.empty(B, n + L, H, D, device=device, dtype=dtype)

    def step():
        for _ in range(cfg.num_layers):
            uly.to_heads(qkv, n, N, joint)
            uly.to_tokens(out, n, N, res)
            uly.gather_heads(out[:, N:], res[:, n:])
    return clock.median(step, warmup=1, reps=3)


def run_case(case, cfg, table, mm, worlds, device, dtype, clock, reps):
    x, txt, txt_len, t, shapes = inputs(cfg, case, device, dtype, table)
    rope = mm.rope(shapes, txt.shape[1], device)
    mods = modulation_table(mm, t[:1])[0]
    row = {"tokens": x.shape[1] + txt.shape[1], "rows": x.shape[0], "tflop": flops(cfg, case, table) / 1e12}
    rank = dist.get_rank()
    with torch.inference_mode():
        if rank == 0:   # one GPU: the loop's batched forward
            one = lambda: mm(x, txt, txt_len, t, shapes, rope=rope, mods=mods)  # noqa: E731
            for _ in range(2):
                one()
            times = []
            for _ in range(reps):
                s = clock.start()
                one()
                times.append(clock.ms(s))
            row["one_ms"] = statistics.median(times)
            want = one().float()
        dist.barrier()
        for name, world in worlds.items():
            if name == "cfg" and x.shape[0] != 2:
                continue
            fn = lambda: forward_all(world, mm, x, txt, txt_len, t, shapes, rope=rope, mods=mods)  # noqa: E731
            r = {"ms": clock.median(fn, reps=reps)}
            got = fn().float()
            if name == "seq":
                uly = mm._parallel.seq
                with ExchangeTimer(uly, clock.cuda) as timer:
                    dist.barrier()
                    fn()
                r["exchange_ms_in_step"] = timer.total_ms()
                rows = x.shape[0]
                r["exchange_ms_alone"] = standalone_exchange_ms(uly, cfg, rows, x.shape[1], txt.shape[1], device,
                                                                dtype, clock)
            if rank == 0:
                r["speedup"] = row["one_ms"] / r["ms"]
                r["tflops_per_gpu"] = row["tflop"] * 1e12 / r["ms"] / 1e9 / world.size
                r["rel_l2_vs_one"] = ((got - want).norm() / want.norm()).item()
                if "exchange_ms_in_step" in r:
                    r["exchange_share_of_step"] = r["exchange_ms_in_step"] / r["ms"]
            row[name] = r
    if rank == 0:
        row["one_tflops"] = row["tflop"] * 1e12 / row["one_ms"] / 1e9
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="1024_cfg,4k")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (gloo, float32): checks the code")
    args = ap.parse_args()
    cuda = not args.tiny
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=1800))
    P = dist.get_world_size()
    cfg, table = (FULL, CASES) if cuda else (TINY, TINY_CASES)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    worlds = {"seq": World("seq", 1, P, device, owns_group=False)}
    if P == 2:
        worlds["cfg"] = World("cfg", 2, 1, device, owns_group=False)
    t0 = time.perf_counter()
    mm = random_model(cfg, device, dtype)
    payload = {"env": _env(cuda), "ranks": P, "build_s": time.perf_counter() - t0, "cases": {}}
    clock = Clock(cuda)
    for case in args.cases.split(","):
        if case not in table:
            continue
        payload["cases"][case] = run_case(case, cfg, table, mm, worlds, device, dtype, clock, args.reps)
        if dist.get_rank() == 0:
            print(case, payload["cases"][case], flush=True)
    if dist.get_rank() == 0:
        from benchmarks.common import write_json
        write_json(args.out, payload)
    dist.barrier()
    dist.destroy_process_group()


def _env(cuda):
    if not cuda:
        return {"device": "cpu", "torch": torch.__version__}
    from benchmarks.common import env_info
    info = env_info()
    info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return info


if __name__ == "__main__":
    main()
