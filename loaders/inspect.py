"""`cli.py inspect FILE.safetensors`: what a file is, from its header where that suffices."""
from .lora import read_lora
from .safetensors_io import LoadError, read_tensors
from .single_file import check_transformer_file, read_header


def describe_file(path):
    """One line: what a .safetensors file is (a transformer file, a LoRA, prompt embeddings), or why it is
    none of them."""
    try:
        header, size, prefix, own, marker = check_transformer_file(path)
        dtypes = {}
        for v in own.values():
            dtypes[v["dtype"]] = dtypes.get(v["dtype"], 0) + 1
        return (f"{path}: transformer file, {len(own)} tensors ({', '.join(f'{n} {d}' for d, n in dtypes.items())}), "
                f"{size / 2**30:.2f} GiB, keys {'under ' + repr(prefix) if prefix else 'bare'}"
                + ("; Edit-2511 marker (zero_cond_t on)" if marker else ""))
    except LoadError as e:
        if "looks like a text encoder" in str(e):
            return _describe_text_encoder(path)
        if "is a LoRA" not in str(e):
            try:
                header, _, _ = read_header(path)
            except LoadError:
                raise e from None
            if "prompt_embeds" not in header:    # read only a small embeddings file, never a large other one
                raise
            tensors = read_tensors(path)
            return f"{path}: prompt embeddings, " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
    lora = read_lora(path)
    ranks = sorted({layer.rank for layer in lora.layers.values()})
    alphas = sorted({layer.alpha for layer in lora.layers.values() if layer.alpha is not None})
    span = lambda v: f"{v[0]:g}" if v[0] == v[-1] else f"{v[0]:g}-{v[-1]:g}"
    return (f"{path}: LoRA on {len(lora.layers)} modules, rank {span(ranks)}, "
            + (f"alpha {span(alphas)}" if alphas else "no alpha (alpha = rank)"))


def _describe_text_encoder(path):
    """One line for a Qwen2.5-VL file (--text-encoder), from its header."""
    from .single_file import _dtype_name
    from .text_encoder_file import check_text_encoder_file, lm_linears_fp8
    info = check_text_encoder_file(path)
    dtypes = {}
    for k in info.names:
        d = _dtype_name(info.own[k]["dtype"])
        dtypes[d] = dtypes.get(d, 0) + 1
    fp8 = f"; fp8 ({info.quant.layout}), language-model Linears {'all' if lm_linears_fp8(path) else 'partly'} fp8" \
        if info.quant is not None else ""
    return (f"{path}: text-encoder file (--text-encoder), {len(info.names)} tensors "
            f"({', '.join(f'{n} {d}' for d, n in dtypes.items())}), {info.size / 2**30:.2f} GiB{fp8}")
