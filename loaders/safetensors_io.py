"""Safetensors I/O for Hugging Face snapshot folders: configs, single-file and sharded weights, key checks.

Everything here fails with `LoadError`, whose message is one line a user can act on. Nothing is unpickled.
"""
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class LoadError(Exception):
    """A snapshot, config or weight file that cannot be used; str() is one line for the user."""


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"missing file {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"{path} is not valid JSON ({e}); re-download it") from None
    except OSError as e:
        raise LoadError(f"cannot read {path}: {e.strerror}") from None


def _weight_files(folder):
    """The safetensors files of one component folder, in shard order, and the key -> file map if sharded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoadError(f"missing folder {folder}; is this a complete snapshot?")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = read_json(indexes[0])
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LoadError(f"{indexes[0]} has no weight_map; re-download it")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise LoadError(f"{folder}: {len(missing)} shard(s) named in {indexes[0].name} are missing, "
                            f"e.g. {missing[0]}; re-download them")
        return [folder / f for f in files], weight_map
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LoadError(f"no .safetensors file in {folder} (pickled .bin checkpoints are not read)")
    return files, None


def load_state_dict(folder, dtype=None, device="cpu", keep_fp32=(), reader=None):
    """Read every tensor of a component folder; each tensor is cast to `dtype` (floating tensors only, except
    keys containing a `keep_fp32` fragment) and lands on `device`. reader: "fast" (default; QIE_READER sets it)
    reads each tensor straight to `device` with several threads (loaders.fast_read); "safe_open" memory-maps
    each file and reads one tensor at a time, and is what a file with a dtype the fast reader lacks gets."""
    if reader is None:
        from .fast_read import reads_fast
        reader = "fast" if reads_fast(device) else "safe_open"
    if reader not in ("fast", "safe_open"):
        raise LoadError(f"unknown reader {reader!r}; use fast or safe_open")
    if reader == "fast":
        from .fast_read import read_into, target_dtype, tensor_index
        index = tensor_index(folder)
        if index is not None:
            state = {k: torch.empty(i.shape, dtype=target_dtype(k, i, dtype, keep_fp32), device=device)
                     for k, i in index.items()}
            read_into(index, state)
            return state
    files, weight_map = _weight_files(folder)
    state = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if dtype is not None and t.is_floating_point() and not any(s in key for s in keep_fp32):
                        t = t.to(dtype)
                    state[key] = t.to(device)
        except LoadError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            size = path.stat().st_size if path.exists() else 0
            raise LoadError(f"cannot read {path} ({size} bytes): {str(e).splitlines()[0]}; "
                            "the file is truncated or corrupt, re-download it") from None
    check_index(folder, weight_map, state)
    return state


def check_index(folder, weight_map, found):
    """Every key the shard index (weight_map, or None without one) lists is among `found`, else one line."""
    absent = [k for k in weight_map or () if k not in found]
    if absent:
        raise LoadError(f"{folder}: {len(absent)} tensor(s) listed in the index are not in the shards, "
                        f"e.g. {absent[0]}; re-download the snapshot")


def read_tensors(path):
    """All tensors of one .safetensors file (e.g. saved prompt embeddings)."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise LoadError(f"cannot read {path}: {str(e).splitlines()[0]}; is it a complete .safetensors file?") from None


def write_tensors(tensors, path, force=False, metadata=None):
    """Save tensors as one .safetensors file, atomically; metadata: more {str: str} for its header."""
    from safetensors.torch import save
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                metadata={**(metadata or {}), "format": "pt"})
    atomic_write_bytes(path, data, force=force)


def _few(keys, n=3):
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_keys(expected, state, where):
    """Raise LoadError naming missing/unexpected keys and wrong shapes. `expected` maps key -> shape."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} wrong shape(s), e.g. {k} is {tuple(state[k].shape)}, "
                        f"expected {tuple(expected[k])}")
    if problems:
        raise LoadError(f"{where}: " + "; ".join(problems) + " (does the checkpoint match its config.json?)")


def assign(module, state, where):
    """Check `state` against a module built on the meta device, then assign its tensors in place."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_keys(expected, state, where)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def save_component(folder, state, config, shard_bytes=None, name="diffusion_pytorch_model"):
    """Write config.json and safetensors (sharded with an index when `shard_bytes` is set), as
    save_pretrained lays them out."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if shard_bytes is None:
        save_file(state, str(folder / f"{name}.safetensors"), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for k in state:
        nbytes = state[k].numel() * state[k].element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = state[k]
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"{name}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{name}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def atomic_write_bytes(path, data, force=False):
    """Write `data` to `path` through a temporary file in the same folder, then rename."""
    path = Path(path)
    if path.exists() and not force:
        raise LoadError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the output
        os.replace(tmp, path)
    except OSError as e:
        raise LoadError(f"cannot write {path}: {e.strerror}; nothing was overwritten") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def torch_dtype(name):
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise LoadError(f"unknown dtype {name!r}; use one of {', '.join(table)}")
    return table[name]
