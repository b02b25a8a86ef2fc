"""Qwen-Image VAE checkpoint layout: diffusers' causal-3D keys <-> the engine's 2D image path.

An image is one frame. A causal conv pads time with 2 zero frames in front, so a kernel-time-3 weight
[O, I, 3, kh, kw] only ever meets the input through its last slice [:, :, -1]. The temporal resample
convs (`time_conv`) are skipped on the first frame, so the image path never uses them. The RMS-norm
gammas are (C,1,1,1) in residual blocks / norm_out and (C,1,1) in the attention block; the 2D module
keeps (C,1,1) everywhere.
"""

# Module names (last component before .weight/.bias) that diffusers builds as QwenImageCausalConv3d.
# Everything else with a conv weight (attentions.*.to_qkv / proj, resample.1) is a plain nn.Conv2d.
CAUSAL_CONVS = {"conv_in", "conv_out", "conv1", "conv2", "conv_shortcut", "quant_conv", "post_quant_conv",
                "time_conv"}


def _module_name(key):
    parts = key.split(".")
    return parts[-2] if len(parts) >= 2 else ""


def to_2d(state):
    """diffusers AutoencoderKLQwenImage state dict -> the engine's 2D state dict (new dict; tensors shared
    where no reshaping is needed). Causal conv weights [O, I, kt, kh, kw] -> [O, I, kh, kw] (last time
    slice); gammas -> (C, 1, 1); time_conv keys dropped."""
    out = {}
    for key, t in state.items():
        name = _module_name(key)
        if name == "time_conv":
            continue
        if name in CAUSAL_CONVS and key.endswith(".weight") and t.dim() == 5:
            t = t[:, :, -1].contiguous()
        elif key.endswith(".gamma"):
            t = t.reshape(t.shape[0], 1, 1)
        out[key] = t
    return out


def _cfg_get(cfg, name):
    return cfg[name] if isinstance(cfg, dict) else getattr(cfg, name)


def to_3d(state, cfg):
    """The engine's 2D state dict -> a state dict diffusers' AutoencoderKLQwenImage(**config) loads strictly.

    `cfg` is a VAEConfig or the vae config.json dict (num_res_blocks, dim_mult, temperal_downsample are
    read). 3x3 causal convs get kernel-time 3 with the 2D weight in the last slice and zeros before it
    (which is what the image path sees); 1x1 causal convs get kernel-time 1; time_conv weights are
    created as zeros with diffusers' shapes (unused by images)."""
    out = {}
    for key, t in state.items():
        name = _module_name(key)
        if name in CAUSAL_CONVS and key.endswith(".weight") and t.dim() == 4:
            if t.shape[-1] == 1 and t.shape[-2] == 1:
                t = t.unsqueeze(2)                                   # [O, I, 1, 1, 1]
            else:
                w = t.new_zeros(t.shape[0], t.shape[1], 3, t.shape[2], t.shape[3])
                w[:, :, -1] = t                                      # [O, I, 3, kh, kw]
                t = w
        elif key.endswith(".gamma"):
            # attention norm is built with images=True -> (C,1,1); all other norms (C,1,1,1)
            t = t.reshape(t.shape[0], 1, 1) if ".attentions." in key else t.reshape(t.shape[0], 1, 1, 1)
        out[key] = t

    nrb = _cfg_get(cfg, "num_res_blocks")
    n = len(_cfg_get(cfg, "dim_mult"))
    down3d = list(_cfg_get(cfg, "temperal_downsample"))
    up3d = down3d[::-1]
    for i in range(n - 1):
        if down3d[i]:
            # encoder block i = nrb resnets then its resample, flattened into down_blocks
            prefix = f"encoder.down_blocks.{i * (nrb + 1) + nrb}."
            w = state[prefix + "resample.1.weight"]                 # [dim, dim, 3, 3]
            dim = w.shape[1]
            out[prefix + "time_conv.weight"] = w.new_zeros(dim, dim, 3, 1, 1)
            out[prefix + "time_conv.bias"] = w.new_zeros(dim)
        if up3d[i]:
            prefix = f"decoder.up_blocks.{i}.upsamplers.0."
            w = state[prefix + "resample.1.weight"]                 # [dim // 2, dim, 3, 3]
            dim = w.shape[1]
            out[prefix + "time_conv.weight"] = w.new_zeros(2 * dim, dim, 3, 1, 1)
            out[prefix + "time_conv.bias"] = w.new_zeros(2 * dim)
    return out
