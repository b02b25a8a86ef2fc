"""Configs read from each component's config.json, and the runtime options of one run."""
from dataclasses import dataclass, field, fields

from loaders import LoadError


def _from_dict(cls, d, where):
    """Build dataclass `cls` from a config dict: known fields taken, `_`-prefixed metadata ignored,
    unknown fields refused (a config this engine cannot honour must not run silently)."""
    names = {f.name for f in fields(cls)}
    unknown = [k for k in d if not k.startswith("_") and k not in names and k not in cls.IGNORED]
    if unknown:
        raise LoadError(f"{where}: unsupported config field(s) {', '.join(sorted(unknown))}")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    return cls(**kwargs)


@dataclass(frozen=True)
class MMDiTConfig:
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple = (16, 56, 56)
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False
    IGNORED = ()

    @property
    def dim(self):
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d, where="transformer/config.json"):
        cfg = _from_dict(cls, d, where)
        if cfg.out_channels is None:
            cfg = MMDiTConfig(**{**cfg.__dict__, "out_channels": cfg.in_channels})
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
            raise LoadError(f"{where}: axes_dims_rope {cfg.axes_dims_rope} must sum to attention_head_dim")
        return cfg


@dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple = ()
    temperal_downsample: tuple = (False, True, True)
    dropout: float = 0.0
    input_channels: int = 3
    latents_mean: tuple = (0.0,) * 16
    latents_std: tuple = (1.0,) * 16
    IGNORED = ()

    @property
    def scale_factor(self):  # pixels per latent pixel
        return 2 ** len(self.temperal_downsample)

    @classmethod
    def from_dict(cls, d, where="vae/config.json"):
        cfg = _from_dict(cls, d, where)
        if cfg.attn_scales:
            raise LoadError(f"{where}: attn_scales {cfg.attn_scales} is not supported (Qwen-Image uses none)")
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise LoadError(f"{where}: latents_mean/latents_std must have z_dim={cfg.z_dim} entries")
        return cfg


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False
    IGNORED = ()

    @classmethod
    def from_dict(cls, d, where="scheduler/scheduler_config.json"):
        cfg = _from_dict(cls, d, where)
        for flag in ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                     "stochastic_sampling"):
            if getattr(cfg, flag):
                raise LoadError(f"{where}: {flag}=true is not supported by this engine's flow-match Euler")
        if cfg.time_shift_type not in ("exponential", "linear"):
            raise LoadError(f"{where}: time_shift_type must be 'exponential' or 'linear'")
        return cfg


@dataclass
class RunOptions:
    """What one edit asks for, beyond the model."""
    steps: int = 50
    cfg: float = 4.0
    seed: int = 0
    width: int = None
    height: int = None
    sigmas: list = field(default=None)
    sampler: str = "default"            # engine.scheduler.SAMPLERS
    condition_area: int = 1024 * 1024  # pixels the condition image is resized to (the reference's ~1 MP)
