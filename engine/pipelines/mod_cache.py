"""Modulation tables kept on disk from one process to the next.

A table (engine.pipelines.common.modulations: every block's img/txt modulation for every step of one schedule)
is computed by one visit of the modulation weights: 13.6 GB at full size that live in pinned host memory, so
~0.7 s over PCIe on an H200 inside the first denoising step of every CLI edit, more on a PCIe 4 card. It depends
on the weights (files and LoRAs), the schedule, the dtype and the device and software that computed it; a file
per such key gives the next process the same bits in milliseconds. Entries are safetensors files written
atomically; a missing, unreadable or mismatched one is a miss, never an error. The folder is bounded: the oldest
entries go when it passes LIMIT bytes.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

VERSION = 1         # bump when the table's arithmetic changes: old files then miss
LIMIT = 1 << 30     # bytes kept in the folder (a full-size 4-step table is 26 MB, 50 steps 330 MB)


def table_key(models, timesteps):
    """A hex key of everything the table's bits depend on, or None when the weights cannot be named (a LoRA
    given as an object, a transformer not read from files)."""
    files = list(getattr(models, "weight_files", None) or [])
    if not files:
        return None
    parts = [f"v{VERSION}", torch.__version__, device_name(models.device), str(models.dtype),
             repr(tuple(float(t) for t in timesteps)), str(models.source.get("weights")),
             json.dumps(models.transformer.cfg.__dict__, sort_keys=True, default=str)]
    loras = models.source.get("loras", [])
    for path, scale in [(f, None) for f in files] + [(p, s) for p, s in loras]:
        try:
            st = os.stat(path)
        except OSError:
            return None
        parts.append(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}|{scale}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def device_name(device):
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return f"{torch.cuda.get_device_name(device)}|cuda {torch.version.cuda}"


def load_table(folder, key, device, steps, blocks, dtype):
    """The table saved under key as [steps][blocks] of (img, txt) on `device`, or None."""
    path = Path(folder) / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        from safetensors.torch import load_file
        flat = load_file(path, device=str(torch.device(device)))
    except Exception:           # noqa: BLE001 (a damaged entry is recomputed and rewritten)
        return None
    want = {f"{i}.{j}.{n}" for i in range(steps) for j in range(blocks) for n in ("img", "txt")}
    if set(flat) != want or any(t.dtype != dtype for t in flat.values()):
        return None
    os.utime(path)              # recently used: kept longest
    return [[(flat[f"{i}.{j}.img"], flat[f"{i}.{j}.txt"]) for j in range(blocks)] for i in range(steps)]


def save_table(folder, key, table):
    """Write the table under key (atomically: a temporary file renamed), then trim the folder to LIMIT.
    Failing to write (a read-only or full disk) only loses the cache."""
    from safetensors.torch import save_file
    folder = Path(folder)
    flat = {f"{i}.{j}.{n}": t.detach().contiguous().cpu() for i, row in enumerate(table)
            for j, pair in enumerate(row) for n, t in zip(("img", "txt"), pair)}
    if sum(t.numel() * t.element_size() for t in flat.values()) > LIMIT // 2:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
        os.close(fd)
        try:
            save_file(flat, tmp)
            os.replace(tmp, folder / f"{key}.safetensors")
        finally:
            Path(tmp).unlink(missing_ok=True)
        trim(folder)
    except OSError:
        pass


def trim(folder, limit=LIMIT):
    """Delete the least recently used entries until the folder holds at most `limit` bytes."""
    entries = sorted(Path(folder).glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    total = 0
    for p in entries:
        total += p.stat().st_size
        if total > limit:
            p.unlink(missing_ok=True)
