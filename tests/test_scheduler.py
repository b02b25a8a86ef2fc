"""Our flow-match Euler schedule vs diffusers' FlowMatchEulerDiscreteScheduler, bit for bit."""
import numpy as np
import pytest
import torch

from engine import scheduler as sched
from engine.config import SchedulerConfig
from loaders import LoadError

from .conftest import SCHEDULER

CONFIGS = {
    "edit": SCHEDULER,
    "linear_shift": {**SCHEDULER, "time_shift_type": "linear"},
    "no_terminal": {**SCHEDULER, "shift_terminal": None},
    "static_shift": {**SCHEDULER, "use_dynamic_shifting": False, "shift": 3.0, "shift_terminal": None},
}


def reference(cfg_dict, steps, seq_len, sigmas=None):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift, retrieve_timesteps
    s = FlowMatchEulerDiscreteScheduler(**cfg_dict)
    mu = calculate_shift(seq_len, s.config.base_image_seq_len, s.config.max_image_seq_len,
                         s.config.base_shift, s.config.max_shift)
    sig = np.linspace(1.0, 1 / steps, steps) if sigmas is None else sigmas
    timesteps, _ = retrieve_timesteps(s, steps, "cpu", sigmas=sig, mu=mu)
    return s, timesteps, mu


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # the reference's 1-step 0/0
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("steps", [1, 2, 8, 28, 50])
@pytest.mark.parametrize("seq_len", [256, 1369, 4096, 12288])
def test_sigmas_and_timesteps_bit_equal(name, steps, seq_len):
    ref, ref_t, ref_mu = reference(CONFIGS[name], steps, seq_len)
    if steps == 1 and CONFIGS[name]["shift_terminal"]:  # the reference is NaN here (0/0); we stay finite
        assert torch.isnan(ref.sigmas[0])
        ref.sigmas[0], ref_t[0] = 1.0, 1000.0
    cfg = SchedulerConfig.from_dict(CONFIGS[name])
    mu = sched.image_seq_mu(seq_len, cfg)
    assert mu == ref_mu
    sigmas, timesteps = sched.sigmas_for(cfg, steps, mu=mu)
    assert torch.equal(sigmas, ref.sigmas), (sigmas - ref.sigmas).abs().max()
    assert torch.equal(timesteps, ref_t)


def test_custom_sigmas():
    custom = [1.0, 0.8, 0.5, 0.2]
    ref, ref_t, _ = reference(SCHEDULER, 4, 1024, sigmas=custom)
    cfg = SchedulerConfig.from_dict(SCHEDULER)
    sigmas, timesteps = sched.sigmas_for(cfg, 4, mu=sched.image_seq_mu(1024, cfg), sigmas=custom)
    assert torch.equal(sigmas, ref.sigmas) and torch.equal(timesteps, ref_t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_step_bit_equal(dtype):
    ref, ref_t, _ = reference(SCHEDULER, 5, 1024)
    cfg = SchedulerConfig.from_dict(SCHEDULER)
    sigmas, _ = sched.sigmas_for(cfg, 5, mu=sched.image_seq_mu(1024, cfg))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 37, 64, generator=g).to(dtype)
    ours = x.clone()
    ref.set_begin_index(0)
    for i, t in enumerate(ref_t):
        v = torch.randn(1, 37, 64, generator=g).to(dtype)
        x = ref.step(v, t, x, return_dict=False)[0]
        ours = sched.euler_step(ours, v, sigmas[i], sigmas[i + 1])
        assert torch.equal(ours, x)


def test_unsupported_flags_are_refused():
    with pytest.raises(LoadError, match="use_karras_sigmas"):
        SchedulerConfig.from_dict({**SCHEDULER, "use_karras_sigmas": True})
    with pytest.raises(LoadError, match="time_shift_type"):
        SchedulerConfig.from_dict({**SCHEDULER, "time_shift_type": "cosine"})


LIGHTNING = {  # the scheduler config Qwen-Image-Lightning's README gives for its 4- and 8-step LoRAs
    "base_image_seq_len": 256, "base_shift": float(np.log(3)), "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": float(np.log(3)), "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": None,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False}


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("seq_len", [256, 4096, 12288])
def test_lightning_sampler_bit_equal(steps, seq_len):
    """--sampler lightning: the same sigmas and timesteps as diffusers with the Lightning config, at any
    image size (exp(mu) = 3 whatever the token count), and not the snapshot's default schedule."""
    assert sched.LIGHTNING == SchedulerConfig.from_dict(LIGHTNING)
    ref, ref_t, ref_mu = reference(LIGHTNING, steps, seq_len)
    cfg = sched.sampler_config("lightning", SchedulerConfig.from_dict(SCHEDULER))
    mu = sched.image_seq_mu(seq_len, cfg)
    assert mu == ref_mu
    sigmas, timesteps = sched.sigmas_for(cfg, steps, mu=mu)
    assert torch.equal(sigmas, ref.sigmas) and torch.equal(timesteps, ref_t)
    default = sched.sampler_config("default", SchedulerConfig.from_dict(SCHEDULER))
    other, _ = sched.sigmas_for(default, steps, mu=sched.image_seq_mu(seq_len, default))
    assert (other - sigmas).abs().max() > 0.01


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler 'euler_a'"):
        sched.sampler_config("euler_a", SchedulerConfig.from_dict(SCHEDULER))
