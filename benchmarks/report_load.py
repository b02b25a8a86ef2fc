"""RESULTS.md section and README rows for benchmarks/bench_load.py: `load_models` through safe_open (old) and through
loaders/fast_read.py (new) against the disk's read floor, peak host RSS against what must stay on the host, and the
first MMDiT forward after a load against the second."""

GiB = 2 ** 30
FLOOR_TARGET = 1.2      # load seconds / read floor seconds
RSS_SLACK = 2 * GiB     # peak host RSS target = the bytes that must stay on the host + this
FIRST_TARGET = 1.2      # first forward / second forward
FORWARDS = (("forward", "nothing warmed"),
            ("forward_attributed", "each first-call cost timed alone first, in the order the forward meets them"),
            ("forward_warmed", "after `load_models`' warm_up (the CLI runs it while the weights are read)"))
COSTS = {"cuda_init": "CUDA init", "warm_up": "warm_up", "first_cublas_matmul": "first cuBLAS matmul",
         "first_cublaslt_gelu": "first cuBLASLt GELU", "first_attention": "first attention",
         "second_attention": "second attention", "attention_new_lengths": "attention at new prompt lengths",
         "modulation_table_4_steps": "modulation table (4 steps)", "first_block": "first block",
         "second_block": "second block"}


def _met(value, limit):
    return "met" if value <= limit else "missed"


def _head(d):
    e, f = d["env"], d["floor"]
    plans = ", ".join(sorted({n.split(" ", 1)[1] for n in d["load"]} - {"resident"}))
    plans = f", {plans} = the planner's plan for a 1024² CFG edit (B=2) in that budget" if plans else ""
    return (f"{e['gpu']}, torch {e['torch']}, {e['date']}; {d['bytes'] / 1e9:.1f} GB on disk (the transformer's "
            f"{d['layers']} blocks in shards + the VAE, random bf16), page cache dropped before each case: "
            f"{'yes' if d['dropped'] else 'no'}; read floor {f['seconds']:.1f} s = {f['gbs']:.2f} GB/s (the same files "
            f"read with the reader's {d['threads']} threads and {d['chunk'] >> 20} MiB reads, no destination). Each "
            "case is `load_models` (transformer + VAE) to CUDA in a fresh process: old = `QIE_READER=safe_open` (a host "
            "state dict, then placed), new = `loaders/fast_read.py` (placed first, read in place); resident = every "
            f"block on the GPU{plans}. Host must = the pinned modulation weights + the streamed blocks' pinned buffers.")


def table(d, more=False):
    """One row per load case; more: the RESULTS.md columns (RSS after CUDA init, VRAM allocated, fingerprint)."""
    extra = " RSS after CUDA init GiB | VRAM allocated GiB | fingerprint |" if more else ""
    out = [f"| case | s | GB/s | × read floor (target ≤ {FLOOR_TARGET}) | peak host RSS GiB (target ≤ host must + 2) | "
           f"host must + 2 GiB | blocks resident | fingerprint = old path's |{extra}",
           "|---|---:|---:|---:|---:|---:|---:|---|" + "---:|---:|---|" * more]
    floor = d["floor"]["seconds"]
    for name, r in d["load"].items():
        x, target = r["seconds"] / floor, r["host_must"] + RSS_SLACK
        old = d["load"].get("old " + name[4:]) if name.startswith("new ") else None
        same = "—" if not name.startswith("new ") else "no old case" if old is None else \
            "yes" if r["fingerprint"] == old["fingerprint"] else "**no**"
        row = (f"| {name} | {r['seconds']:.1f} | {d['bytes'] / r['seconds'] / 1e9:.2f} | {x:.2f} "
               f"({_met(x, FLOOR_TARGET)}) | {r['peak_rss'] / GiB:.2f} ({_met(r['peak_rss'], target)}) | "
               f"{r['host_must'] / GiB:.2f} + 2 = {target / GiB:.2f} | {r['resident_blocks']}/{d['layers']} | {same} |")
        if more:
            row += (f" {r['rss_after_cuda_init'] / GiB:.2f} | {r['vram_allocated'] / GiB:.2f} | "
                    f"{r['fingerprint']} |")
        out.append(row)
    return out


def _forwards(f):
    out, i = [], 0
    while f"forward_{i}" in f:
        out.append(f[f"forward_{i}"])
        i += 1
    return out


def forward_lines(d):
    """One line per first-forward run: the forwards, first / second, the first-call costs timed in that run."""
    runs = [(k, what, d[k]) for k, what in FORWARDS if d.get(k)]
    if not runs:
        return []
    when = d.get("forward_run", {}).get("env", {}).get("date")
    out = ["First MMDiT forward (1 MP edit with one 1 MP condition image, B=2, the 4 steps' modulation table first; "
           "resident, random weights placed as `load_models` places them), each a fresh process after a warm run "
           "left its kernel choices on disk" + (f"; run {when} in a second invocation on the same machine" if when
                                                 else "") + ":", ""]
    for key, what, f in runs:
        fw = _forwards(f)
        costs = ", ".join(f"{COSTS.get(k, k)} {v:.3f} s" for k, v in f.items()
                          if isinstance(v, float) and not k.startswith("forward_"))
        backends = sorted(set(f.get("attention_backends", {}).values()))
        ratio = fw[0] / fw[1]
        out.append(f"- `{key}`, {what}: forwards {', '.join(f'{t:.3f}' for t in fw)} s; first / second {ratio:.2f} "
                   f"(target ≤ {FIRST_TARGET}: {_met(ratio, FIRST_TARGET)}), first − second {fw[0] - fw[1]:+.3f} s; "
                   f"{costs}" + (f"; attention backend {', '.join(backends)}" if backends else ""))
    return out


def readme_load(d):
    return [_head(d), ""] + table(d) + [""] + forward_lines(d)


def load_section(name, d):
    return [f"### Loading from disk and the first forward — `{name}`", "", _head(d), ""] + table(d, more=True) \
        + [""] + forward_lines(d) + [""]
