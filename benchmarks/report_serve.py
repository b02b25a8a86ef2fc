"""RESULTS.md and README rows for benchmarks/bench_serve.py (issue 12): the CLI's time to image against the
disk's read floor, and the warm server's start, latency against its stage compute, throughput and host RAM."""

GiB = 2 ** 30
STAGES = ("text_encode", "load", "vae_encode", "denoise", "vae_decode")


def _gib(b):
    return f"{b / GiB:.1f}" if b else "–"


def _head(d):
    env, sn = d["env"], d.get("snapshot", {})
    size = (f"{sn['bytes'] / 1e9:.1f} GB snapshot ({sn['layers']} blocks, {sn['text_layers']} text layers)"
            if "bytes" in sn else "a random snapshot")
    return (f"{env['gpu']}, torch {env['torch']}, {env['date']}; {size}, random bf16 weights, a {d['size']}² input "
            f"image, `--prompt` (the text encoder runs), each CLI case a fresh process.")


def _cli_rows(d):
    c = d.get("cli", {})
    if "cases" not in c:
        return [f"CLI: {c.get('error', 'not run')}"] if c else []
    rows = [f"`cli.py edit`, {d['steps']} steps, CFG 4. Read floor {c['floor_s']:.1f} s = {c['bytes_read'] / 1e9:.1f} "
            f"GB at {c['read_gbs']:.2f} GB/s sequential (page cache dropped: {c['dropped']}).", "",
            "| case | wall s | / read floor | " + " | ".join(STAGES) + " | peak host RSS GiB |",
            "|---|---:|---:|" + "---:|" * len(STAGES) + "---:|"]
    for name, r in c["cases"].items():
        if "stages" not in r:
            rows.append(f"| {name} | failed: {r.get('error', '?').splitlines()[-1][:100]} |" + " |" * (len(STAGES) + 2))
            continue
        cells = " | ".join(f"{r['stages'][k]:.2f}" if k in r["stages"] else "–" for k in STAGES)
        rows.append(f"| {name} | {r['wall_s']:.1f} | {r['wall_s'] / c['floor_s']:.2f} | {cells} | "
                    f"{_gib(r['peak_rss'])} |")
    return rows


def _serve_rows(d):
    s = d.get("serve", {})
    if "start_s" not in s:
        return [f"Server: {s.get('error', 'not run')}"] if s else []
    e, n, j, b = (s.get(k, {}) for k in ("edit", "default", "jobs", "bad"))
    rows = ["| server | |", "|---|---|", f"| start (spawn → /health ready) | {s['start_s']:.1f} s, "
            f"{_gib(s.get('rss_ready'))} GiB RSS |"]
    if "median_s" in e:
        ratio = (f"; stage compute {e['stage_sum_s']:.2f} s, latency / compute {e['ratio']:.2f} (target ≤ 1.15)"
                 if "ratio" in e else "; stage compute not logged by the server")
        rows.append(f"| `POST /v1/edit`, {d['steps']} steps, CFG 1 | first {e['first_s']:.2f} s, then "
                    f"{e['median_s']:.2f} s{ratio} |")
    if "latency_s" in n:
        compute = f"; stage compute {n['stage_sum_s']:.1f} s" if n.get("stage_sum_s") else ""
        rows.append(f"| `POST /v1/edit`, {d.get('long_steps', 50)} steps, CFG 4 | {n['latency_s']:.1f} s{compute} |")
    if "wall_s" in j:
        rows.append(f"| {j['jobs']} queued `POST /v1/jobs` | {j['wall_s']:.1f} s, {j['edits_per_min']:.1f} edits/min, "
                    f"{len(j['failed'])} failed; RSS {_gib(j['rss_before'])} → max {_gib(j['rss_max'])} → "
                    f"{_gib(j['rss_after'])} GiB |")
    if "right" in b:
        rows.append(f"| 20 bad requests among 5 good ones | {b['right']}/{b['requests']} answered with the right "
                    f"code; health ready after: {b['health_ready']}; RSS {_gib(b['rss_after'])} GiB |")
    rows += [f"| {k} | failed: {s[k]['error'][:120]} |" for k in ("edit", "default", "jobs", "bad")
             if "error" in s.get(k, {})]
    return rows


def serve_section(name, d):
    return ([f"### CLI and server time to image — `{name}`", "", _head(d), ""] + _cli_rows(d) + [""]
            + _serve_rows(d) + [""])


def readme_serve(d):
    return [_head(d), ""] + _cli_rows(d) + [""] + _serve_rows(d)
