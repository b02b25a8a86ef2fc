"""--parallel blocks: one process, the transformer's blocks split over --devices (what diffusers users do with
device_map="balanced" to fit bf16 on two 24 GB cards). For fitting, not speed: the devices take turns.

The non-block weights (embeddings, final norm/projection), the VAE and the text encoder stay on the first
device; the blocks go in order, each device a contiguous run, as many as its free memory allows after what it
already holds (the first device's share shrinks by the non-block weights and the VAE). A forward pre-hook on
each block brings its inputs to the block's device (img/txt once per device boundary; the RoPE table and the
lengths once per device and forward); the last block's outputs return to the first device. The modulation
table is made on the first device (its weights stay on the host, as in one-device runs).
"""
import torch

from loaders import LoadError

from engine.models.vae import to_device as vae_to_device
from engine.vram.offload import move_except

MOD = ("img_mod", "txt_mod")


def check_devices(text):
    """"cuda:0,cuda:1" (or a list) -> [torch.device], at least two, each one this machine has."""
    if not text:
        raise LoadError("--parallel blocks needs --devices, e.g. --devices cuda:0,cuda:1")
    names = text.split(",") if isinstance(text, str) else list(text)
    devices = []
    for name in names:
        try:
            d = torch.device(name.strip())
        except RuntimeError:
            raise LoadError(f"--devices: {name.strip()!r} is not a device (cpu, cuda:0, cuda:1, ...)") from None
        if d.type == "cuda":
            d = torch.device("cuda", d.index or 0)
            if d.index >= torch.cuda.device_count():
                raise LoadError(f"--devices: {d} does not exist here ({torch.cuda.device_count()} GPU(s))")
        elif d.type != "cpu":
            raise LoadError(f"--devices: {d} is not cpu or cuda")
        devices.append(d)
    if len(devices) < 2:
        raise LoadError("--parallel blocks needs at least two --devices")
    return devices


def split_counts(n_blocks, capacities):
    """Blocks per device in proportion to capacities (how many blocks each can hold), contiguous and in
    order; every block placed. Equal capacities split equally (the first devices take any remainder)."""
    total = sum(capacities)
    if total <= 0:
        raise LoadError("no device has room for a transformer block")
    exact = [n_blocks * c / total for c in capacities]
    counts = [int(e) for e in exact]
    by_rest = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_rest[:n_blocks - sum(counts)]:
        counts[i] += 1
    return counts


def plan_split(n_blocks, block_bytes, free, held):
    """Blocks per device: free[i] bytes free, held[i] bytes that device will hold besides blocks. Refuses a
    model that cannot fit. None in free (host memory: one pool shared by "devices") gives an equal split."""
    if any(f is None for f in free):
        return split_counts(n_blocks, [1.0] * len(free))
    room = [max(f - h, 0) / block_bytes for f, h in zip(free, held)]
    if sum(int(r) for r in room) < n_blocks:
        gib = 2 ** 30
        raise LoadError(f"--parallel blocks: {n_blocks} blocks need {n_blocks * block_bytes / gib:.1f} GiB, the "
                        f"devices have {sum(max(f - h, 0) for f, h in zip(free, held)) / gib:.1f} GiB free for them")
    counts = split_counts(n_blocks, room)
    for i, (c, r) in enumerate(zip(counts, room)):    # rounding may give a full device one block too many
        if c > int(r):
            j = max(range(len(room)), key=lambda k: int(room[k]) - counts[k])
            counts[i], counts[j] = counts[i] - 1, counts[j] + 1
    return counts


def _nbytes(module, skip=MOD):
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters()
               if not any(n.startswith(s + ".") for s in skip))


def _free(device):
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def place_blocks(models, devices):
    """EditModels loaded on the host -> blocks split over `devices`, the rest on devices[0]. Returns a line
    saying where the blocks went."""
    mm = models.transformer
    blocks = mm.transformer_blocks
    first = devices[0]
    rest = _nbytes(mm) - sum(_nbytes(b) for b in blocks) + _nbytes(models.vae, ())
    counts = plan_split(len(blocks), max(_nbytes(b) for b in blocks), [_free(d) for d in devices],
                        [rest] + [0] * (len(devices) - 1))
    move_except(mm, first, blocks)
    models.vae = vae_to_device(models.vae, first)
    owner = [d for d, c in zip(devices, counts) for _ in range(c)]
    for blk, d in zip(blocks, owner):
        _move_block(blk, d)
    mover = Mover(first, owner)
    mover.install(blocks)
    mm._block_mover = mover     # kept with the model (its hooks refer to it)
    models.device = str(first)
    spans, start = [], 0
    for d, c in zip(devices, counts):
        spans.append(f"{d}: blocks {start}-{start + c - 1}" if c else f"{d}: none")
        start += c
    return "blocks split: " + ", ".join(spans)


def _move_block(blk, device):
    """The block's weights to `device`, but its modulation Linears (they stay on the host)."""
    held = [(n, getattr(blk, n)) for n in MOD]
    for n, _ in held:
        setattr(blk, n, None)
    try:
        blk.to(device)
    finally:
        for n, m in held:
            setattr(blk, n, m)


class Mover:
    """Forward hooks that bring each block's inputs to its device and the last block's outputs home."""

    def __init__(self, home, owner):
        self.home, self.owner = home, owner
        self.cache = {}         # (id(tensor), device) -> (tensor, its copy): the RoPE table, the lengths
        self.moved = 0          # tensors copied across devices (a test can see the boundary was crossed)

    def install(self, blocks):
        for j, blk in enumerate(blocks):
            blk.register_forward_pre_hook(lambda m, a, kw, j=j: self.before(j, a, kw), with_kwargs=True)
        blocks[len(blocks) - 1].register_forward_hook(lambda m, a, out: self.to(out, self.home))

    def before(self, j, args, kwargs):
        """Block j's (img, txt, mod, rope, kv_len, split, kv_host) on its device: the activations moved
        as they come, the tables (the same tensors for every block of a forward) once per device."""
        if j == 0:
            self.cache.clear()  # a new forward: its tables are new tensors
        dev = self.owner[j]
        return (self.to(args[:2], dev) + self.to(args[2:], dev, self.cache),
                self.to(kwargs, dev, self.cache))

    def to(self, x, dev, cache=None):
        if isinstance(x, torch.Tensor):
            if x.device == dev:
                return x
            key = (id(x), dev)  # the cached tensor is kept, so its id is not reused within the forward
            if cache is None or key not in cache:
                self.moved += 1
                y = x.to(dev, non_blocking=dev.type == "cuda")
                if cache is None:
                    return y
                cache[key] = (x, y)
            return cache[key][1]
        if isinstance(x, (tuple, list)):
            return type(x)(self.to(y, dev, cache) for y in x)
        if isinstance(x, dict):
            return {k: self.to(v, dev, cache) for k, v in x.items()}
        return x
