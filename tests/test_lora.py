"""LoRA fusion vs diffusers' load_lora_weights + fuse_lora on tiny random models: one test per file layout,
stacked LoRAs, and one test per bad input (a one-line LoadError and the weights untouched)."""
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from engine.transforms.lora import fuse_loras, parse_lora_arg
from loaders import LoadError
from loaders.lora import read_lora

from .conftest import make_transformer
from .test_mmdit import ours_from, run_pair

SEED = 3
LAYOUTS = {  # kind: (key prefix, Kohya-flattened names, down / up suffix, writes .alpha)
    "transformer":        ("transformer.", False, "lora_A.weight", "lora_B.weight", False),
    "transformer_alpha":  ("transformer.", False, "lora_A.weight", "lora_B.weight", True),
    "kohya":              ("lora_unet_", True, "lora_down.weight", "lora_up.weight", True),
    "diffusion_model":    ("diffusion_model.", False, "lora_down.weight", "lora_up.weight", True),
    "diffusion_model_AB": ("diffusion_model.", False, "lora_A.weight", "lora_B.weight", False),
    "peft_default":       ("", False, "lora_A.default.weight", "lora_B.default.weight", False),
    "bare_alpha":         ("", False, "lora_A.weight", "lora_B.weight", True),
    "bare":               ("", False, "lora_A.weight", "lora_B.weight", False),
}
# diffusers cannot load "transformer." keys beside ".alpha" keys (its converter prefixes "transformer." a second
# time and no module matches); its reference reads the same tensors under bare names, converted by the same rule
REF_KIND = {"transformer_alpha": "bare_alpha"}


def linear_shapes(model):
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def random_lora(shapes, seed, alpha=True, std=0.2):
    """Every Linear -> (down [r, in], up [out, r], alpha): ranks 2/4/3 in turn, alpha != rank when written.
    std 0.2 against base weights of std 0.2, so the LoRA visibly moves the output."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for i, (name, (out_f, in_f)) in enumerate(sorted(shapes.items())):
        r = (2, 4, 3)[i % 3]
        a = r * (0.5, 1.5, 0.75)[i % 3] if alpha else None
        lora[name] = (std * torch.randn(r, in_f, generator=g), std * torch.randn(out_f, r, generator=g), a)
    return lora


def layout(kind, lora):
    """The LoRA's tensors under one layout's key names."""
    prefix, flat, down_key, up_key, alpha = LAYOUTS[kind]
    out = {}
    for name, (down, up, a) in lora.items():
        stem = prefix + (name.replace(".", "_") if flat else name)
        out[f"{stem}.{down_key}"], out[f"{stem}.{up_key}"] = down, up
        if alpha:
            out[f"{stem}.alpha"] = torch.tensor(a)
    return out


def write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def reference(loras, via_adapter=False):
    """diffusers' transformer with the LoRAs loaded and fused. via_adapter: the transformer's load_lora_adapter
    with prefix=None (the pipeline loader ignores bare lora_A/lora_B keys that carry no alpha)."""
    from diffusers import QwenImageEditPipeline
    ref = make_transformer(seed=SEED)
    pipe = QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
                                 transformer=ref)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        if via_adapter:
            ref.load_lora_adapter(str(path), prefix=None, adapter_name=name)
        else:
            pipe.load_lora_weights(str(path), adapter_name=name)
    if len(loras) == 1:
        pipe.fuse_lora(lora_scale=loras[0][1])
    else:
        pipe.set_adapters(names, [s for _, s in loras])
        pipe.fuse_lora(adapter_names=names)
    return ref


def forward(ref, ours):
    return run_pair(ref, ours, [(1, 3, 4), (1, 4, 2)], [5, 3], 5, 2, seed=11)


def assert_matches_and_moves(got, want, plain):
    err, moved = (got - want).abs().max().item(), (got - plain).abs().max().item()
    assert err <= 2e-5 * want.abs().max().item(), f"max abs diff {err:.3g} (ref max {want.abs().max():.3g})"
    assert moved > 0.2 * plain.abs().max().item() and moved > 1e4 * err, f"LoRA moved output by {moved:.3g} only"


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_layout_matches_diffusers(kind, tmp_path, one_thread):
    base = make_transformer(seed=SEED)
    lora = random_lora(linear_shapes(base), seed=1, alpha=LAYOUTS[kind][4])
    path = write(tmp_path / "lora.safetensors", layout(kind, lora))
    ref_kind = REF_KIND.get(kind, kind)
    ref_path = path if ref_kind == kind else write(tmp_path / "ref.safetensors", layout(ref_kind, lora))

    ours = ours_from(base)
    plain, _ = forward(base, ours)
    (summary,) = fuse_loras(ours, [(path, 0.7)])
    assert (summary.modules, summary.ranks) == (len(lora), (2, 3, 4))  # every Linear, top-level ones included
    assert str(summary) == f"LoRA lora.safetensors x0.7: {len(lora)} modules, ranks 2-4"
    got, want = forward(reference([(ref_path, 0.7)], via_adapter=kind == "bare"), ours)
    assert_matches_and_moves(got, want, plain)


def peft_lora_file(folder, seed, **config):
    """A LoRA trained-and-saved the diffusers way: PEFT adapter on the transformer, random LoRA weights,
    get_peft_model_state_dict, save_lora_weights with the LoraConfig as lora_adapter_metadata."""
    from diffusers import QwenImageEditPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    model = make_transformer(seed=SEED)
    cfg = LoraConfig(target_modules=["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0",
                                     "to_add_out", "proj", "net.2", "img_mod.1", "txt_mod.1", "img_in", "txt_in",
                                     "proj_out", "linear", "linear_1", "linear_2"], **config)
    model.add_adapter(cfg, adapter_name="x")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    QwenImageEditPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(model, adapter_name="x"),
                                            transformer_lora_adapter_metadata=cfg.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=6, rank_pattern={"add_k_proj": 2, "^img_in": 3},
         alpha_pattern={"to_out.0": 5.0, "^proj_out": 1.5}),
    dict(r=3, lora_alpha=2, use_rslora=True),
], ids=["patterns", "rslora"])
def test_peft_metadata_matches_diffusers(config, tmp_path, one_thread):
    path = peft_lora_file(tmp_path, seed=2, **config)
    base = make_transformer(seed=SEED)
    ours = ours_from(base)
    plain, _ = forward(base, ours)
    (summary,) = fuse_loras(ours, [(path, 1.3)])
    assert summary.modules == len(linear_shapes(base))
    got, want = forward(reference([(path, 1.3)]), ours)
    assert_matches_and_moves(got, want, plain)


def test_stacked_loras_match_diffusers(tmp_path, one_thread):
    """Two LoRAs on the same modules with different scales: diffusers' adapters + set_adapters + fuse."""
    base = make_transformer(seed=SEED)
    shapes = linear_shapes(base)
    first = write(tmp_path / "a.safetensors", layout("kohya", random_lora(shapes, seed=4)))
    second = write(tmp_path / "b.safetensors", layout("transformer", random_lora(shapes, seed=5, alpha=False)))
    only_first = ours_from(base)
    fuse_loras(only_first, [(first, 0.8)])
    ours = ours_from(base)
    summary = fuse_loras(ours, [(first, 0.8), (read_lora(second), -0.5)])  # a path and an already-read LoRA
    assert [s.scale for s in summary] == [0.8, -0.5]
    got, want = forward(reference([(first, 0.8), (second, -0.5)]), ours)
    assert_matches_and_moves(got, want, forward(base, only_first)[0])  # the second LoRA counts too


def test_bf16_weight_gets_float32_sum_rounded_once(tmp_path):
    ours = ours_from(make_transformer(seed=SEED)).to(torch.bfloat16)
    lora = random_lora(linear_shapes(ours), seed=6)
    path = write(tmp_path / "lora.safetensors", layout("kohya", lora))
    before = ours.transformer_blocks[1].attn.to_v.weight.clone()
    fuse_loras(ours, [(path, 0.5)])
    down, up, alpha = lora["transformer_blocks.1.attn.to_v"]
    want = (before.float() + 0.5 * alpha / down.shape[0] * up @ down).bfloat16()
    assert torch.equal(ours.transformer_blocks[1].attn.to_v.weight, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_weights_fused_on_cuda(tmp_path, dtype):
    """compute_device="cuda" with the weights on the CPU: each weight goes over and back, keeping its dtype."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(96, 80), nn.Linear(80, 48)).to(dtype)
    path = write(tmp_path / "lora.safetensors", layout("bare_alpha", random_lora(linear_shapes(model()), seed=7)))
    on_cpu, via_cuda = model(), model()
    fuse_loras(on_cpu, [(path, 0.9)])
    fuse_loras(via_cuda, [(path, 0.9)], compute_device="cuda")
    for (name, a), b in zip(via_cuda.state_dict().items(), on_cpu.state_dict().values()):
        assert a.device.type == "cpu" and a.dtype == dtype, name
        assert torch.allclose(a.float(), b.float(), atol=1e-6, rtol=1e-5 if dtype == torch.float32 else 8e-3), name


# ---- bad inputs: one line naming the file, raised before any weight changes ----

def refused(tmp_path, tensors, metadata=None, raw=None):
    """fuse_loras(a good LoRA, then a bad one) -> the LoadError message; the weights must be unchanged."""
    ours = ours_from(make_transformer(seed=SEED))
    shapes = linear_shapes(ours)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    good = write(tmp_path / "good.safetensors", layout("kohya", random_lora(shapes, seed=8)))
    bad = tmp_path / "bad.safetensors"
    if raw is not None:
        bad.write_bytes(raw)
    else:
        write(bad, tensors, metadata)
    with pytest.raises(LoadError) as e:
        fuse_loras(ours, [(good, 1.0), (bad, 1.0)])
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg, msg
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items()), "weights changed"
    return msg


def good_layers(kind="transformer", seed=9):
    return layout(kind, random_lora(linear_shapes(make_transformer(seed=SEED)), seed=seed, alpha=False))


def test_unknown_modules(tmp_path):
    extra = {}
    for block in range(7, 12):  # the tiny model has blocks 0 and 1
        extra[f"transformer.transformer_blocks.{block}.attn.to_q.lora_A.weight"] = torch.zeros(2, 64)
        extra[f"transformer.transformer_blocks.{block}.attn.to_q.lora_B.weight"] = torch.zeros(64, 2)
    msg = refused(tmp_path, {**good_layers(), **extra})
    assert re.search(r"5 layer\(s\) match no module of this model: transformer\.transformer_blocks\.10\.attn"
                     r"\.to_q\.lora_A\.weight, .* and 2 more", msg), msg


@pytest.mark.parametrize("keys,marker", [
    (["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_3_linear1"], "double_blocks"),  # Flux
    (["transformer.single_transformer_blocks.0.attn.to_q"], "single_transformer_blocks"),  # Flux, diffusers
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_unet_input_blocks_4_1_proj_in"], "lora_te"),  # SDXL
])
def test_lora_for_another_model(tmp_path, keys, marker):
    tensors = {f"{k}.lora_down.weight": torch.zeros(2, 8) for k in keys}
    tensors.update({f"{k}.lora_up.weight": torch.zeros(8, 2) for k in keys})
    msg = refused(tmp_path, tensors)
    assert "is for another model, not Qwen-Image" in msg and marker in msg, msg


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    tensors = good_layers()
    tensors["transformer.transformer_blocks.1.attn.to_k.lora_A.weight"] = torch.zeros(3, 40)
    tensors["transformer.transformer_blocks.1.attn.to_k.lora_B.weight"] = torch.zeros(64, 3)
    msg = refused(tmp_path, tensors)
    assert ("1 layer(s) do not fit their module: transformer.transformer_blocks.1.attn.to_k.lora_A.weight (3, 40) "
            "/ transformer.transformer_blocks.1.attn.to_k.lora_B.weight (64, 3) vs "
            "transformer_blocks.1.attn.to_k.weight (64, 64)") in msg, msg


@pytest.mark.parametrize("drop", ["lora_B", "lora_A"])
def test_weight_without_its_pair(tmp_path, drop):
    tensors = good_layers()
    del tensors[f"transformer.img_in.{drop}.weight"]
    msg = refused(tmp_path, tensors)
    kept = "lora_A" if drop == "lora_B" else "lora_B"
    assert f"1 weight(s) without their pair" in msg and f"transformer.img_in.{kept}.weight" in msg, msg


@pytest.mark.parametrize("metadata", [None, {"lora_adapter_metadata": '{"transformer.use_dora": true}'}])
def test_dora_is_refused(tmp_path, metadata):
    tensors = good_layers()
    if metadata is None:
        tensors["transformer.img_in.lora_magnitude_vector"] = torch.ones(64)
        tensors["transformer.txt_in.dora_scale"] = torch.ones(64, 1)
    msg = refused(tmp_path, tensors, metadata)
    assert "is a DoRA" in msg and "not supported" in msg, msg


@pytest.mark.parametrize("key,tensor,shown", [
    ("transformer.proj_out.lora_A.weight", torch.zeros(2, 64, dtype=torch.int32), "torch.int32, (2, 64)"),
    ("transformer.proj_out.lora_A.weight", torch.zeros(2, 64, 1), "torch.float32, (2, 64, 1)"),
    ("transformer.proj_out.alpha", torch.ones(2), "torch.float32, (2,)"),
])
def test_tensor_of_the_wrong_kind(tmp_path, key, tensor, shown):
    msg = refused(tmp_path, {**good_layers(), key: tensor})
    assert f"1 tensor(s) of the wrong kind: {key} ({shown})" in msg, msg


def test_keys_in_no_lora_layout(tmp_path):
    msg = refused(tmp_path, {**good_layers(), "transformer.img_in.hada_w1_a": torch.zeros(2, 64)})
    assert "1 key(s) in no LoRA layout we read: transformer.img_in.hada_w1_a" in msg, msg


def test_module_under_two_names(tmp_path):
    tensors = good_layers()
    tensors["diffusion_model.img_in.lora_A.weight"] = tensors["transformer.img_in.lora_A.weight"].clone()
    msg = refused(tmp_path, tensors)
    assert ("1 module(s) appear under two keys: diffusion_model.img_in.lora_A.weight and "
            "transformer.img_in.lora_A.weight") in msg, msg
    tensors = good_layers()  # the same module once dotted, once Kohya-flattened: found when matching the model
    tensors["lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight"] = torch.zeros(2, 64)
    tensors["lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight"] = torch.zeros(64, 2)
    msg = refused(tmp_path, tensors)
    assert re.search(r"1 module\(s\) appear under two names: \S+to_q\S+ and \S+to_q\S+$", msg), msg


def test_down_and_up_ranks_differ(tmp_path):
    tensors = good_layers()
    tensors["transformer.img_in.lora_A.weight"] = torch.zeros(5, 64)
    msg = refused(tmp_path, tensors)
    assert re.search(r"1 layer\(s\) whose down and up ranks differ: transformer\.img_in\.lora_A\.weight "
                     r"\(5, 64\) vs transformer\.img_in\.lora_B\.weight \(64, \d\)", msg), msg


def test_metadata_rank_disagrees_with_tensors(tmp_path):
    tensors = {k: v for k, v in good_layers().items() if ".img_in." in k}  # rank 2 (first in sorted order)
    msg = refused(tmp_path, tensors, {"lora_adapter_metadata": '{"transformer.r": 8, "transformer.lora_alpha": 8}'})
    assert "its metadata gives img_in rank 8 but its tensors have rank" in msg, msg


@pytest.mark.parametrize("raw", [b"PK\x03\x04 a zip, e.g. a pickled torch file", "truncated"])
def test_not_safetensors_or_truncated(tmp_path, raw):
    if raw == "truncated":
        data = (write(tmp_path / "whole.safetensors", good_layers())).read_bytes()
        raw = data[: len(data) // 2]
    msg = refused(tmp_path, None, raw=raw)
    assert msg.startswith("cannot read LoRA") and "complete .safetensors file" in msg, msg


def test_missing_file(tmp_path):
    with pytest.raises(LoadError, match=r"^LoRA file \S+nope.safetensors does not exist$"):
        fuse_loras(ours_from(make_transformer(seed=SEED)), [(tmp_path / "nope.safetensors", 1.0)])


def test_parse_lora_arg(tmp_path):
    plain = write(tmp_path / "l.safetensors", good_layers())
    colon = write(tmp_path / "a:b.safetensors", good_layers())
    assert parse_lora_arg(str(plain)) == (str(plain), 1.0)
    assert parse_lora_arg(f"{plain}:0.75") == (str(plain), 0.75)
    assert parse_lora_arg(f"{plain}:-2") == (str(plain), -2.0)
    assert parse_lora_arg(str(colon)) == (str(colon), 1.0)          # the colon belongs to an existing path
    assert parse_lora_arg(f"{colon}:1e-1") == (str(colon), 0.1)


@pytest.mark.parametrize("text,match", [
    (":abc", r"'abc' is not a number and .* is not a file; write FILE or FILE:SCALE"),
    (":", r"'' is not a number"),
    (":nan", r"bad LoRA scale 'nan' in .*: the scale must be a finite number"),
    (":-inf", r"bad LoRA scale '-inf'"),
    (":1e999", r"bad LoRA scale '1e999'"),
])
def test_bad_scale_text(tmp_path, text, match):
    path = write(tmp_path / "l.safetensors", good_layers())
    with pytest.raises(LoadError, match=match) as e:
        parse_lora_arg(f"{path}{text}")
    assert "\n" not in str(e.value)
