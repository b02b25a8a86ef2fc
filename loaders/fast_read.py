"""Our own safetensors reader for the load hot path: several threads read the shards in large chunks
straight into each tensor's destination, which the caller allocated where the tensor will live.

The format: 8 bytes little-endian header length n, n bytes of JSON ({key: {dtype, shape, data_offsets}},
offsets relative to the byte after the header), then the raw tensors back to back.

Destinations (any mix, per key):
- a host tensor of the file's dtype (plain or pinned: a streamed block's flat buffer, the modulation weights):
  os.preadv scatters a file range straight into the tensors' memory, no copy in between;
- a GPU tensor: the range lands in a pinned staging buffer (two per thread, taking turns) and travels with a
  non_blocking copy on the thread's own stream; a dtype cast runs on the GPU after it (raw bytes into a GPU
  scratch buffer, then one cast kernel into the destination);
- a host tensor of another dtype: staged the same way, cast by copy_ on the host.
Same bits as safe_open + Tensor.to(dtype): raw bytes are copied as they are, and casts round to nearest even
on either device. Nothing else is allocated: no full host copy of anything.
"""
import ctypes
import json
import os
import threading
import time
from dataclasses import dataclass

import torch

from .safetensors_io import LoadError, _weight_files, check_index

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 << 20      # safetensors' own limit
ALIGN = 256                 # bytes: where each piece starts in a staging buffer (any dtype view is legal)


@dataclass(frozen=True)
class TensorInfo:
    path: str
    dtype: torch.dtype
    shape: tuple
    begin: int              # absolute file offsets of the raw bytes
    end: int

    @property
    def nbytes(self):
        return self.end - self.begin


def _corrupt(path, size, why):
    return LoadError(f"cannot read {path} ({size} bytes): {why}; the file is truncated or corrupt, re-download it")


def read_header(path):
    """{key: TensorInfo} of one .safetensors file from its header alone, every entry checked against the file
    size; None if a dtype is one this reader does not take (the caller falls back to safe_open)."""
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(MAX_HEADER, size - 8):
                raise _corrupt(path, size, f"header length {n} does not fit the file")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError):
        raise _corrupt(path, size, "the header is not JSON") from None
    except OSError as e:
        raise LoadError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, size, "the header is not a JSON object")
    header.pop("__metadata__", None)
    infos, data = {}, 8 + n
    for key, e in header.items():
        try:
            name, shape, (a, b) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, size, f"header entry {key!r} lacks dtype/shape/data_offsets") from None
        if name not in DTYPES:
            return None
        dtype = DTYPES[name]
        numel = 1
        for d in shape:
            numel *= d
        if b - a != numel * dtype.itemsize or a < 0:
            raise _corrupt(path, size, f"tensor {key} spans {b - a} bytes, its shape {list(shape)} needs "
                                       f"{numel * dtype.itemsize}")
        if data + b > size:
            raise _corrupt(path, size, f"tensor {key} ends at byte {data + b}")
        infos[key] = TensorInfo(path, dtype, shape, data + a, data + b)
    return infos


def reads_fast(device):
    """Whether this reader serves a load to `device` (cpu, cuda, meta: allocation only, the host buffers
    filled). QIE_READER=safe_open gives the old path, the reference the tests and benchmarks compare with. Its
    CUDA paths (pinned staging, copy streams, the cast on the GPU, the warm-up beside it) passed their -m gpu
    tests on an H200 (2026-12-02) and loaded the full-size MMDiT at 1.06-1.12x the disk's read time, against
    1.76-1.84x for safe_open (benchmarks/results/load_h200.json)."""
    choice = os.environ.get("QIE_READER")
    if choice:
        return choice == "fast"
    return torch.device(device).type in ("cpu", "cuda", "meta")


def tensor_index(folder):
    """{key: TensorInfo} over every safetensors file of a component folder (sharded or not), or None when a
    file holds a dtype this reader does not take."""
    files, weight_map = _weight_files(folder)
    index = {}
    for path in files:
        infos = read_header(path)
        if infos is None:
            return None
        index.update(infos)
    check_index(folder, weight_map, index)
    return index


def target_dtype(key, info, dtype=None, keep_fp32=()):
    """The dtype load_state_dict gives a tensor: `dtype` for floating tensors (not those whose key holds a
    keep_fp32 fragment), the file's own otherwise."""
    if dtype is None or not info.dtype.is_floating_point or any(s in key for s in keep_fp32):
        return info.dtype
    return dtype


def _default_threads():
    return int(os.environ.get("QIE_LOAD_THREADS", min(8, os.cpu_count() or 1)))


def _default_chunk():
    return int(os.environ.get("QIE_LOAD_CHUNK_MB", 32)) << 20


def _bytes_of(t, start=0, nbytes=None):
    """A writable memoryview of a contiguous host tensor's bytes [start, start + nbytes)."""
    nbytes = t.numel() * t.element_size() - start if nbytes is None else nbytes
    if nbytes == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_ubyte * nbytes).from_address(t.data_ptr() + start)).cast("B")


@dataclass
class _Piece:
    offset: int             # in the file
    nbytes: int
    dest: torch.Tensor      # the destination, flattened
    first: int              # its first element this piece fills
    src_dtype: torch.dtype


def _plan(index, dests, chunk):
    """Jobs: runs of pieces contiguous in one file, each at most `chunk` bytes, all direct (host, same dtype)
    or all staged to one device. Sorted by file then offset, so the threads read each file front to back."""
    pieces = []
    for key, dest in dests.items():
        if dest.is_meta:                        # placed on a stand-in device (a dry run): nothing to read
            continue
        info = index.get(key)
        if info is None:
            raise LoadError(f"no tensor {key} in the checkpoint")
        numel = 1
        for d in info.shape:
            numel *= d
        if dest.numel() != numel or not dest.is_contiguous():
            raise ValueError(f"{key}: destination {tuple(dest.shape)} (contiguous {dest.is_contiguous()}) "
                             f"does not take {list(info.shape)}")
        flat, es = dest.view(-1), info.dtype.itemsize
        for a in range(0, info.nbytes, chunk):
            n = min(chunk, info.nbytes - a)
            pieces.append((info.path, _Piece(info.begin + a, n, flat, a // es, info.dtype)))
    order = {p: i for i, p in enumerate(dict.fromkeys(path for path, _ in pieces))}
    pieces.sort(key=lambda x: (order[x[0]], x[1].offset))
    jobs, cur, cur_key, cur_end, cur_bytes = [], [], None, -1, 0
    for path, p in pieces:
        direct = p.dest.device.type == "cpu" and p.dest.dtype == p.src_dtype
        key = (path, direct, str(p.dest.device))
        room = cur_bytes + (p.nbytes if direct else -(-p.nbytes // ALIGN) * ALIGN)
        if cur and (key != cur_key or p.offset != cur_end or room > chunk or len(cur) >= 512):
            jobs.append((cur_key, cur))
            cur, cur_bytes = [], 0
        cur.append(p)
        cur_key, cur_end = key, p.offset + p.nbytes
        cur_bytes += p.nbytes if direct else -(-p.nbytes // ALIGN) * ALIGN
    if cur:
        jobs.append((cur_key, cur))
    return jobs


def _preadv_all(fd, views, offset, path):
    """os.preadv until every view is full (a read may return short); a short file raises LoadError."""
    views = [v for v in views if len(v)]
    while views:
        n = os.preadv(fd, views, offset)
        if n == 0:
            size = os.fstat(fd).st_size
            raise _corrupt(path, size, f"it ends at byte {offset}")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


class _Staging:
    """One worker's staging per destination device: two host buffers taking turns (pinned for a GPU) and,
    for a GPU, a copy stream, an event per buffer and (for casts) a GPU scratch buffer per buffer."""

    def __init__(self, chunk):
        self.chunk, self.per_device, self._pinned = chunk, {}, []

    def take(self, device):
        """(state, index, host uint8 buffer) of the next buffer, once the copy that last read it has finished."""
        st = self.per_device.get(device)
        if st is None:
            cuda = device.type == "cuda"
            st = self.per_device[device] = {
                "bufs": [_host_buffer(self.chunk, cuda, self._pinned) for _ in range(2)], "turn": 0,
                "stream": torch.cuda.Stream(device) if cuda else None, "scratch": [None, None],
                "events": [torch.cuda.Event(), torch.cuda.Event()] if cuda else [None, None]}
        i = st["turn"]
        st["turn"] = 1 - i
        if st["events"][i] is not None:
            st["events"][i].synchronize()
        return st, i, st["bufs"][i]

    def scratch_for(self, st, i, device):
        if st["scratch"][i] is None:
            st["scratch"][i] = torch.empty(self.chunk, dtype=torch.uint8, device=device)
        return st["scratch"][i]

    def close(self):
        for st in self.per_device.values():
            if st["stream"] is not None:
                st["stream"].synchronize()
        for ptr in self._pinned:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self._pinned, self.per_device = [], {}


def _host_buffer(nbytes, pin, registered):
    """A uint8 host buffer, page-locked with cudaHostRegister when `pin` (exact size; falls back to torch's
    pinned allocator, then to pageable memory if the GPU refuses)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if pin:
        try:
            err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0))
        except Exception:
            err = -1
        if err == 0:
            registered.append(buf.data_ptr())
            return buf
        if err > 0:   # the refusal left CUDA's last error set: a sync raises and clears it here, not later
            try:
                torch.cuda.synchronize()
            except RuntimeError:
                pass
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:
            pass
    return buf


def _run_job(job, fds, st):
    (path, direct, _), pieces = job
    fd = fds[path]
    if direct:
        views = [_bytes_of(p.dest, p.first * p.dest.element_size(), p.nbytes) for p in pieces]
        _preadv_all(fd, views, pieces[0].offset, path)
        return
    dev = pieces[0].dest.device
    state, i, buf = st.take(dev)
    spans, at = [], 0
    for p in pieces:                            # each piece at an ALIGN boundary of the buffer
        spans.append(at)
        at += -(-p.nbytes // ALIGN) * ALIGN
    _preadv_all(fd, [_bytes_of(buf, s, p.nbytes) for s, p in zip(spans, pieces)], pieces[0].offset, path)
    if dev.type == "cpu":
        for s, p in zip(spans, pieces):
            n = p.nbytes // p.src_dtype.itemsize
            p.dest[p.first:p.first + n].copy_(buf[s:s + p.nbytes].view(p.src_dtype))
        return
    with torch.cuda.stream(state["stream"]):
        for s, p in zip(spans, pieces):
            n = p.nbytes // p.src_dtype.itemsize
            dst = p.dest[p.first:p.first + n]
            if p.dest.dtype == p.src_dtype:
                dst.view(torch.uint8).copy_(buf[s:s + p.nbytes], non_blocking=True)
            else:                               # raw bytes to the GPU, then the cast there
                raw = st.scratch_for(state, i, dev)[s:s + p.nbytes]
                raw.copy_(buf[s:s + p.nbytes], non_blocking=True)
                dst.copy_(raw.view(p.src_dtype))
        state["events"][i].record(state["stream"])


def _groups(jobs, after):
    """Per job, [(group, bytes)] of its pieces that land inside one of the `after` host buffers; and each
    group's byte count."""
    import bisect
    spans = sorted((buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size(), g)
                   for g, (buf, _) in enumerate(after))
    starts = [a for a, _, _ in spans]
    per_job, total = [], [0] * len(after)
    for _, pieces in jobs:
        hits = []
        for p in pieces:
            if p.dest.device.type != "cpu" or not spans:
                continue
            addr = p.dest.data_ptr() + p.first * p.dest.element_size()
            i = bisect.bisect_right(starts, addr) - 1
            if i >= 0 and addr < spans[i][1]:
                hits.append((spans[i][2], p.nbytes))
                total[spans[i][2]] += p.nbytes
        per_job.append(hits)
    return per_job, total


def read_into(index, dests, threads=None, chunk=None, after=()):
    """Fill every tensor of `dests` ({key: tensor}, contiguous, anywhere, any dtype the file's casts to) from
    the files `index` (tensor_index) names; meta tensors are skipped. after: (host buffer, fn) pairs; fn()
    runs (on a reader thread) as soon as every destination inside that buffer has been written, so work on a
    filled buffer (page-locking it) overlaps the rest of the reads. Returns {"bytes", "seconds", "threads"}.
    On return every copy has landed (the copy streams are synchronized) and every `after` fn has run."""
    threads = threads or _default_threads()
    chunk = -(-(chunk or _default_chunk()) // ALIGN) * ALIGN
    jobs = _plan(index, dests, chunk)
    after = list(after)
    hits, left = _groups(jobs, after)
    total = sum(p.nbytes for _, ps in jobs for p in ps)
    start = time.perf_counter()
    fds = {}
    try:
        for (path, _, _), _ in jobs:
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):   # a wider read-ahead window on this file
                    os.posix_fadvise(fds[path], 0, 0, os.POSIX_FADV_SEQUENTIAL)
        _run_all(jobs, fds, min(threads, max(1, len(jobs))), chunk, hits, left, [fn for _, fn in after])
    except OSError as e:
        raise LoadError(f"cannot read {e.filename or 'a weight file'}: {e.strerror}") from None
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"bytes": total, "seconds": time.perf_counter() - start, "threads": threads}


def _run_all(jobs, fds, threads, chunk, hits, left, callbacks):
    lock, state, errors = threading.Lock(), {"next": 0}, []

    def landed(i):                              # job i is written: run the callbacks of buffers now complete
        ready = []
        with lock:
            for g, n in hits[i]:
                left[g] -= n
                if left[g] == 0:
                    ready.append(g)
        for g in ready:
            callbacks[g]()

    def work():
        st = _Staging(chunk)
        try:
            with torch.inference_mode():   # the destinations may be inference tensors; parameters take it too
                while not errors:
                    with lock:
                        i = state["next"]
                        state["next"] += 1
                    if i >= len(jobs):
                        break
                    _run_job(jobs[i], fds, st)
                    if hits[i]:
                        landed(i)
        except BaseException as e:  # noqa: BLE001 (reported on the calling thread)
            errors.append(e)
        finally:
            try:
                st.close()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

    if threads == 1:
        work()
    else:
        workers = [threading.Thread(target=work, name=f"fast_read-{k}", daemon=True) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    if errors:
        raise errors[0]
    for g, fn in enumerate(callbacks):
        if left[g] == 0 and not any(g == h for job in hits for h, _ in job):
            fn()                                # a buffer no destination of this read lies in
