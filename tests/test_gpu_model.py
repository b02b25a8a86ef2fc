"""GPU: our MMDiT at real width (3072, 24 heads), a few blocks, bf16 vs diffusers' bf16 and fp32.
Run on the device machine: python -m pytest -q -m gpu tests/test_gpu_model.py -s"""
import pytest
import torch

from engine.config import MMDiTConfig
from engine.models.mmdit import MMDiT, modulation_table
from loaders import assign

pytestmark = pytest.mark.gpu


def rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_real_width_bf16_error_vs_diffusers(zero_cond_t, monkeypatch):
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(0)
    ref32 = QwenImageTransformer2DModel(num_layers=3, zero_cond_t=zero_cond_t).cuda().eval()
    with torch.no_grad():
        for name, p in ref32.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.02)
    ref16 = QwenImageTransformer2DModel(num_layers=3, zero_cond_t=zero_cond_t).cuda().eval()
    ref16.load_state_dict(ref32.state_dict())
    ref16 = ref16.to(torch.bfloat16)
    with torch.device("meta"):
        ours = MMDiT(MMDiTConfig.from_dict(dict(ref16.config)))
    assign(ours, dict(ref16.state_dict()), "transformer")

    B, lens, shapes = 2, [360, 300], [(1, 64, 64), (1, 64, 64)]
    x = torch.randn(B, 8192, 64, device="cuda")
    txt = torch.randn(B, 360, 3584, device="cuda")
    mask = (torch.arange(360, device="cuda")[None] < torch.tensor(lens, device="cuda")[:, None]).long()
    t = torch.full((B,), 0.5625, device="cuda")  # exact in bf16: the fp32 reference must see the same timestep
    kw = dict(encoder_hidden_states_mask=mask, img_shapes=[shapes] * B, return_dict=False)
    with torch.inference_mode():
        want = ref32(hidden_states=x, encoder_hidden_states=txt, timestep=t, **kw)[0]
        theirs = ref16(hidden_states=x.bfloat16(), encoder_hidden_states=txt.bfloat16(), timestep=t.bfloat16(), **kw)[0]
        t16 = t.bfloat16()
        mods = modulation_table(ours, t16[:1])[0]
        monkeypatch.setenv("QIE_OPS", "triton")
        got = ours(x.bfloat16(), txt.bfloat16(), torch.tensor(lens), t16, shapes, mods=mods)
        monkeypatch.setenv("QIE_OPS", "torch")
        got_ref_ops = ours(x.bfloat16(), txt.bfloat16(), torch.tensor(lens), t16, shapes, mods=mods)
    e_ours, e_theirs, e_refops = rel_l2(got, want), rel_l2(theirs, want), rel_l2(got_ref_ops, want)
    print(f"\nzero_cond_t={zero_cond_t}: rel L2 vs fp32 reference: ours {e_ours:.3e}, ours (torch ops) "
          f"{e_refops:.3e}, diffusers bf16 {e_theirs:.3e}")
    assert torch.isfinite(got).all()
    assert e_ours <= 2e-2 and e_ours <= 1.5 * e_theirs, (e_ours, e_theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_gelu_is_tanh_gelu(dtype):
    """The cuBLASLt epilogue must be the tanh GELU the model uses (erf differs by up to ~5e-4)."""
    from engine import ops
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.randn(4, 333, 512, device="cuda", dtype=dtype)
    w = torch.randn(1024, 512, device="cuda", dtype=dtype) * 0.05
    b = torch.randn(1024, device="cuda", dtype=dtype)
    got = ops.linear_gelu(x, w, b).float()
    want = torch.nn.functional.gelu(torch.nn.functional.linear(x.float(), w.float(), b.float()), approximate="tanh")
    erf = torch.nn.functional.gelu(torch.nn.functional.linear(x.float(), w.float(), b.float()))
    err, gap = (got - want).abs().max().item(), (want - erf).abs().max().item()
    print(f"\nlinear_gelu {dtype}: max err vs tanh GELU {err:.2e} (tanh-vs-erf gap {gap:.2e})")
    assert err < (2e-5 if dtype == torch.float32 else 5e-2)
    if dtype == torch.float32:
        assert err < gap / 10
