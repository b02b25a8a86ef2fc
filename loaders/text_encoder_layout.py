"""Checkpoint keys of Qwen2.5-VL -> the engine's text encoder keys.

Two layouts exist: as published (and as transformers 5's save_pretrained still writes) `model.layers.*`,
`model.embed_tokens.*`, `model.norm.*`, `visual.*`; and transformers 5's in-memory names
`model.language_model.*`, `model.visual.*`. `lm_head` is never used for prefill and is dropped (it may be
tied to the embedding and absent). The Conv3d patch embedding, whose kernel equals its stride, becomes a
Linear over the flattened (C, T, P, P) patch: the weight [D, C, T, P, P] is viewed as [D, C*T*P*P].
"""

# first matching prefix wins; None drops the key
PREFIXES = (
    ("lm_head.", None),
    ("model.language_model.", ""),
    ("model.visual.", "visual."),
    ("visual.", "visual."),
    ("model.", ""),
)
PATCH_EMBED = ("visual.patch_embed.proj.weight", "visual.patch_embed.weight")


def convert_text_encoder_state(state, keep_lm_head=False):
    """Rename keys to the engine's module names; unknown prefixes are kept so key checks name them.
    keep_lm_head: keep `lm_head.weight` (for decoding) instead of dropping it."""
    out = {}
    for key, tensor in state.items():
        if keep_lm_head and key == "lm_head.weight":
            out[key] = tensor
            continue
        new = key
        for old, repl in PREFIXES:
            if key.startswith(old):
                new = None if repl is None else repl + key[len(old):]
                break
        if new is None:
            continue
        if new == PATCH_EMBED[0]:
            new, tensor = PATCH_EMBED[1], tensor.reshape(tensor.shape[0], -1)
        out[new] = tensor
    return out
