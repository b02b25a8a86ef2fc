"""RESULTS.md and README rows for benchmarks/bench_serve.py (issue 12): the CLI's time to image against the
disk's read floor, and the warm server's start, latency against its stage compute, throughput and host RAM."""

GiB = 2 ** 30
STAGES = ("text_encode", "load", "vae_encode", "denoise", "vae_decode")


def _gib(b):
    return f"{b / GiB:.1f}" if b else "–"


def _yes(flag):
    return "yes" if flag else "no"


def _verdict(ok):
    return "met" if ok else "missed"


def _first_later(denoise):
    """A denoise's first step over the mean of the later ones (None without two steps)."""
    steps = (denoise or {}).get("steps") or []
    return steps[0] / (sum(steps[1:]) / len(steps[1:])) if len(steps) > 1 else None


def _steps_cell(denoise):
    if not denoise:
        return "not printed"
    ratio = _first_later(denoise)
    return (f"{denoise['table']:.2f} + " + " ".join(f"{t:.2f}" for t in denoise["steps"])
            + (f" ({ratio:.2f})" if ratio else ""))


def _head(d):
    env, sn = d["env"], d.get("snapshot", {})
    size = (f"{sn['bytes'] / 1e9:.1f} GB snapshot ({sn['layers']} blocks, {sn['text_layers']} text layers)"
            if "bytes" in sn else "a random snapshot")
    parts = [f"{k} {d[k]['date']}" for k in ("cli", "serve") if isinstance(d.get(k), dict) and "date" in d[k]]
    when = f" (each part's end: {', '.join(parts)})" if parts else ""
    return (f"{env['gpu']}, torch {env['torch']}, {env['date']}{when}; {size}, random bf16 weights, a {d['size']}² "
            f"input image, `--prompt` (the text encoder runs), each CLI case a fresh process.")


def _cli_rows(d):
    c = d.get("cli", {})
    if "cases" not in c:
        return [f"CLI: {c.get('error', 'not run')}"] if c else []
    rows = [f"`cli.py edit`, {d['steps']} steps, CFG 4. Read floor {c['floor_s']:.1f} s = {c['bytes_read'] / 1e9:.1f} "
            f"GB at {c['read_gbs']:.2f} GB/s sequential (page cache dropped: {_yes(c['dropped'])}).", "",
            "| case | wall s | / read floor | " + " | ".join(STAGES) + " | denoise: table + steps s (first / later) "
            "| peak host RSS GiB |",
            "|---|---:|---:|" + "---:|" * len(STAGES) + "---|---:|"]
    for name, r in c["cases"].items():
        if "stages" not in r:
            rows.append(f"| {name} | failed: {r.get('error', '?').splitlines()[-1][:100]} |" + " |" * (len(STAGES) + 3))
            continue
        cells = " | ".join(f"{r['stages'][k]:.2f}" if k in r["stages"] else "–" for k in STAGES)
        rows.append(f"| {name} | {r['wall_s']:.1f} | {r['wall_s'] / c['floor_s']:.2f} | {cells} | "
                    f"{_steps_cell(r.get('denoise'))} | {_gib(r['peak_rss'])} |")
    warm = _first_later(c["cases"].get("warm", {}).get("denoise"))
    if warm:
        rows += ["", f"First step / later steps, second run (`warm`): {warm:.2f} (target ≤ 1.2: "
                     f"{_verdict(warm <= 1.2)})."]
    return rows


def _serve_rows(d):
    s = d.get("serve", {})
    if "start_s" not in s:
        return [f"Server: {s.get('error', 'not run')}"] if s else []
    e, n, j, b = (s.get(k, {}) for k in ("edit", "default", "jobs", "bad"))
    rows = ["| server | |", "|---|---|", f"| start (spawn → /health ready) | {s['start_s']:.1f} s, "
            f"{_gib(s.get('rss_ready'))} GiB RSS |"]
    if "median_s" in e:
        ratio = (f"; stage compute {e['stage_sum_s']:.2f} s, latency / compute {e['ratio']:.3f} (target ≤ 1.15: "
                 f"{_verdict(e['ratio'] <= 1.15)})" if "ratio" in e else "; stage compute not logged by the server")
        rows.append(f"| `POST /v1/edit`, {d['steps']} steps, CFG 1 | first {e['first_s']:.2f} s, then "
                    f"{e['median_s']:.2f} s{ratio} |")
        runs = [r for r in e.get("runs", []) if r.get("denoise")]
        if runs:
            worst = max(_first_later(r["denoise"]) or 0 for r in runs)
            rows.append(f"| its denoise, table + steps s (first / later) | "
                        + "; ".join(_steps_cell(r["denoise"]) for r in runs)
                        + f"; largest first / later {worst:.2f} (target ≤ 1.2: {_verdict(worst <= 1.2)}) |")
    if "latency_s" in n:
        compute = f"; stage compute {n['stage_sum_s']:.1f} s" if n.get("stage_sum_s") else ""
        rows.append(f"| `POST /v1/edit`, {d.get('long_steps', 50)} steps, CFG 4 | {n['latency_s']:.1f} s{compute} |")
    if "wall_s" in j:
        rows.append(f"| {j['jobs']} queued `POST /v1/jobs` | {j['wall_s']:.1f} s, {j['edits_per_min']:.1f} edits/min, "
                    f"{len(j['failed'])} failed; RSS {_gib(j['rss_before'])} → max {_gib(j['rss_max'])} → "
                    f"{_gib(j['rss_after'])} GiB |")
    if "right" in b:
        rows.append(f"| 20 bad requests among 5 good ones | {b['right']}/{b['requests']} answered with the right "
                    f"code; health ready after: {_yes(b['health_ready'])}; RSS {_gib(b['rss_after'])} GiB |")
    rows += [f"| {k} | failed: {s[k]['error'][:120]} |" for k in ("edit", "default", "jobs", "bad")
             if "error" in s.get(k, {})]
    return rows


def serve_section(name, d):
    return ([f"### CLI and server time to image — `{name}`", "", _head(d), ""] + _cli_rows(d) + [""]
            + _serve_rows(d) + [""])


def readme_serve(d):
    return [_head(d), ""] + _cli_rows(d) + [""] + _serve_rows(d)


# ---- benchmarks/trace_cli.py: where a CLI edit's wall time goes -----------------------------------------

def readme_trace(d):
    """The trace's runs as a table (seconds): wall, its parts, the stages, the first step against the later."""
    argv = " ".join(d["argv"])
    rows = [f"{d['env']['gpu']}, torch {d['env']['torch']}, {d['env']['date']}; `cli.py {argv}`, each run a fresh "
            f"process. {d.get('snapshot', '')}.", ""]
    rows += [f"- `{name}`: {what}" for name, what in d.get("checkouts", {}).items()] + [""]
    rows += ["| run | checkout | wall | start | main | stages | main outside stages | teardown | modulation table "
             "| steps | first / later step |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in d["runs"]:
        if "error" in r:
            rows.append(f"| {r['case']} | | failed: {r['error'].splitlines()[-1][:100]} |" + " |" * 8)
            continue
        steps = (r.get("denoise") or {}).get("steps")
        table = (r.get("denoise") or {}).get("table")
        flags = "".join(f" ({f})" for f in r["flags"])
        first = f"{steps[0] / (sum(steps[1:]) / len(steps[1:])):.2f}" if steps and len(steps) > 1 else "–"
        rows.append(f"| {r['case']} | `{r['root']}`{flags} | {r['wall_s']:.2f} | {r['start_s']:.2f} | "
                    f"{r['main_s']:.2f} | {r['stage_sum_s']:.2f} | {r['main_outside_stages_s']:.2f} | "
                    f"{r['teardown_s']:.2f} | {'–' if table is None else f'{table:.2f}'} | "
                    f"{' '.join(f'{t:.2f}' for t in steps) if steps else 'not printed'} | {first} |")
    return rows


def trace_section(name, d):
    return [f"### Where a CLI edit's wall time goes — `{name}`", ""] + readme_trace(d) + [""]


PARTS = ("img_in", "time_embed", "txt_norm", "txt_in", "block0", "blocks", "norm_out", "proj_out", "forward")


def first_step_section(name, d):
    """trace_cli runs with :firststep: the runs' table, then each run's first two MMDiT forwards by module
    (the warm-up's scratch forward, then the first denoising step), seconds with the GPU synced around each."""
    rows = [f"### The first denoising step, module by module — `{name}`", ""] + readme_trace(d) + [
        "", "The first two MMDiT forwards of each run: `warm-up` is warm_up's scratch model (one block), `step 1` the "
        "first denoising step (60 blocks: `block0`, then `blocks` for the other 59 together); ms with the GPU "
        "synced around every module (the syncs add a little to each).", "",
        "| run | forward | " + " | ".join(PARTS) + " |", "|---|---|" + "---:|" * len(PARTS)]
    for r in d["runs"]:
        for what, f in zip(("warm-up", "step 1"), r.get("forwards") or []):
            rows.append(f"| {r['case']} | {what} | " + " | ".join(f"{1000 * f[k]:.1f}" if k in f else "–"
                                                                 for k in PARTS) + " |")
    return rows + [""]
