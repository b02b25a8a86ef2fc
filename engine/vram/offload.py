"""Weight streaming: run a ModuleList of identical blocks with only a few of them on the device.

stream_blocks(blocks, device, resident) is a transform over a built model (the model never knows): the
first `resident` blocks move to the device and stay; every other block keeps its weights in host memory,
packed in one flat buffer per block (page-locked on CUDA) so that a block travels as one copy. Two device
slots, allocated once, take turns: while the compute stream runs block k out of slot A, the copy stream
fills slot B with the next streamed block, after B's "free" event (recorded when B's last user finished);
the next block's pre-hook makes the compute stream wait on B's "filled" event and points the block's
parameters at B. The last streamed block prefetches the first, so the next forward (the next denoising
step) starts with its copy already in flight. On the CPU the same code runs with plain copies and no
events, so the CPU tests check the bookkeeping that the GPU relies on.

Parameters named in `skip` (the modulation weights, which modulation_table replaces) are never transferred.
Call handle.remove() before dropping a streamed model: it frees the slots and unpins the host buffers.
"""
import contextlib
import weakref
from functools import partial

import torch
import torch.nn as nn

ALIGN = 256  # bytes; every tensor of a flat buffer starts on this boundary (cuBLAS/TMA want >= 16)


def _nbytes(t):
    return t.numel() * t.element_size()


def _skipped(name, skip):
    return any(name == s or name.startswith(s + ".") for s in skip)


class _Layout:
    """Where each streamed parameter of a block lives in its flat uint8 buffer."""

    def __init__(self, named_params):
        self.entries, offset = [], 0           # (name, shape, dtype, offset)
        for name, p in named_params:
            self.entries.append((name, tuple(p.shape), p.dtype, offset))
            offset += -(-_nbytes(p) // ALIGN) * ALIGN
        self.nbytes = offset

    def key(self):
        return [e[:3] for e in self.entries]

    def views(self, flat):
        out = []
        for _, shape, dtype, offset in self.entries:
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            out.append(flat[offset:offset + n].view(dtype).view(shape))
        return out


def _host_buffer(nbytes, pin):
    """A flat uint8 host buffer and, when `pin`, the pointer cudaHostRegister pinned (None otherwise).
    Registering a plain allocation pins exactly nbytes; torch's pin_memory allocator would round every
    block up to a power of two (a 453 MB bf16 MMDiT block would take 512 MiB of locked memory)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if not pin or nbytes == 0:
        return buf, None
    try:
        err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0))
    except Exception:
        err = -1
    if err == 0:
        return buf, buf.data_ptr()
    if err > 0:   # the failed call left CUDA's last-error set; the next kernel launch check would raise it
        try:
            torch.zeros(1, device="cuda").add_(1)
            torch.cuda.synchronize()
        except RuntimeError:
            pass
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), None  # fall back: rounded, still pinned


def _unregister(ptr, _buf):
    # _buf keeps the memory alive until it is unpinned
    torch.cuda.cudart().cudaHostUnregister(ptr)


class _CudaSync:
    """The two-stream ordering: copies on a side stream, waits/records as events (never synchronize)."""

    def __init__(self, device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def event(self):
        return torch.cuda.Event()

    def copy(self, dst, src, after, done):
        """dst <- src on the copy stream, once `after` (a compute-stream event) has passed; then record `done`."""
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done.record(self.stream)

    def wait(self, event):                     # the compute stream waits for `event`
        torch.cuda.current_stream(self.device).wait_event(event)

    def record(self, event):                   # on the compute stream
        event.record(torch.cuda.current_stream(self.device))

    def synchronize(self):
        self.stream.synchronize()


class _HostSync:
    """CPU: one stream, so a copy is a plain copy and events are no-ops."""

    def event(self):
        return None

    def copy(self, dst, src, after, done):
        dst.copy_(src)

    def wait(self, event):
        pass

    def record(self, event):
        pass

    def synchronize(self):
        pass


class _Slot:
    def __init__(self, layout, device, sync):
        self.flat = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
        self.views = layout.views(self.flat)
        self.block = None                      # streamed index whose copy this slot holds (or is receiving)
        self.filled = sync.event()             # recorded on the copy stream after the copy
        self.free = sync.event()               # recorded on the compute stream after the block ran


class StreamHandle:
    """What stream_blocks returns. Counters: bytes_copied (all host->device block copies so far), misses
    (blocks that were not prefetched when their turn came: 1 per cold start, more if the order changes)."""

    def __init__(self, blocks, device, resident, skip, pin, sync=None):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        pin = cuda if pin is None else pin
        self.sync = sync or (_CudaSync(self.device) if cuda else _HostSync())
        blocks = list(blocks)
        if not 0 <= resident <= len(blocks):
            raise ValueError(f"resident must be in 0..{len(blocks)}, got {resident}")
        named = [[(n, p) for n, p in b.named_parameters() if not _skipped(n, skip)] for b in blocks]
        with torch.no_grad(), torch.inference_mode(False):
            self.resident_bytes = 0
            for b, params in zip(blocks[:resident], named):
                for _, p in params:
                    p.data = p.data.to(self.device)
                    self.resident_bytes += _nbytes(p)
            for b in blocks:
                for name, buf in b.named_buffers():
                    mod, _, attr = name.rpartition(".")
                    b.get_submodule(mod)._buffers[attr] = buf.to(self.device)

            self.blocks = blocks[resident:]
            self.layout = _Layout(named[resident]) if self.blocks else _Layout([])
            for i, params in enumerate(named[resident:]):
                if _Layout(params).key() != self.layout.key():
                    raise ValueError(f"streamed block {resident + i} differs in parameter names/shapes/dtypes "
                                     "from the first streamed block")
            self.params, self.host, self.host_views, self._pinned = [], [], [], []
            for params in named[resident:]:    # one block at a time: never two full host copies
                flat, ptr = _host_buffer(self.layout.nbytes, pin)
                views = self.layout.views(flat)
                for (_, p), v in zip(params, views):
                    v.copy_(p.data)
                    p.data = v
                self.params.append([p for _, p in params])
                self.host.append(flat)
                self.host_views.append(views)
                if ptr is not None:      # unpinned by remove(), or when the handle is collected
                    self._pinned.append(weakref.finalize(self, _unregister, ptr, flat))
                    self._pinned[-1].atexit = False   # at exit the process lets go of everything anyway
            self.slots = [_Slot(self.layout, self.device, self.sync) for _ in range(min(2, len(self.blocks)))]
        self.slot_bytes = self.layout.nbytes
        n = len(self.blocks)
        # steady state: with <= 2 streamed blocks each keeps its slot and nothing travels after the first forward
        self.bytes_streamed_per_forward = n * self.slot_bytes if n > len(self.slots) else 0
        self.host_bytes = n * self.slot_bytes
        self.bytes_copied, self.misses, self._last = 0, 0, None
        self._hooks = []
        for k, b in enumerate(self.blocks):
            self._hooks.append(b.register_forward_pre_hook(partial(self._pre, k)))
            self._hooks.append(b.register_forward_hook(partial(self._post, k)))

    def _slot_of(self, k):
        return next((s for s in self.slots if s.block == k), None)

    def _fill(self, slot, k):
        self.sync.copy(slot.flat, self.host[k], after=slot.free, done=slot.filled)
        slot.block = k
        self.bytes_copied += self.slot_bytes

    def _pre(self, k, module, args):
        slot = self._slot_of(k)
        if slot is None:                       # cold start (or blocks run out of order): copy now
            self.misses += 1
            slot = next((s for s in self.slots if s is not self._last), self.slots[0])
            self._fill(slot, k)
        self.sync.wait(slot.filled)
        for p, v in zip(self.params[k], slot.views):
            p.data = v
        self._last = slot
        nxt = (k + 1) % len(self.blocks)       # wraps: the last block prefetches the first for the next forward
        if self._slot_of(nxt) is None:
            self._fill(next(s for s in self.slots if s is not slot), nxt)

    def _post(self, k, module, args, output):
        self.sync.record(self._last.free)
        for p, v in zip(self.params[k], self.host_views[k]):
            p.data = v                         # the module reads as a plain host module between calls

    def remove(self):
        """Plain modules again: hooks gone, slots freed, host buffers unpinned. Resident blocks stay on the
        device; streamed ones keep their weights in (now pageable) host memory."""
        self.sync.synchronize()                # no copy may still write a slot or read a host buffer
        for h in self._hooks:
            h.remove()
        self._hooks, self.slots = [], []
        for f in self._pinned:
            f()
        self._pinned = []


def stream_blocks(blocks: nn.ModuleList, device, resident: int, skip=("img_mod", "txt_mod"), pin=None):
    """Keep blocks[:resident] on `device`, stream the rest through two slots (see the module docstring).
    pin: page-lock the host buffers (default: when `device` is CUDA). Returns a StreamHandle."""
    return StreamHandle(blocks, device, resident, tuple(skip), pin)


def move_except(model: nn.Module, device, *block_lists):
    """Move every parameter and buffer of `model` outside the given ModuleLists to `device` (embeddings,
    norms, projections: the non-block weights). Returns the bytes moved."""
    inside = {id(m) for blocks in block_lists for m in blocks.modules()}
    moved = 0
    with torch.no_grad(), torch.inference_mode(False):
        for m in model.modules():
            if id(m) in inside:
                continue
            for p in m._parameters.values():
                if p is not None:
                    p.data = p.data.to(device)
                    moved += _nbytes(p)
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = b.to(device)
    return moved


def move_except_modulation(model, device, names=("img_mod", "txt_mod")):
    """Resident mode: the whole MMDiT on `device` but its modulation Linears (a third of its weights), which
    only modulation_table_streamed needs, once per edit. Returns the bytes left on the host."""
    held = [(blk, n, getattr(blk, n)) for blk in model.transformer_blocks for n in names]
    for blk, n, _ in held:
        setattr(blk, n, None)
    try:
        model.to(device)
    finally:
        for blk, n, m in held:
            setattr(blk, n, m)
    return sum(_nbytes(p) for _, _, m in held if m is not None for p in m.parameters())


@contextlib.contextmanager
def _on_device(modules, device):
    """Temporarily give the parameters of `modules` device copies; their host tensors come back after."""
    saved, device = [], torch.device(device)
    with torch.inference_mode(False):
        for m in modules:
            for p in m.parameters():
                if p.device.type != device.type or device.index not in (None, p.device.index):
                    saved.append((p, p.data))
                    p.data = p.data.to(device)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


def modulation_table_streamed(model, timesteps, device, names=("img_mod", "txt_mod")):
    """engine.models.mmdit.modulation_table for a model whose modulation weights stay on the host (skipped by
    stream_blocks): each block's img_mod/txt_mod visit `device` once, for all steps, then leave. Same
    shapes and order of operations per (step, block) as modulation_table, so the same table bit for bit.
    Needs the non-block weights (time_text_embed) on `device` and `timesteps` there too."""
    blocks = model.transformer_blocks
    with torch.inference_mode():
        tembs = [model.time_embedding(t.reshape(1)) for t in timesteps]
        table = [[None] * len(blocks) for _ in timesteps]
        for j, blk in enumerate(blocks):
            mods = [getattr(blk, n) for n in names]
            if any(m is None for m in mods):
                raise RuntimeError("modulation weights were dropped; load the model again to build a new table")
            with _on_device(mods, device):
                for i, temb in enumerate(tembs):
                    table[i][j] = blk.modulation(temb, model.cfg.zero_cond_t)
    return table
