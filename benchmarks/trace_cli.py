"""Where a `cli.py` command's wall time goes outside the stages it prints: each case a fresh process.

    python benchmarks/trace_cli.py --out /tmp/trace.json --case new=. --case old=/tmp/old_checkout \
        --case new_exit=.:fast-exit --case new_profile=.:profile -- edit --model DIR --image in.png ...

A case is NAME=CHECKOUT[:fast-exit][:profile][:firststep]: that checkout's cli.py runs the arguments after `--`.
Per run:
  start      spawn -> the child's first line (the interpreter and this script's imports)
  import     `import cli` (torch and what cli.py imports at the top)
  main       cli.main(argv): everything the command does, its printed stages inside
  teardown   main's return -> the process gone (module teardown, CUDA context and pinned memory released);
             fast-exit ends the child with os._exit instead, after flushing, to measure what that saves
  profile    a cProfile of main: the 30 functions of the checkout with the most cumulative time
  firststep  the MMDiT's first two forwards, each top-level module timed with the GPU synced around it (block 0
             apart from the other blocks): where a first step's extra time goes (the syncs slow both a little)
The first --warm-up runs (unrecorded) fill the page cache and the kernel caches. The JSON is rewritten after
every run.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def child(args, argv):
    t_start = time.time()
    root = Path(args.root).resolve()
    sys.path.insert(0, str(root))
    os.chdir(root)
    t0 = time.time()
    import cli
    t_import = time.time() - t0
    profile = None
    if args.profile:
        import cProfile
        profile = cProfile.Profile()
        profile.enable()
    forwards = first_forwards() if args.firststep else None
    t0 = time.time()
    rc = cli.main(argv)
    t_end = time.time()
    if profile is not None:
        profile.disable()
    record = {"start_at": t_start, "import_s": t_import, "main_s": t_end - t0, "end_at": t_end, "rc": rc}
    if profile is not None:
        record["profile"] = top_functions(profile, root)
    if forwards is not None:
        record["forwards"] = forwards
    Path(args.child).write_text(json.dumps(record))
    sys.stdout.flush()
    sys.stderr.flush()
    if args.fast_exit:
        os._exit(rc or 0)
    return rc


def first_forwards(calls=2):
    """Wraps MMDiT.forward: for its first `calls` calls, {module: seconds} with the GPU synced before and after
    each top-level module ("block0", then "blocks" for the others summed) and "forward" for the whole call.
    Returns the list it fills."""
    import torch

    from engine.models import mmdit
    forward, out = mmdit.MMDiT.forward, []

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed(self, *a, **k):
        if len(out) >= calls:
            return forward(self, *a, **k)
        parts, handles, marks = {}, [], {}
        named = [(n, m) for n, m in self.named_children() if n not in ("transformer_blocks", "time_text_embed")]
        named.append(("time_embed", self.time_text_embed.timestep_embedder))   # called past its parent
        named += [("block0" if i == 0 else "blocks", b) for i, b in enumerate(self.transformer_blocks)]
        for name, mod in named:
            def pre(_m, _i, name=name):
                sync()
                marks[name] = time.perf_counter()

            def post(_m, _i, _o, name=name):
                sync()
                parts[name] = parts.get(name, 0.0) + time.perf_counter() - marks[name]
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        sync()
        t0 = time.perf_counter()
        try:
            return forward(self, *a, **k)
        finally:
            sync()
            parts["forward"] = time.perf_counter() - t0
            for h in handles:
                h.remove()
            out.append({k: round(v, 4) for k, v in parts.items()})
    mmdit.MMDiT.forward = timed
    return out


def top_functions(profile, root, n=30):
    """[(file:line function, cumulative s, own s, calls)] of the checkout's functions (and torch.cuda's
    synchronising calls), most cumulative time first."""
    import pstats
    stats = pstats.Stats(profile).stats
    rows = []
    for (file, line, name), (_, calls, own, cum, _) in stats.items():
        ours = str(root) in file and "site-packages" not in file
        if ours or "torch/cuda" in file or file == "~":     # "~": built-ins (CUDA calls, file reads)
            where = Path(file).resolve().relative_to(root) if ours else Path(file).name
            rows.append((f"{where}:{line} {name}", round(cum, 3), round(own, 3), calls))
    return sorted(rows, key=lambda r: -r[1])[:n]


def stage_pairs(text):
    """'load 12.30s denoise 2.10s' -> {"load": 12.3, "denoise": 2.1}"""
    return {k: float(v) for k, v in re.findall(r"([a-z_]+) ([0-9.]+)s\b", text)}


def cli_stages(stdout, stderr):
    """(stages, their sum) an edit printed: text_encode from `encoded ... (N.NNs)` on stderr (the text encoder's
    load and run), the rest from the `wrote ...; stage N.NNs ...` line; warm_up runs inside load: not summed."""
    wrote = next((line for line in stdout.splitlines() if line.startswith("wrote ")), "")
    encoded = re.search(r"^encoded .*\(([0-9.]+)s\)$", stderr, re.M)
    stages = {**({"text_encode": float(encoded.group(1))} if encoded else {}),
              **stage_pairs(wrote.split("; ", 1)[1] if "; " in wrote else "")}
    return stages, sum(v for k, v in stages.items() if k != "warm_up")


def run(case, argv, work, timeout):
    name, spec = case.split("=", 1)
    root, *flags = spec.split(":")
    record = work / f"{name}.json"
    record.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(record), "--root", root,
           *(["--fast-exit"] if "fast-exit" in flags else []), *(["--profile"] if "profile" in flags else []),
           *(["--firststep"] if "firststep" in flags else []),
           "--", *argv]
    spawned = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    gone = time.time()
    r = {"case": name, "root": root, "flags": flags, "wall_s": gone - spawned, "rc": p.returncode}
    if p.returncode != 0 or not record.is_file():
        return {**r, "error": p.stderr.strip()[-1500:]}
    c = json.loads(record.read_text())
    stages, stage_sum = cli_stages(p.stdout, p.stderr)
    r.update(start_s=c["start_at"] - spawned, import_s=c["import_s"], main_s=c["main_s"],
             teardown_s=gone - c["end_at"], stages=stages, stage_sum_s=stage_sum,
             main_outside_stages_s=c["main_s"] - stage_sum,
             denoise=denoise_steps(p.stdout), profile=c.get("profile"), forwards=c.get("forwards"))
    return r


def denoise_steps(stdout):
    """{"table": s, "steps": [s, ...]} from the CLI's `denoise: modulation table X.XXs, steps A B ... s` line."""
    m = re.search(r"^denoise: modulation table ([0-9.]+)s, steps ([0-9. ]+) s$", stdout, re.M)
    return {"table": float(m.group(1)), "steps": [float(x) for x in m.group(2).split()]} if m else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--case", action="append", default=[])
    ap.add_argument("--warm-up", type=int, default=1, help="unrecorded runs of the first case first")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--root", default=".", help=argparse.SUPPRESS)
    ap.add_argument("--fast-exit", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--firststep", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, rest = ap.parse_args(argv[:split]), argv[split + 1:]
    if args.child:
        sys.exit(child(args, rest))
    out = Path(args.out)
    work = Path(str(out.with_suffix("")) + "_runs")
    work.mkdir(parents=True, exist_ok=True)
    payload = {"argv": rest, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": []}
    try:
        import torch
        payload["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
        payload["torch"] = torch.__version__
    except ImportError:
        pass
    for _ in range(args.warm_up):
        r = run(args.case[0], rest, work, args.timeout)
        print(f"warm-up: {r['wall_s']:.1f}s rc {r['rc']} {r.get('error', '')[-300:]}", file=sys.stderr)
    for case in args.case:
        try:
            r = run(case, rest, work, args.timeout)
        except subprocess.TimeoutExpired as e:
            r = {"case": case, "error": f"timed out after {e.timeout}s"}
        payload["runs"].append(r)
        out.write_text(json.dumps(payload, indent=2))
        print(f"{case}: " + json.dumps({k: v for k, v in r.items() if k != "profile"}), file=sys.stderr)
    print(f"\n{'case':<14}{'wall':>7}{'start':>7}{'import':>7}{'main':>7}{'stages':>7}{'other':>7}{'teardown':>9}"
          f"{'table':>7}  steps")
    for r in payload["runs"]:
        if "error" in r:
            print(f"{r['case']:<14} failed: {r['error'][-200:]}")
            continue
        print(f"{r['case']:<14}{r['wall_s']:>7.2f}{r['start_s']:>7.2f}{r['import_s']:>7.2f}{r['main_s']:>7.2f}"
              f"{r['stage_sum_s']:>7.2f}{r['main_outside_stages_s']:>7.2f}{r['teardown_s']:>9.2f}"
              f"{(r['denoise'] or {}).get('table', float('nan')):>7.2f}  {(r['denoise'] or {}).get('steps')}  "
              f"{r['stages']}")


if __name__ == "__main__":
    main()
