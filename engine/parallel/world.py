"""torchrun's processes as one edit: the launch checks, the process group, who computes what, and errors that
every rank agrees on.

    torchrun --nproc-per-node N cli.py edit ... --parallel cfg|seq|cfg+seq

NCCL between GPUs (rank r on cuda:LOCAL_RANK), gloo on the CPU. Rank r = cfg_rank * seq_size + seq_rank: with
cfg, ranks [0, seq_size) compute the cond row and [seq_size, 2 seq_size) the uncond row; with seq, the ranks of
one row share its image tokens (Ulysses, seq.py). Rank 0 alone reads the inputs, runs the text encoder and the
VAE, writes the output and prints; every rank loads the transformer from the same files.

Errors. A bad launch (sizes, heads, WORLD_SIZE without torchrun's variables) is decided alike by every rank
from its environment and the model's config, before any process group: rank 0 prints the line, every rank
exits non-zero. Afterwards the ranks meet at sync points (one all_gather_object of each rank's error or None):
rank 0's inputs checked, every rank's weights loaded, the denoise inputs handed over, the output written. A
failure on any rank before one of them is reported there, by rank 0, for all. A rank that fails inside the
denoise loop (between collectives) cannot be waited for: it prints its own line and exits, torchrun stops the
others, and nothing is written (rank 0 writes only after the loop).
"""
import datetime
import os
import re

import torch
import torch.distributed as dist

from loaders import LoadError

ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class ParallelError(LoadError):
    """One line for the user; `quiet` on the ranks other than 0, which exit non-zero without printing."""

    def __init__(self, message, quiet=False):
        super().__init__(message)
        self.quiet = quiet


def timeout_s():
    """How long a rank waits for the others (rendezvous and every collective); QIE_PARALLEL_TIMEOUT seconds."""
    return float(os.environ.get("QIE_PARALLEL_TIMEOUT", 600))


def launch_env():
    """(world size, rank, local rank) from torchrun's variables; one line if WORLD_SIZE comes without them."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    if world > 1:
        missing = [k for k in ENV if not os.environ.get(k)]
        if missing:
            raise ParallelError(f"WORLD_SIZE={world} is set but {', '.join(missing)} not: launch with "
                                f"`torchrun --nproc-per-node {world} cli.py edit ... --parallel MODE`", quiet=rank != 0)
    return world, rank, int(os.environ.get("LOCAL_RANK", "0") or 0)


def sizes(mode, world, heads):
    """(cfg_size, seq_size) of `mode` on `world` ranks, or one line saying why not."""
    if mode == "blocks":
        if world != 1:
            raise ParallelError(f"--parallel blocks runs in one process over --devices; torchrun started {world}")
        return 1, 1
    if mode == "cfg":
        if world != 2:
            raise ParallelError(f"--parallel cfg runs on 2 ranks (cond, uncond); torchrun started {world}: use "
                                "--nproc-per-node 2, or cfg+seq for more")
        return 2, 1
    cfg = 2 if mode == "cfg+seq" else 1
    if world < 2 * cfg or world % cfg:
        need = "an even number of ranks, at least 4" if cfg == 2 else "at least 2 ranks"
        raise ParallelError(f"--parallel {mode} needs {need}; torchrun started {world}")
    seq = world // cfg
    if heads % seq:
        raise ParallelError(f"--parallel {mode}: {seq} sequence ranks do not divide the transformer's {heads} "
                            f"attention heads (Ulysses gives each rank heads/{seq}); use "
                            f"{', '.join(str(d * cfg) for d in range(2, heads + 1) if heads % d == 0)} processes")
    return cfg, seq


class World:
    """This process's place in the edit: rank, sizes, its row and sequence group; the sync points."""

    def __init__(self, mode, cfg_size, seq_size, device, owns_group=True):
        self.mode, self.cfg_size, self.seq_size, self.device = mode, cfg_size, seq_size, device
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        if self.size != cfg_size * seq_size:
            raise ParallelError(f"--parallel {mode}: the process group has {self.size} ranks, expected "
                                f"{cfg_size * seq_size}")
        self.cfg_rank, self.seq_rank = divmod(self.rank, seq_size)
        self.owns_group = owns_group
        self.seq_group = None               # None: the whole world (seq alone)
        if cfg_size > 1 and seq_size > 1:   # every rank creates every group, in the same order
            groups = [dist.new_group(list(range(c * seq_size, (c + 1) * seq_size))) for c in range(cfg_size)]
            self.seq_group = groups[self.cfg_rank]
        self.open = True        # sync points are still to come (a failure can be agreed on at the next)
        self.in_loop = False    # a tensor collective of the denoise loop may be pending on the other ranks
        self.lost = False       # a rank failed inside the loop: no barrier, no orderly teardown

    def sync(self, error=None, payload=None):
        """Every rank's (error, payload); raises the first error (rank 0 tells it, the others stay quiet),
        else returns the payloads by rank."""
        got = [None] * self.size
        dist.all_gather_object(got, (error, payload))
        failed = [(r, e) for r, (e, _) in enumerate(got) if e is not None]
        if failed:
            self.open = False
            r, e = failed[0]
            raise ParallelError(e if r == 0 else f"rank {r}: {e}", quiet=self.rank != 0)
        return [p for _, p in got]

    def inputs_ready(self, cfg_batch):
        """Rank 0: its inputs are read and checked (sync point 1; the other ranks then load the weights)."""
        if self.cfg_size > 1 and cfg_batch != 2:
            raise ParallelError(f"--parallel {self.mode} puts cond and uncond on separate ranks, but CFG is off "
                                "(--cfg 1, or prompt embeddings without negative_prompt_embeds); use --parallel seq")
        self.sync()

    def attach(self, models):
        """Every rank's weights are loaded (sync point 2): the denoise loop now runs on all of them."""
        from engine.parallel.denoise import ParallelDenoise
        self.sync()
        models.parallel = ParallelDenoise(self, models.transformer)   # read by pipelines.common.denoise

    def follow(self, load):
        """Ranks > 0: wait for rank 0's inputs, load the same weights (load() -> EditModels), run rank 0's
        denoise loop with it."""
        from engine.pipelines.common import denoise
        self.sync()
        models = load()
        self.attach(models)
        with torch.inference_mode():
            denoise(models, *[None] * 8)    # every input comes from rank 0 (ParallelDenoise.share)

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None:
            if self.open:
                self.sync()                 # sync point 4: rank 0 wrote the output
                self.open = False
            return False
        if self.in_loop:                    # the others may sit in a collective: nothing can be agreed now
            self.lost = True
            if isinstance(exc, dist.DistError) or "gloo" in str(exc).lower() or "nccl" in str(exc).lower():
                raise ParallelError(f"another rank stopped during the denoise; its own line says why "
                                    f"({_first_line(exc)[:100]})", quiet=self.rank != 0) from None
            if self.rank != 0:              # this rank's own failure: its one line (rank 0 cannot be told)
                raise ParallelError(f"rank {self.rank}: {describe(exc)}") from exc
            return False
        if not self.open:                   # already agreed (a sync raised it)
            return False
        try:
            self.sync(error=describe(exc))
        except ParallelError as agreed:
            if self.rank == 0 and not str(agreed).startswith("rank "):
                return False                # rank 0's own error: the CLI prints it as it would for one process
            raise agreed from None
        return False

    def close(self):
        """After the CLI printed its line: a barrier (rank 0's line comes before any rank exits), then the
        process group goes. Nothing waits after a failure inside the loop."""
        if self.lost or not dist.is_initialized():
            return
        try:
            dist.barrier()
        finally:
            if self.owns_group:
                dist.destroy_process_group()


def describe(exc):
    """One line for an exception raised on some rank."""
    if isinstance(exc, LoadError):
        return str(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "out of GPU memory"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc):
    """The message's first line, without a leading "[source/file.cc:123]"."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip()).splitlines()
    return text[0][:300] if text else type(exc).__name__


def launch(args):
    """The World of this process for `args.parallel` cfg|seq|cfg+seq under torchrun (the process group made),
    None for one process (`--parallel blocks` included: its devices are checked here). Refuses several
    processes without --parallel: each would run the whole edit and write the same file."""
    mode = getattr(args, "parallel", None)
    world, rank, local_rank = launch_env()
    quiet = rank != 0
    if mode is None:
        if world > 1:
            raise ParallelError(f"started as {world} processes (WORLD_SIZE) without --parallel: each would run the "
                                "whole job; give `edit` --parallel cfg|seq|cfg+seq, or run one process", quiet=quiet)
        return None
    try:
        if getattr(args, "vram", None) or getattr(args, "offload", None):
            raise ParallelError(f"--parallel {mode} does not take --vram/--offload yet (the planner plans one device)")
        if mode == "blocks":
            sizes(mode, world, 0)
            from engine.parallel.blocks import check_devices
            args.devices = check_devices(args.devices)
            args.device = args.devices[0].type
            if args.device == "cuda":
                torch.cuda.set_device(args.devices[0])
            return None
        if getattr(args, "devices", None):
            raise ParallelError(f"--devices is for --parallel blocks; --parallel {mode} uses one device per rank")
        cfg_size, seq_size = sizes(mode, world, _heads(args.model))
        backend = "gloo"
        if args.device == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ParallelError(f"rank {rank} is local rank {local_rank}, but this host has "
                                    f"{torch.cuda.device_count()} GPU(s)")
            torch.cuda.set_device(local_rank)   # "cuda" now means this rank's GPU
            backend = "nccl"
    except LoadError as e:
        raise ParallelError(str(e), quiet=quiet) from None
    owns = not dist.is_initialized()
    if owns:
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
        except dist.DistError as e:
            raise ParallelError(f"--parallel {mode}: not every one of the {world} ranks joined within "
                                f"{timeout_s():.0f} s (QIE_PARALLEL_TIMEOUT): {_first_line(e)}", quiet=quiet) from None
    return World(mode, cfg_size, seq_size, args.device, owns_group=owns)


def _heads(model_dir):
    from loaders import Snapshot

    from engine.config import MMDiTConfig
    return MMDiTConfig.from_dict(Snapshot(model_dir).config("transformer")).num_attention_heads
