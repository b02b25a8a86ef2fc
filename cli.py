"""Command line: edit, demo, inspect. Thin: argparse -> engine; one-line errors, non-zero exit."""
import argparse
import os
import sys
import time
from pathlib import Path

EXIT_INPUT, EXIT_OOM = 2, 3


def _cache_dir():
    return Path(os.environ.get("QIE_CACHE", Path.home() / ".cache" / "qwen-image-edit-engine"))


def _add_run_args(p):
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=4.0, help="true CFG scale (needs negative embeddings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=None, help="output width (default: the ~1 MP condition size)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--out", required=False)
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def _cuda():
    import torch
    return torch.cuda.is_available()


def _check_out(args):
    if args.out is None:
        raise SystemExit("error: --out is required")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise _input_error(f"{out} exists; pass --force to overwrite it or choose another --out")
    if out.suffix.lower() != ".png":
        raise _input_error(f"--out {out} must end in .png")
    if not out.resolve().parent.is_dir():
        raise _input_error(f"folder {out.resolve().parent} does not exist")


def _input_error(msg):
    from loaders import LoadError
    return LoadError(msg)


def _run_edit(model_dir, image, embeds_file, args):
    import torch
    from tqdm import tqdm

    from engine.config import RunOptions
    from engine.pipeline import edit, load_models
    from loaders import LoadError, read_tensors, write_png

    if args.steps < 1:
        raise LoadError(f"--steps must be at least 1, got {args.steps}")
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    tensors = read_tensors(embeds_file)
    if "prompt_embeds" not in tensors:
        raise LoadError(f"{embeds_file} has no 'prompt_embeds' tensor (has: {', '.join(sorted(tensors)) or 'none'})")
    models = load_models(model_dir, device=args.device, dtype=dtype)
    joint = models.transformer.cfg.joint_attention_dim
    for k in ("prompt_embeds", "negative_prompt_embeds"):
        if k in tensors and tensors[k].shape[-1] != joint:
            raise LoadError(f"{embeds_file}: {k} is {tensors[k].shape[-1]} wide, the transformer expects {joint}")
    opts = RunOptions(steps=args.steps, cfg=args.cfg, seed=args.seed, width=args.width, height=args.height,
                      device=args.device, dtype=dtype)
    if "negative_prompt_embeds" not in tensors and args.cfg > 1:
        print("note: no negative_prompt_embeds in the embeddings file, so CFG is off", file=sys.stderr)
    bar = tqdm(total=args.steps, desc="denoise", unit="step", file=sys.stderr)
    try:
        out = edit(models, image, tensors["prompt_embeds"], tensors.get("prompt_embeds_mask"),
                   tensors.get("negative_prompt_embeds"), tensors.get("negative_prompt_embeds_mask"),
                   opts, progress=lambda i: bar.update(1))
    finally:
        bar.close()
    write_png(out, args.out, force=args.force)
    t = models.timings
    line = " ".join(f"{k} {v:.2f}s" for k, v in t.items())
    print(f"wrote {args.out} ({out.width}x{out.height}); {line}")
    if args.device == "cuda":
        gib = 2 ** 30
        print(f"peak VRAM allocated {torch.cuda.max_memory_allocated() / gib:.2f} GiB, "
              f"reserved {torch.cuda.max_memory_reserved() / gib:.2f} GiB")


def cmd_edit(args):
    from loaders import read_image
    _check_out(args)
    if args.prompt_embeds is None:
        raise _input_error("--prompt-embeds FILE is required (prompt text encoding is not available yet)")
    _run_edit(args.model, read_image(args.image), args.prompt_embeds, args)


def cmd_demo(args):
    from engine.demo import demo_snapshot, sample_image
    if args.out is None:
        args.out = "demo_out.png"
    _check_out(args)
    t0 = time.perf_counter()
    root, fresh = demo_snapshot(_cache_dir())
    print(f"demo snapshot (random weights) {'written to' if fresh else 'cached at'} {root} "
          f"({time.perf_counter() - t0:.2f}s)")
    _run_edit(root, sample_image(), root / "demo_prompt.safetensors", args)


def cmd_inspect(args):
    from loaders import describe
    snap, rows = describe(args.model)
    print(f"{snap.root}: {snap.pipeline_class()}")
    for r in rows:
        if not r["present"]:
            print(f"  {r['component']:<13} missing")
            continue
        extra = ""
        if "tensors" in r:
            dt = ", ".join(f"{k} x{v}" for k, v in sorted(r["dtypes"].items()))
            extra = f"{r['tensors']} tensors, {r['params'] / 1e6:.1f} M params, {r['bytes'] / 2**30:.2f} GiB ({dt})"
        print(f"  {r['component']:<13} {str(r.get('class', '')):<32} {extra}")


def build_parser():
    p = argparse.ArgumentParser(prog="cli.py", description="Qwen-Image-Edit, locally.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("edit", help="edit an image")
    e.add_argument("--model", required=True, help="snapshot folder of Qwen/Qwen-Image-Edit")
    e.add_argument("--image", required=True)
    e.add_argument("--prompt-embeds", help=".safetensors with prompt_embeds (+ _mask, negative_*)")
    _add_run_args(e)
    e.set_defaults(fn=cmd_edit)
    d = sub.add_parser("demo", help="the whole edit on a tiny built-in random model (no download)")
    _add_run_args(d)
    d.set_defaults(fn=cmd_demo, steps=4, width=768, height=512)
    i = sub.add_parser("inspect", help="what a snapshot holds")
    i.add_argument("model")
    i.set_defaults(fn=cmd_inspect)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from loaders import LoadError
    try:
        args.fn(args)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        import torch
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            print("error: out of GPU memory; try --dtype bfloat16 or a smaller --width/--height", file=sys.stderr)
            return EXIT_OOM
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
