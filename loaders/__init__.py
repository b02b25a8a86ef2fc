from .safetensors_io import (LoadError, assign, atomic_write_bytes, check_keys, load_state_dict, read_json,
                             save_component, torch_dtype)
from .snapshot import Snapshot
