from .images import png_bytes, read_image, read_png_text, to_rgb, write_png
from .safetensors_io import (LoadError, assign, atomic_write_bytes, check_keys, load_state_dict, read_json,
                             read_tensors, write_tensors,
                             save_component, torch_dtype)
from .snapshot import Snapshot, describe
