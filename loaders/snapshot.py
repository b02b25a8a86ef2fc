"""A Hugging Face snapshot folder of Qwen-Image(-Edit): which components it has, their configs and weights."""
from pathlib import Path

from .safetensors_io import LoadError, load_state_dict, read_json

COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "processor")


class Snapshot:
    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise LoadError(f"{self.root} is not a folder; pass the snapshot folder of Qwen/Qwen-Image-Edit")
        if not (self.root / "model_index.json").is_file():
            raise LoadError(f"{self.root} has no model_index.json; it is not a diffusers snapshot "
                            "(pass the folder that holds transformer/, vae/, scheduler/ ...)")
        self.index = read_json(self.root / "model_index.json")

    def has(self, name):
        return (self.root / name).is_dir()

    def require(self, *names):
        missing = [n for n in names if not self.has(n)]
        if missing:
            raise LoadError(f"{self.root} lacks {', '.join(n + '/' for n in missing)}; re-download the snapshot")

    def config(self, name):
        self.require(name)
        fname = "scheduler_config.json" if name == "scheduler" else "config.json"
        return read_json(self.root / name / fname)

    def weights(self, name, dtype=None, device="cpu", keep_fp32=()):
        self.require(name)
        return load_state_dict(self.root / name, dtype=dtype, device=device, keep_fp32=keep_fp32)

    def tensor_index(self, name, device="cpu"):
        """{key: loaders.fast_read.TensorInfo} of a component from its files' headers, or None when a file holds a
        dtype the fast reader does not take, or when it does not serve loads to `device` (fast_read.reads_fast:
        QIE_READER=safe_open, the old path the comparisons use); then
        weights() reads it through safe_open."""
        from .fast_read import reads_fast, tensor_index
        self.require(name)
        if not reads_fast(device):
            return None
        return tensor_index(self.root / name)

    def read_into(self, index, dests, after=()):
        """Fill preallocated tensors {key: tensor} (GPU, pinned or plain host; cast to their dtype) from the
        files of `index` (tensor_index), several threads at a time; after: (host buffer, fn) pairs, fn run
        once the buffer is filled (loaders.fast_read.read_into). Returns the reader's stats."""
        from .fast_read import read_into
        return read_into(index, dests, after=after)

    def pipeline_class(self):
        return self.index.get("_class_name", "?")


def describe(root):
    """What a snapshot holds, from file headers only: per component its class, tensor count, dtypes, bytes."""
    from safetensors import safe_open

    from .safetensors_io import _weight_files

    snap = Snapshot(root)
    rows = []
    for name in COMPONENTS:
        folder = snap.root / name
        if not folder.is_dir():
            rows.append({"component": name, "present": False})
            continue
        row = {"component": name, "present": True, "files": len(list(folder.iterdir()))}
        cfg_file = folder / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if cfg_file.is_file():
            row["class"] = read_json(cfg_file).get("_class_name") or read_json(cfg_file).get("architectures", ["?"])
        if any(folder.glob("*.safetensors")):
            files, _ = _weight_files(folder)
            dtypes, count, nbytes, params = {}, 0, 0, 0
            for path in files:
                try:
                    with safe_open(str(path), framework="pt", device="cpu") as f:
                        for key in f.keys():
                            s = f.get_slice(key)
                            n = 1
                            for d in s.get_shape():
                                n *= d
                            dtypes[s.get_dtype()] = dtypes.get(s.get_dtype(), 0) + 1
                            count, params = count + 1, params + n
                except Exception as e:
                    raise LoadError(f"cannot read {path}: {str(e).splitlines()[0]}; re-download it") from None
                nbytes += path.stat().st_size
            row.update(tensors=count, params=params, bytes=nbytes, dtypes=dtypes)
        rows.append(row)
    return snap, rows
