"""Loading the full-size transformer from disk, and the first forward after it.

Writes a random full-size snapshot in the real sharded layout (transformer/ in 5 GB shards with
diffusion_pytorch_model.safetensors.index.json, a full-size VAE, the scheduler and configs), drops the page
cache before each measurement, then reports, each case in a fresh process:
  floor       the same transformer files read with the reader's threads and chunk size (no destination)
  old / new   load_models (transformer + VAE) through safe_open (QIE_READER=safe_open: host state dict, then
              placed) against loaders.fast_read (placed first, read straight to the GPU / pinned buffers),
              resident and under a --plan-gib plan; seconds, GB/s, ratio to the floor (target <= 1.2), peak
              host RSS against the bytes that must stay on the host + 2 GiB, and a fingerprint of every tensor
              (old and new must agree)
  forward     the first MMDiT forward (1 MP edit, B=2, 4 steps' modulation table first) against later ones, in
              a fresh process after a warm run (on-disk kernel choices present); again with each first-call cost
              timed on its own (attributed), and after load_models' warm_up (warmed: the CLI runs it while the
              weights are read, so it costs the edit nothing)

    python benchmarks/bench_load.py --dir /root/qie_load --out benchmarks/results/load_h200.json
    python benchmarks/bench_load.py --dir /root/qie_load --layers 12 --out /tmp/load_small.json   # a quick look

The snapshot is kept (--dir) and reused when complete; --skip writes nothing new.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2 ** 30
SHARD = 5 * 10 ** 9
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                 max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False,
                 time_shift_type="exponential", use_beta_sigmas=False, use_dynamic_shifting=True,
                 use_exponential_sigmas=False, use_karras_sigmas=False)   # Qwen-Image-Edit's scheduler_config


# ---- the snapshot -------------------------------------------------------------------------------------

def _random(shape, name, g):
    t = torch.empty(shape, dtype=torch.bfloat16, device=g.device)
    return t.normal_(1.0, 0.1, generator=g) if len(shape) == 1 and "norm" in name else t.normal_(0.0, 0.02, generator=g)


def write_safetensors(path, shapes, seed, device="cuda"):
    """One .safetensors file of random bf16 tensors {key: shape}, made on `device` a tensor at a time (no host
    copy of the whole shard)."""
    g = torch.Generator(device).manual_seed(seed)
    header, at = {"__metadata__": {"format": "pt"}}, 0
    for k, s in shapes.items():
        n = 2 * int(torch.Size(s).numel())
        header[k] = {"dtype": "BF16", "shape": list(s), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for k, s in shapes.items():
            f.write(_random(s, k, g).view(torch.uint8).cpu().numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    return at


def write_snapshot(root, layers, device="cuda", mmdit=None, vae=None):
    """transformer/ (5 GB shards + index), vae/, scheduler/ and model_index.json of random bf16 weights made on
    `device`; mmdit / vae: config fields other than the real ones (small widths for a CPU check). Seconds spent;
    0.0 when a snapshot with the same transformer config is there already."""
    from engine.config import MMDiTConfig, VAEConfig
    from engine.models.mmdit import MMDiT
    from engine.models.vae import QwenImageVAE
    from loaders.vae_layout import to_3d
    root = Path(root)
    tdir = root / "transformer"
    mcfg = MMDiTConfig(num_layers=layers, **(mmdit or {}))
    want = json.loads(json.dumps({"_class_name": "QwenImageTransformer2DModel", **mcfg.__dict__}))
    if (tdir / "diffusion_pytorch_model.safetensors.index.json").is_file() and (root / "model_index.json").is_file():
        if json.loads((tdir / "config.json").read_text()) == want:
            return 0.0
    t0 = time.perf_counter()
    for d in ("transformer", "vae", "scheduler"):
        (root / d).mkdir(parents=True, exist_ok=True)
        for f in (root / d).iterdir():
            f.unlink()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MMDiT(mcfg).state_dict().items()}
    shards, cur, size = [], {}, 0           # in module order, as save_pretrained splits a state dict
    for k, s in shapes.items():
        n = 2 * s.numel()
        if cur and size + n > SHARD:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = s, size + n
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(tdir / name, shard, seed=i, device=device)
        weight_map.update({k: name for k in shard})
    (tdir / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tdir / "config.json").write_text(json.dumps({"_class_name": "QwenImageTransformer2DModel",
                                                  **{k: v for k, v in mcfg.__dict__.items()}}, indent=2))
    vcfg = VAEConfig(latents_mean=tuple([0.0] * 16), latents_std=tuple([1.0] * 16), **(vae or {}))
    with torch.device("meta"):
        vshapes = {k: v.shape for k, v in to_3d(QwenImageVAE(vcfg).state_dict(), vcfg).items()}
    write_safetensors(root / "vae" / "diffusion_pytorch_model.safetensors", vshapes, seed=99, device=device)
    (root / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLQwenImage",
                                                          **{k: v for k, v in vcfg.__dict__.items()}}, indent=2))
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", **SCHEDULER}, indent=2))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    return time.perf_counter() - t0


def drop_caches():
    """True if the page cache was dropped (root only)."""
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        print(f"drop_caches refused ({e.strerror}): the numbers below are from a warm page cache", file=sys.stderr)
        return False


def read_floor(files, threads, chunk):
    """Seconds to read `files` with `threads` threads of `chunk`-byte preadv calls into reused buffers."""
    jobs = [(str(f), a, min(chunk, f.stat().st_size - a)) for f in files for a in range(0, f.stat().st_size, chunk)]
    fds = {p: os.open(p, os.O_RDONLY) for p, _, _ in jobs}
    lock, nxt = threading.Lock(), [0]

    def work():
        buf = memoryview(bytearray(chunk))
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(jobs):
                return
            p, a, n = jobs[i]
            os.preadv(fds[p], [buf[:n]], a)
    t0 = time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    dt = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return dt


# ---- children: one case per fresh process -------------------------------------------------------------

def _plan(root, gib):
    from engine.pipelines.budget import make_plan
    return make_plan(root, [(1024, 1024)], None, None, 2, False, int(gib * GiB), "auto", "bfloat16")


def fingerprint(model):
    """Sum over tensors of (index + 1) * the int64 sum of their int16 words, computed on the GPU."""
    total = 0
    for i, t in enumerate(model.state_dict().values()):
        total += (i + 1) * int(t.to("cuda", non_blocking=True).view(torch.int16).sum(dtype=torch.int64))
    return total


def child_load(root, reader, plan_gib):
    torch.zeros(1, device="cuda")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    os.environ["QIE_READER"] = reader
    from engine.pipelines.load import load_models
    plan = _plan(root, plan_gib) if plan_gib else None
    t0 = time.perf_counter()
    models = load_models(root, "cuda", "bfloat16", plan=plan)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stream = models.stream
    must = models.mod_host.host_bytes if models.mod_host.pinned else sum(
        p.numel() * p.element_size() for n, p in models.transformer.named_parameters() if "_mod." in n)
    must += stream.host_bytes if stream is not None else 0
    return {"seconds": seconds, "peak_rss": peak, "rss_after_cuda_init": base, "host_must": must,
            "resident_blocks": plan.mmdit_resident if plan else len(models.transformer.transformer_blocks),
            "mods_pinned": models.mod_host.pinned, "fingerprint": fingerprint(models.transformer),
            "vram_allocated": torch.cuda.memory_allocated()}


def child_forward(root, attribute, warm):
    """A full-size MMDiT placed as load_models places it (resident; img_mod/txt_mod pinned on the host), filled
    with random weights on the GPU instead of read: the first forward's costs do not depend on the values."""
    from engine import ops
    from engine.config import MMDiTConfig
    from engine.models.mmdit import MMDiT
    from engine.pipelines.load import place_transformer
    from engine.vram.offload import modulation_table_streamed
    cache = Path(root) / "kernel_cache"
    cache.mkdir(exist_ok=True)
    ops.remember_kernel_choices(str(cache))     # what cli.py does before every edit
    out = {}

    def timed(name, fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn()
        torch.cuda.synchronize()
        out[name] = time.perf_counter() - t0
        return r
    timed("cuda_init", lambda: torch.zeros(1, device="cuda"))
    with torch.device("meta"):
        m = MMDiT(MMDiTConfig.from_dict(json.loads((Path(root) / "transformer" / "config.json").read_text())))
    m = m.to(torch.bfloat16)
    stream, mods = place_transformer(m, "cuda")
    g = torch.Generator("cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(_random(p.shape, name, g))
    m.eval()
    B, n_img, L = 2, 4096, 230                      # 1 MP output + one 1 MP condition image; prompt tokens
    x = torch.randn(B, 2 * n_img, 64, device="cuda", dtype=torch.bfloat16)
    txt = torch.randn(B, L, m.cfg.joint_attention_dim, device="cuda", dtype=torch.bfloat16)
    txt_len, shapes = torch.tensor([L, 170]), [(1, 64, 64), (1, 64, 64)]
    sig = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.bfloat16, device="cuda")
    rope = m.rope(shapes, L, "cuda")
    kv_host = tuple(int(n) for n in (x.shape[1] + txt_len).tolist())
    kv = torch.tensor(kv_host, device="cuda", dtype=torch.int32)
    if warm:                        # what load_models(warm=...) runs while the weights are read
        from engine.pipelines.load import warm_up
        timed("warm_up", lambda: warm_up(m, shapes, txt_len.tolist(), "cuda", torch.bfloat16))
    if attribute:                   # each first-call cost alone, in the order the forward meets them
        a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        timed("first_cublas_matmul", lambda: a @ a)
        timed("first_cublaslt_gelu", lambda: ops.linear_gelu(a, a, a[0]))
        blk = m.transformer_blocks[0]
        q = torch.randn(B, x.shape[1] + L, blk.attn.heads, blk.attn.head_dim, device="cuda", dtype=torch.bfloat16)
        timed("first_attention", lambda: ops.attention(q, q, q, kv_len=kv, kv_host=kv_host))
        timed("second_attention", lambda: ops.attention(q, q, q, kv_len=kv, kv_host=kv_host))
        other = tuple(n - 7 for n in kv_host)                   # another prompt length, same size class
        kv2 = torch.tensor(other, device="cuda", dtype=torch.int32)
        timed("attention_new_lengths", lambda: ops.attention(q, q, q, kv_len=kv2, kv_host=other))
    table = timed("modulation_table_4_steps", lambda: modulation_table_streamed(m, [s.reshape(1) for s in sig], "cuda"))
    if attribute:
        with torch.inference_mode():
            img, t = m.img_in(x), m.txt_in(m.txt_norm(txt))
            timed("first_block", lambda: blk(img, t, table[0][0], rope, kv, None, kv_host))
            timed("second_block", lambda: blk(img, t, table[0][0], rope, kv, None, kv_host))
    with torch.inference_mode():
        for i in range(4):
            timed(f"forward_{i}", lambda: m(x, txt, txt_len, sig[i].expand(B), shapes, rope=rope, mods=table[i]))
    out["attention_backends"] = dict(ops._BACKENDS)
    return out


# ---- the parent ---------------------------------------------------------------------------------------

def run_child(args, *extra):
    r = subprocess.run([sys.executable, __file__, "--dir", args.dir, *extra], capture_output=True, text=True,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if r.returncode != 0:
        raise SystemExit(f"child {extra} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="where the snapshot is written (a local disk, ~41 GB free)")
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--plan-gib", type=float, default=16.0, help="VRAM budget of the streamed cases (0: none)")
    ap.add_argument("--threads", type=int, default=None, help="reader threads (QIE_LOAD_THREADS)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: load,forward")
    ap.add_argument("--out")
    ap.add_argument("--child", choices=["load", "forward"], help=argparse.SUPPRESS)
    ap.add_argument("--reader", default="fast", help=argparse.SUPPRESS)
    ap.add_argument("--attribute", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        os.environ["QIE_LOAD_THREADS"] = str(args.threads)
    if args.child == "load":
        print(json.dumps(child_load(args.dir, args.reader, args.plan_gib)))
        return
    if args.child == "forward":
        print(json.dumps(child_forward(args.dir, args.attribute, args.warm)))
        return

    from benchmarks.common import env_info
    from loaders.fast_read import _default_chunk, _default_threads
    skip = set(filter(None, args.skip.split(",")))
    payload = {"env": env_info(), "layers": args.layers, "plan_gib": args.plan_gib}
    payload["write_seconds"] = write_snapshot(args.dir, args.layers)
    root = Path(args.dir)
    files = sorted((root / "transformer").glob("*.safetensors"))
    files.append(root / "vae" / "diffusion_pytorch_model.safetensors")
    nbytes = sum(f.stat().st_size for f in files)
    threads, chunk = _default_threads(), _default_chunk()
    payload.update(bytes=nbytes, threads=threads, chunk=chunk, dropped=drop_caches())
    floor = read_floor(files, threads, chunk)
    payload["floor"] = {"seconds": floor, "gbs": nbytes / floor / 1e9}
    print(f"read floor: {nbytes / 1e9:.1f} GB in {floor:.1f}s = {nbytes / floor / 1e9:.2f} GB/s "
          f"({threads} threads, {chunk >> 20} MiB reads)", file=sys.stderr)
    cases = {}
    if "load" not in skip:
        for plan_gib in ([0.0, args.plan_gib] if args.plan_gib else [0.0]):
            for reader in ("safe_open", "fast"):
                where = f"{plan_gib:g} GiB" if plan_gib else "resident"
                name = f"{'old' if reader == 'safe_open' else 'new'} {where}"
                drop_caches()
                r = run_child(args, "--child", "load", "--reader", reader, "--plan-gib", str(plan_gib))
                r.update(gbs=nbytes / r["seconds"] / 1e9, floor_ratio=r["seconds"] / floor,
                         rss_target=r["host_must"] + 2 * GiB)
                cases[name] = r
                print(f"{name}: {r['seconds']:.1f}s", file=sys.stderr)
    payload["load"] = cases
    if "forward" not in skip:
        run_child(args, "--child", "forward")                      # the warm run: choices on disk
        payload["forward"] = run_child(args, "--child", "forward")
        payload["forward_attributed"] = run_child(args, "--child", "forward", "--attribute")
        payload["forward_warmed"] = run_child(args, "--child", "forward", "--warm")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2))
    print_table(payload)


def print_table(p):
    gb = 1e9
    print(f"\n{p['env']['gpu']}, torch {p['env']['torch']}; {p['bytes'] / gb:.1f} GB on disk ({p['layers']} blocks), "
          f"page cache dropped: {p['dropped']}; read floor {p['floor']['gbs']:.2f} GB/s "
          f"({p['threads']} threads, {p['chunk'] >> 20} MiB reads)")
    print(f"{'case':<16}{'s':>7}{'GB/s':>7}{'x floor':>9}{'peak RSS GiB':>14}{'target GiB':>12}{'host must':>11}"
          f"{'resident':>10}  fingerprint")
    for name, r in p["load"].items():
        print(f"{name:<16}{r['seconds']:>7.1f}{r['gbs']:>7.2f}{r['floor_ratio']:>9.2f}{r['peak_rss'] / GiB:>14.2f}"
              f"{r['rss_target'] / GiB:>12.2f}{r['host_must'] / GiB:>11.2f}{r['resident_blocks']:>10}  "
              f"{r['fingerprint']}")
    for key in ("forward", "forward_attributed", "forward_warmed"):
        f = p.get(key)
        if f:
            fw = [f[f"forward_{i}"] for i in range(4)]
            extra = "  ".join(f"{k} {v:.3f}s" for k, v in f.items()
                              if isinstance(v, float) and not k.startswith("forward_"))
            print(f"{key}: forwards {' '.join(f'{t:.3f}' for t in fw)} s (first / second {fw[0] / fw[1]:.2f}); {extra}")


if __name__ == "__main__":
    main()
