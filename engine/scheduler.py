"""Flow-match Euler with (dynamic) time shift: plain functions, no state.

The arithmetic follows the reference step for step (numpy float32 sigmas, then torch float32), so the
schedule is bit-equal to diffusers' FlowMatchEulerDiscreteScheduler for the configs the loader accepts.
"""
import math

import numpy as np
import torch

from engine.config import SchedulerConfig


def image_seq_mu(seq_len, cfg: SchedulerConfig):
    """The dynamic-shift mu: linear in the image token count between (base_len, base_shift) and (max_len, max_shift)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    b = cfg.base_shift - m * cfg.base_image_seq_len
    return seq_len * m + b


def sigmas_for(cfg: SchedulerConfig, steps, mu=None, sigmas=None):
    """Returns (sigmas [steps + 1] float32 ending in 0, timesteps [steps] = sigmas * num_train_timesteps).
    Default input sigmas are linspace(1, 1/steps, steps), as the Qwen-Image pipelines pass them."""
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / steps, steps)
    s = np.array(sigmas).astype(np.float32)
    if cfg.use_dynamic_shifting:
        if mu is None:
            raise ValueError("use_dynamic_shifting needs mu (the image sequence length's shift)")
        if cfg.time_shift_type == "exponential":
            s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
        else:
            s = mu / (mu + (1 / s - 1) ** 1.0)
    else:
        s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
    if cfg.shift_terminal and s[-1] != 1:  # a lone sigma of 1 has no stretch (the reference yields 0/0 = NaN)
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    s = torch.from_numpy(s).to(torch.float32)
    timesteps = s * cfg.num_train_timesteps
    return torch.cat([s, torch.zeros(1)]), timesteps


def cfg_velocity(v, cfg, normalize=True):
    """True CFG over a two-row velocity [2, N, C] (row 0 the prompt's, row 1 the negative prompt's) -> [1, N, C]:
    neg + cfg·(pos − neg), rescaled per token to the prompt row's norm when normalize."""
    pos, neg = v[:1], v[1:]
    comb = neg + cfg * (pos - neg)
    if not normalize:
        return comb
    return comb * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def euler_step(sample, velocity, sigma, sigma_next):
    """x_{next} = x + (sigma_next - sigma) * v, computed in float32, returned in velocity's dtype."""
    return (sample.float() + (sigma_next - sigma) * velocity).to(velocity.dtype)


# The schedule the Qwen-Image-Lightning LoRAs were distilled with: no shift at any resolution (exp(mu) = 3
# whatever the token count), no terminal stretch.
LIGHTNING = SchedulerConfig(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=math.log(3),
                            max_shift=math.log(3), base_image_seq_len=256, max_image_seq_len=8192,
                            shift_terminal=None, time_shift_type="exponential")
SAMPLERS = ("default", "lightning")


def sampler_config(name, default: SchedulerConfig):
    """--sampler NAME -> the scheduler config to run: "default" is the snapshot's."""
    if name == "default":
        return default
    if name == "lightning":
        return LIGHTNING
    raise ValueError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
