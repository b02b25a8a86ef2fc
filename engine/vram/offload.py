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

Placing a model built on the meta device allocates instead of copying: resident tensors get uninitialised
device memory and streamed ones views of their block's (pinned) flat buffer, which the loader
(loaders/fast_read.py) then fills in place, so no weight ever has a host copy it does not live in.
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


def _materialize(t, device):
    """t on `device`: a copy, or for a meta tensor (whose values the loader writes later) uninitialised memory."""
    if t.is_meta:
        return torch.empty(t.shape, dtype=t.dtype, device=device)
    return t.to(device)


def _set_param(root, name, tensor):
    """Replace the (meta) parameter `name` of `root` by one holding `tensor`; returns the new parameter. (A meta
    parameter cannot take host or device data through .data, so the Parameter object itself is new.)"""
    mod, _, attr = name.rpartition(".")
    owner = root.get_submodule(mod) if mod else root
    old = owner._parameters[attr]
    p = nn.Parameter(tensor, requires_grad=old.requires_grad)
    owner._parameters[attr] = p
    return p


def _place_module(m, device):
    """m's own parameters and buffers (not its children's) on `device`."""
    for attr, p in list(m._parameters.items()):
        if p is None:
            continue
        new = _materialize(p.data, device)
        if p.is_meta or not torch._has_compatible_shallow_copy_type(p.data, new):  # to or from meta
            m._parameters[attr] = nn.Parameter(new, requires_grad=p.requires_grad)
        else:
            p.data = new
    for attr, b in m._buffers.items():
        if b is not None:
            m._buffers[attr] = _materialize(b, device)


def _register(buf):
    """cudaHostRegister `buf` (a flat uint8 host tensor) in place: its pointer, or None if refused. Registering
    a plain allocation pins exactly its bytes; torch's pin_memory allocator would round every block up to a
    power of two (a 453 MB bf16 MMDiT block would take 512 MiB of locked memory)."""
    if buf.numel() == 0:
        return None
    try:
        err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0))
    except Exception:
        err = -1
    if err == 0:
        return buf.data_ptr()
    if err > 0:   # the failed call left CUDA's last-error set; the next kernel launch check would raise it
        try:
            torch.zeros(1, device="cuda").add_(1)
            torch.cuda.synchronize()
        except RuntimeError:
            pass
    return None


def _host_buffer(nbytes, pin):
    """A flat uint8 host buffer and, when `pin`, the pointer cudaHostRegister pinned (None otherwise; if
    registering is refused, torch's pinned allocator serves, rounded but still pinned)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if not pin or nbytes == 0:
        return buf, None
    ptr = _register(buf)
    if ptr is not None:
        return buf, ptr
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), None  # fall back: rounded, still pinned


class _Pins:
    """Host buffers pinned now, or after the loader has filled them (`pending`: (buffer, pin) pairs the reader
    calls as each buffer completes, so that page-locking overlaps the reads instead of preceding them)."""

    def __init__(self):
        self._pinned, self.pending = [], []

    def add(self, nbytes, pin, later):
        """A flat uint8 host buffer: pageable unless `pin`; pinned now, or (later) once the loader filled it."""
        if not pin or later:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            if pin:
                self.pending.append((buf, partial(self._pin, buf)))
            return buf
        buf, ptr = _host_buffer(nbytes, True)
        self._track(ptr, buf)
        return buf

    def _pin(self, buf):
        self._track(_register(buf), buf)   # if refused, the buffer stays pageable: slower copies, same bits

    def _track(self, ptr, buf):
        if ptr is not None:      # unpinned by remove(), or when the owner is collected
            f = weakref.finalize(self, _unregister, ptr, buf)
            f.atexit = False     # at exit the process lets go of everything anyway
            self._pinned.append(f)

    @property
    def pinned(self):
        return bool(self._pinned)

    def release(self):
        for f in self._pinned:
            f()
        self._pinned, self.pending = [], []


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
                for name, p in params:
                    new = _materialize(p.data, self.device)
                    if p.is_meta or not torch._has_compatible_shallow_copy_type(p.data, new):  # to or from meta
                        _set_param(b, name, new)
                    else:
                        p.data = new
                    self.resident_bytes += _nbytes(p)
            for b in blocks:
                for name, buf in b.named_buffers():
                    mod, _, attr = name.rpartition(".")
                    b.get_submodule(mod)._buffers[attr] = _materialize(buf, self.device)

            self.blocks = blocks[resident:]
            self.layout = _Layout(named[resident]) if self.blocks else _Layout([])
            for i, params in enumerate(named[resident:]):
                if _Layout(params).key() != self.layout.key():
                    raise ValueError(f"streamed block {resident + i} differs in parameter names/shapes/dtypes "
                                     "from the first streamed block")
            self.params, self.host, self.host_views, self.pins = [], [], [], _Pins()
            for b, params in zip(self.blocks, named[resident:]):  # one block at a time: never two host copies
                empty = all(p.is_meta for _, p in params)          # the loader fills it: pinned once filled
                flat = self.pins.add(self.layout.nbytes, pin, later=empty)
                views = self.layout.views(flat)
                placed = []
                for (name, p), v in zip(params, views):
                    if p.is_meta:              # the loader fills the view later
                        p = _set_param(b, name, v)
                    else:
                        v.copy_(p.data)
                        p.data = v
                    placed.append(p)
                self.params.append(placed)
                self.host.append(flat)
                self.host_views.append(views)
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
        self.pins.release()

    @property
    def pending(self):
        """(host buffer, pin) pairs for the loader: each buffer is page-locked once it is filled."""
        return self.pins.pending


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
            moved += sum(_nbytes(p) for p in m._parameters.values() if p is not None)
            _place_module(m, device)
    return moved


def move_except_modulation(model, device, names=("img_mod", "txt_mod")):
    """Resident mode: the whole MMDiT on `device` but its modulation Linears (a third of its weights), which
    only modulation_table_streamed needs, once per edit. Returns the bytes left on the host."""
    held = [(blk, n, getattr(blk, n)) for blk in model.transformer_blocks for n in names]
    for blk, n, _ in held:
        setattr(blk, n, None)
    try:
        with torch.no_grad(), torch.inference_mode(False):
            for m in model.modules():
                _place_module(m, device)
    finally:
        for blk, n, m in held:
            setattr(blk, n, m)
    return sum(_nbytes(p) for _, _, m in held if m is not None for p in m.parameters())


class HostModulation:
    """The modulation Linears (img_mod/txt_mod, a third of the MMDiT) kept on the host, one flat buffer per
    block, page-locked when `pin` (on CUDA), so that modulation_table_streamed copies them at the link's full
    speed. Meta parameters get views of the buffer for the loader to fill; host ones are copied in, one block
    at a time (never a pageable copy of all of them beside the pinned one). remove() unpins."""

    def __init__(self, blocks, names=("img_mod", "txt_mod"), pin=False):
        self.host, self.pins, self.host_bytes = [], _Pins(), 0
        with torch.no_grad(), torch.inference_mode(False):
            for b in blocks:
                params = [(f"{n}.{pn}", p) for n in names if getattr(b, n, None) is not None
                          for pn, p in getattr(b, n).named_parameters()]
                if not params or not (pin or any(p.is_meta or p.device.type != "cpu" for _, p in params)):
                    continue           # host tensors that need no pinning stay as they are
                layout = _Layout(params)
                empty = all(p.is_meta for _, p in params)
                flat = self.pins.add(layout.nbytes, pin, later=empty)
                for (name, p), v in zip(params, layout.views(flat)):
                    if p.is_meta:
                        _set_param(b, name, v)
                    else:
                        v.copy_(p.data)
                        p.data = v
                self.host.append(flat)
                self.host_bytes += layout.nbytes

    @property
    def pinned(self):
        return self.pins.pinned

    @property
    def pending(self):
        """(host buffer, pin) pairs for the loader: each buffer is page-locked once it is filled."""
        return self.pins.pending

    def remove(self):
        self.pins.release()


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
