"""Our MMDiT vs diffusers' QwenImageTransformer2DModel on the same random weights (float32, CPU)."""
import os

import pytest
import torch

from engine.config import MMDiTConfig
from engine.models.mmdit import MMDiT, load_mmdit
from loaders import LoadError, Snapshot, assign

from .conftest import TINY_MMDIT, make_transformer, write_snapshot


def ours_from(ref):
    cfg = MMDiTConfig.from_dict(dict(ref.config))
    with torch.device("meta"):
        m = MMDiT(cfg)
    return assign(m, {k: v.clone() for k, v in ref.state_dict().items()}, "transformer").eval()


def run_pair(ref, ours, img_shapes, txt_lens, L, B, seed, additional=None):
    g = torch.Generator().manual_seed(seed)
    N = sum(f * h * w for f, h, w in img_shapes)
    x = torch.randn(B, N, 64, generator=g)
    txt = torch.randn(B, L, TINY_MMDIT["joint_attention_dim"], generator=g)
    mask = (torch.arange(L)[None, :] < torch.tensor(txt_lens)[:, None]).long()
    txt = txt * mask[..., None] + 1e3 * (1 - mask[..., None])  # garbage in padding must not leak
    t = torch.rand(B, generator=g)
    kw = dict(additional_t_cond=additional) if additional is not None else {}
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=mask, timestep=t,
                   img_shapes=[img_shapes] * B, return_dict=False, **kw)[0]
        got = ours(x, txt, torch.tensor(txt_lens), t, img_shapes, **kw)
    return got, want


@pytest.mark.parametrize("zero_cond_t", [False, True])
@pytest.mark.parametrize("img_shapes,txt_lens,L", [
    ([(1, 4, 4), (1, 4, 4)], [7], 7),             # square, one prompt, no padding
    ([(1, 3, 5), (1, 5, 3)], [9, 4], 9),           # non-square, odd token counts, B=2 different lengths
    ([(1, 7, 3), (1, 2, 9)], [3, 11], 11),         # odd everything, padding in the first row
])
def test_forward_matches_diffusers(zero_cond_t, img_shapes, txt_lens, L):
    ref = make_transformer(seed=3, zero_cond_t=zero_cond_t)
    ours = ours_from(ref)
    got, want = run_pair(ref, ours, img_shapes, txt_lens, L, len(txt_lens), seed=11)
    err = (got - want).abs().max().item()
    assert err <= 2e-5 * want.abs().max().item(), f"max abs diff {err:.3g} (ref max {want.abs().max():.3g})"


def test_additional_t_cond():
    ref = make_transformer(seed=4, use_additional_t_cond=True)
    ours = ours_from(ref)
    got, want = run_pair(ref, ours, [(1, 4, 2), (1, 2, 4)], [5, 5], 5, 2, seed=5,
                         additional=torch.tensor([0, 1]))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


def test_batched_rows_equal_single_rows():
    """B=2 with different text lengths gives each row what a B=1 run of that row gives (CFG batching)."""
    ours = ours_from(make_transformer(seed=6))
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 3, 4), (1, 3, 4)]
    x = torch.randn(1, 24, 64, generator=g).expand(2, -1, -1)
    txt = torch.randn(2, 8, 48, generator=g)
    t = torch.full((2,), 0.7)
    with torch.no_grad():
        both = ours(x, txt, torch.tensor([8, 5]), t, shapes)
        a = ours(x[:1], txt[:1], torch.tensor([8]), t[:1], shapes)
        b = ours(x[1:], txt[1:, :5], torch.tensor([5]), t[1:], shapes)
    tol = 2e-6 * both.abs().max().item()
    assert (both[0] - a[0]).abs().max() <= tol and (both[1] - b[0]).abs().max() <= tol


def test_load_sharded_snapshot(tmp_path):
    ref = make_transformer(seed=7)
    write_snapshot(tmp_path, transformer=ref)
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1  # really sharded
    ours = load_mmdit(Snapshot(tmp_path), torch.float32, "cpu")
    got, want = run_pair(ref, ours, [(1, 2, 2), (1, 2, 2)], [4], 4, 1, seed=1)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_load_bf16_casts_on_load(tmp_path):
    write_snapshot(tmp_path, transformer=make_transformer(seed=8))
    ours = load_mmdit(Snapshot(tmp_path), torch.bfloat16, "cpu")
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())


def test_config_rejects_unknown_field():
    with pytest.raises(LoadError, match="unsupported config field"):
        MMDiTConfig.from_dict({**TINY_MMDIT, "num_single_layers": 3})


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_modulation_table_then_drop(zero_cond_t):
    """Precomputed modulation (batch 1, broadcast to B=2) equals the in-forward path; weights then drop."""
    from engine.models.mmdit import drop_modulation_weights, modulation_table
    ours = ours_from(make_transformer(seed=9, zero_cond_t=zero_cond_t))
    g = torch.Generator().manual_seed(3)
    shapes = [(1, 2, 3), (1, 3, 2)]
    x, txt = torch.randn(2, 12, 64, generator=g), torch.randn(2, 6, 48, generator=g)
    ts = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        want = [ours(x, txt, torch.tensor([6, 4]), t.expand(2), shapes) for t in ts]
        table = modulation_table(ours, ts)
        per_block = sum(p.numel() for n, p in ours.named_parameters() if "_mod." in n) * 4
        assert drop_modulation_weights(ours) == per_block
        got = [ours(x, txt, torch.tensor([6, 4]), t.expand(2), shapes, mods=m) for t, m in zip(ts, table)]
    for a, b in zip(got, want):  # batch-1 and batch-2 GEMMs may round differently
        assert (a - b).abs().max() <= 2e-6 * b.abs().max(), (a - b).abs().max()
    with pytest.raises(RuntimeError, match="dropped"):
        ours(x, txt, torch.tensor([6, 4]), ts[:1].expand(2), shapes)


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_bf16_semantics_match_diffusers(zero_cond_t):
    """bf16 on the CPU: the timestep embedding is bit-equal to diffusers' bf16 one, and our error against the
    float32 reference is no worse than diffusers' own bf16 error (fp32 parity cannot see dtype slips)."""
    torch.manual_seed(0)
    ref32 = make_transformer(seed=12, zero_cond_t=zero_cond_t)
    with torch.no_grad():
        for n, p in ref32.named_parameters():
            p.normal_(1.0, 0.1) if ("norm" in n and p.dim() == 1) else p.normal_(0.0, 0.05)
    ref16 = make_transformer(seed=12, zero_cond_t=zero_cond_t)
    ref16.load_state_dict(ref32.state_dict())
    ref16 = ref16.to(torch.bfloat16)
    ours = ours_from(ref16)
    t16 = torch.tensor([0.5625, 0.5625], dtype=torch.bfloat16)  # exact in bf16: all models see one timestep
    with torch.no_grad():
        x16 = ref16.img_in(torch.zeros(2, 1, 64, dtype=torch.bfloat16))
        assert torch.equal(ours.time_embedding(t16)[:2], ref16.time_text_embed(t16, x16))
        g = torch.Generator().manual_seed(2)
        shapes, lens = [(1, 6, 5), (1, 5, 6)], [11, 7]
        x, txt = torch.randn(2, 60, 64, generator=g), torch.randn(2, 11, 48, generator=g)
        mask = (torch.arange(11)[None] < torch.tensor(lens)[:, None]).long()
        kw = dict(encoder_hidden_states_mask=mask, img_shapes=[shapes] * 2, return_dict=False)
        want = ref32(hidden_states=x, encoder_hidden_states=txt, timestep=t16.float(), **kw)[0]
        theirs = ref16(hidden_states=x.bfloat16(), encoder_hidden_states=txt.bfloat16(), timestep=t16, **kw)[0]
        got = ours(x.bfloat16(), txt.bfloat16(), torch.tensor(lens), t16, shapes)
    rel = lambda a: ((a.float() - want).norm() / want.norm()).item()
    assert rel(got) <= max(1.5 * rel(theirs), 1e-3) and rel(got) <= 2e-2, (rel(got), rel(theirs))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="runs the Triton kernels on CPU tensors, which needs TRITON_INTERPRET=1 (set by conftest "
                    "on machines without CUDA); on a GPU machine tests/test_gpu_model.py covers the kernels")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NaN padded text rows pass the text stream's norms
@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_forward_through_triton_kernels(monkeypatch, zero_cond_t):
    """The whole model through the Triton kernels (interpreter): stride-0 modulation rows, the split between
    modulation sets, q/k written into joint-sequence slices, kv_len with padded text."""
    from engine.models.mmdit import modulation_table
    ours = ours_from(make_transformer(seed=13, zero_cond_t=zero_cond_t))  # matches diffusers (tests above)
    g = torch.Generator().manual_seed(21)
    shapes, lens = [(1, 3, 5), (1, 5, 3)], torch.tensor([9, 4])
    x, txt = torch.randn(2, 30, 64, generator=g), torch.randn(2, 9, TINY_MMDIT["joint_attention_dim"], generator=g)
    txt[1, 4:] = float("nan")  # padded text: must not leak into the valid rows through attention
    t = torch.full((2,), 0.37)
    with torch.no_grad():
        mods = modulation_table(ours, t[:1])[0]  # batch-1 table: stride-0 rows in the kernels
        monkeypatch.setenv("QIE_OPS", "torch")
        want = ours(x, txt.nan_to_num(), lens, t, shapes, mods=mods)
        monkeypatch.setenv("QIE_OPS", "interpret")
        got = ours(x, txt, lens, t, shapes, mods=mods)
    assert not got[:, :30].isnan().any()
    got, want = got[:, :30], want[:, :30]
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * want.abs().max().item(), f"max abs diff {err:.3g}"
