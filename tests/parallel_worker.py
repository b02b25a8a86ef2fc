"""One rank of tests/test_parallel.py, launched by torchrun (or by hand with torchrun's variables):

    python -m torch.distributed.run --nproc-per-node 2 tests/parallel_worker.py SPEC.json

SPEC: {"area": condition area (px; the CLI's 1 MP is shrunk for the CPU, as test_cli_plus does),
       "forward": {"mode": cfg|seq|cfg+seq, "snapshot": DIR, "out": DIR} or null,
       "edits": [{"argv": [cli.py edit arguments], "fault": null | FAULT}, ...]}
forward: every rank builds forward_inputs() and runs one split MMDiT forward (engine.parallel.denoise.forward_all);
rank 0 saves the output as out/forward.pt, then the same with the gather reversed (forward_reversed.pt) and, for
seq, with attention kept to each rank's own shard (forward_local.pt): what the test must see move.
edits: cli.main(argv) in order, each with its fault: reverse-gather (rows / shards joined in reverse rank
order), fail-load (rank 1 cannot load its weights), fail-step (rank 1 raises inside the second denoise step).
The process exits with the first non-zero return code of the edits.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(1, 5, 7), (1, 3, 4)]     # 35 noisy + 12 condition tokens: 47, odd (the last shard is padded)
TXT_LENS = [7, 4]                   # the uncond row's text is padded: kv_len must mask it


def forward_inputs(joint_dim, seed=3):
    """(x [2, 47, 64], txt [2, 7, joint_dim], txt_len [2], t [2], img_shapes) for a CFG-batched forward."""
    g = torch.Generator().manual_seed(seed)
    N = sum(f * h * w for f, h, w in SHAPES)
    x = torch.randn(2, N, 64, generator=g)
    txt = torch.randn(2, max(TXT_LENS), joint_dim, generator=g)
    for b, n in enumerate(TXT_LENS):
        txt[b, n:] = 0
    return x, txt, torch.tensor(TXT_LENS), torch.full((2,), 0.6), SHAPES


class Patch:
    """setattr for the length of a `with` block."""

    def __init__(self, obj, name, value):
        self.obj, self.name, self.value = obj, name, value

    def __enter__(self):
        self.old = getattr(self.obj, self.name)
        setattr(self.obj, self.name, self.value)

    def __exit__(self, *exc):
        setattr(self.obj, self.name, self.old)


def reversed_gather():
    import engine.parallel.cfg as cfg
    orig = cfg.assemble
    return Patch(cfg, "assemble", lambda parts, *a: orig(parts[::-1], *a))


class local_attention:
    """Each rank attends over its own shard and the text only: no exchange of tokens (the blocks' installed
    attention cores swapped for ops.attention, then put back)."""

    def __init__(self, mm):
        self.attns = [blk.attn for blk in mm.transformer_blocks]

    def __enter__(self):
        from engine import ops
        self.saved = [a.attend for a in self.attns]
        for a in self.attns:
            a.attend = lambda q, k, v, kv_len, kv_host=None: ops.attention(q, k, v, kv_len=kv_len, kv_host=kv_host)

    def __exit__(self, *exc):
        for a, f in zip(self.attns, self.saved):
            a.attend = f


def fault(name, rank):
    import contextlib
    if name is None:
        return contextlib.nullcontext()
    if name == "reverse-gather":
        return reversed_gather()
    if name == "fail-load":
        import engine.pipelines.load as load
        from loaders import LoadError

        def broken(*a, **kw):
            raise LoadError("transformer/diffusion_pytorch_model.safetensors: unreadable on this rank (test)")
        return Patch(load, "load_models", broken) if rank == 1 else contextlib.nullcontext()
    if name == "fail-step":
        from engine.parallel.denoise import ParallelDenoise
        orig, calls = ParallelDenoise.velocity, [0]

        def velocity(self, *a):
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("rank 1 fails in step 2 (test)")
            return orig(self, *a)
        return Patch(ParallelDenoise, "velocity", velocity) if rank == 1 else contextlib.nullcontext()
    raise ValueError(name)


def run_forward(spec):
    import contextlib
    from types import SimpleNamespace

    from engine.models.mmdit import load_mmdit
    from engine.parallel import launch
    from engine.parallel.denoise import forward_all
    from loaders import Snapshot
    args = SimpleNamespace(parallel=spec["mode"], model=spec["snapshot"], device="cpu", vram=None, offload=None,
                           devices=None)
    world = launch(args)
    mm = load_mmdit(Snapshot(spec["snapshot"]), torch.float32, "cpu")
    x, txt, txt_len, t, shapes = forward_inputs(mm.cfg.joint_attention_dim)
    variants = {"forward": contextlib.nullcontext(), "forward_reversed": reversed_gather()}
    if world.seq_size > 1:
        variants["forward_local"] = local_attention(mm)
    for name, patch in variants.items():
        with patch:
            out = forward_all(world, mm, x, txt, txt_len, t, shapes)
        if world.rank == 0:
            torch.save(out, Path(spec["out"]) / f"{name}.pt")


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    import engine.pipelines.spec as spec_mod
    orig, area = spec_mod.condition_size, spec["area"]
    spec_mod.condition_size = lambda w, h, a=1024 * 1024: orig(w, h, area if a == 1024 * 1024 else a)
    import os
    rank = int(os.environ.get("RANK", "0"))
    if spec.get("forward"):
        run_forward(spec["forward"])
    import cli
    rc = 0
    for edit in spec["edits"]:
        with fault(edit.get("fault"), rank):
            got = cli.main(edit["argv"])
        rc = rc or got
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(rc)


if __name__ == "__main__":
    main()
