"""Qwen2.5-VL prefill parity with transformers on a tiny random model saved by save_pretrained, and
encode_prompts parity with diffusers' QwenImageEditPipeline._get_qwen_prompt_embeds. CPU, float32.

Weights are redrawn larger than transformers' init (std 0.02) so attention is peaked and a wrong
position or window would show. float32 differences are round-off (|err| ~ 4e-5 on values ~ 4: the
float32 reference is itself that far from a float64 run); in float64 the two agree bit for bit.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.text.processor import EDIT_TEMPLATE, Processor, PromptError
from engine.models.text_encoder import encode_prompts, load_text_encoder, read_config
from loaders import LoadError
from tests.test_processor import random_image, reference_processor, write_image_config, write_tokenizer_folders

IMAGE_TOKEN_ID = 151655
PROMPTS = ["make it snowy", "把背景换成雪天，再加一只戴帽子的猫 😀  and\na sign that says 'Qwen'"]


def tiny_config():
    from transformers import Qwen2_5_VLConfig
    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1, 3], window_size=56, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2))


def redraw(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.normal_(1.0, 0.1)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 1.5 / p[0].numel() ** 0.5)
    return model


def legacy_config(config):
    """The flat config.json of the published snapshots (transformers 4.5x): LM fields at the top level,
    rope_scaling + rope_theta instead of rope_parameters."""
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    config.update({k: v for k, v in text.items() if k != "model_type"})
    config.update(rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    config["vision_config"].pop("rope_parameters")
    config["vision_config"]["model_type"] = "qwen2_5_vl"
    return config


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """published/: save_pretrained keys (model.layers.*, visual.*, lm_head) and a flat legacy config, tokenizer
    as vocab.json + merges.txt; v5/: transformers 5 module keys (model.language_model.*, model.visual.*), a
    nested config, tied embeddings so no lm_head, tokenizer.json. Returns (published, v5, reference model)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    root = tmp_path_factory.mktemp("snap")
    model = redraw(Qwen2_5_VLForConditionalGeneration(tiny_config())).eval()
    published, v5 = root / "published", root / "v5"
    model.save_pretrained(published / "text_encoder")
    path = published / "text_encoder" / "config.json"
    path.write_text(json.dumps(legacy_config(json.loads(path.read_text()))))
    (v5 / "text_encoder").mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    assert any(k.startswith("model.language_model.") for k in state)
    save_file(state, str(v5 / "text_encoder" / "model.safetensors"))
    config = model.config.to_dict()
    config["tie_word_embeddings"] = True
    (v5 / "text_encoder" / "config.json").write_text(json.dumps(config))
    for snap, layout in ((published, 1), (v5, 0)):
        folder = write_tokenizer_folders(snap / "tok")[layout]
        folder.rename(snap / "processor")
        write_image_config(snap / "processor", legacy=layout == 1, max_pixels=28 * 28 * 256)
        (snap / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(published / "text_encoder").eval()
    return published, v5, reference


def report(name, got, want):
    err = (got - want).abs().max().item()
    rel = err / want.abs().max().item()
    print(f"{name}: max abs {err:.2e}, max rel {rel:.2e}")
    return err, rel


def test_configs_read_alike(snapshots):
    published, v5, _ = snapshots
    a = read_config(json.loads((published / "text_encoder" / "config.json").read_text()))
    b = read_config(json.loads((v5 / "text_encoder" / "config.json").read_text()))
    assert a == b and a[0].mrope_section == (2, 3, 3) and a[1].fullatt_block_indexes == (1, 3)


@pytest.mark.parametrize("size", [(300, 200), (130, 410)])
def test_vision_tower_matches_reference(snapshots, size):
    published, _, reference = snapshots
    ours = load_text_encoder(published, torch.float32)
    inputs = Processor.load(published)(["x"], random_image(*size))
    with torch.no_grad():
        want = reference.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        got = ours.visual(inputs["pixel_values"], inputs["image_grid_thw"])
    # 300x200 -> 22x14 patches: 2x2-block windows with partial edges on both axes
    assert report(f"vision {size}", got, want)[1] < 1e-4


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_last_hidden_state_matches_reference(snapshots, padding_side):
    published, _, reference = snapshots
    ours = load_text_encoder(published, torch.float32)
    processor = Processor.load(published)
    processor.tokenizer.padding_side = padding_side
    inputs = processor(PROMPTS, random_image(300, 200))
    assert inputs["attention_mask"][0].sum() < inputs["attention_mask"][1].sum()
    grids, pixels = inputs["image_grid_thw"].repeat(2, 1), inputs["pixel_values"].repeat(2, 1)
    with torch.no_grad():
        out = reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixels,
                        image_grid_thw=grids, mm_token_type_ids=(inputs["input_ids"] == IMAGE_TOKEN_ID).int(),
                        output_hidden_states=True)
        got = ours(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"])
    # transformers 5 ties hidden_states[-1] to last_hidden_state, i.e. after the final norm
    final_norm = reference.model.language_model.norm
    assert not torch.allclose(out.hidden_states[-1], final_norm(out.hidden_states[-1]))
    valid = inputs["attention_mask"].bool()
    assert report(f"hidden ({padding_side} padded)", got[valid], out.hidden_states[-1][valid])[1] < 1e-4


def test_float64_bit_exact(snapshots, monkeypatch):
    """Same math as the reference: in float64 the outputs are identical. The torch attention reference
    computes in float32, so a float64 one is swapped in; the rest of both models rounds rope and norm
    statistics to float32 the same way."""
    import torch.nn.functional as F

    import kernels.attention

    def attention64(q, k, v, kv_len=None, causal=False, scale=None):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
        mask = mask.tril() if causal else mask
        if kv_len is not None:
            mask = mask & (torch.arange(k.shape[2])[None, None, None] < kv_len[:, None, None, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)

    monkeypatch.setattr(kernels.attention, "attention_ref", attention64)
    published, _, reference = snapshots
    reference = reference.to(torch.float64)
    try:
        ours = load_text_encoder(published, torch.float64)
        inputs = Processor.load(published)(PROMPTS, random_image(300, 200))
        pixels = inputs["pixel_values"].double()
        with torch.no_grad():
            want = reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             pixel_values=pixels.repeat(2, 1), image_grid_thw=inputs["image_grid_thw"].repeat(2, 1),
                             mm_token_type_ids=(inputs["input_ids"] == IMAGE_TOKEN_ID).int(),
                             output_hidden_states=True).hidden_states[-1]
            got = ours(inputs["input_ids"], inputs["attention_mask"], pixels, inputs["image_grid_thw"])
    finally:
        reference.to(torch.float32)
    valid = inputs["attention_mask"].bool()
    assert report("hidden float64", got[valid], want[valid])[0] < 1e-12


def pipeline_embeds(snapshot, reference, prompts, image, monkeypatch, forward_mm_token_type_ids=True):
    """diffusers' _get_qwen_prompt_embeds on a pipeline holding only the text parts. With transformers 5
    the pipeline must forward mm_token_type_ids (diffusers issue #14194, PR #14189) or the model silently
    falls back to 1-D positions; `forward_mm_token_type_ids` applies that fix around the reference model."""
    from diffusers import QwenImageEditPipeline
    processor = reference_processor(snapshot / "processor", monkeypatch)
    pipe = QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=reference, tokenizer=processor.tokenizer,
                                 processor=processor, transformer=None)
    if forward_mm_token_type_ids:
        forward = reference.forward
        monkeypatch.setattr(reference, "forward", lambda **kw: forward(
            **kw, mm_token_type_ids=(kw["input_ids"] == IMAGE_TOKEN_ID).int()))
    with torch.no_grad():
        # transformers 5's processor wants one image per <|image_pad|>: the same image for each prompt
        return pipe._get_qwen_prompt_embeds(prompts, [image] * len(prompts), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("layout", ["published", "v5"])
def test_encode_prompts_matches_pipeline(snapshots, monkeypatch, layout):
    published, v5, reference = snapshots
    snapshot = published if layout == "published" else v5
    image = random_image(300, 200)
    want, want_mask = pipeline_embeds(snapshot, reference, PROMPTS, image, monkeypatch)
    processor = Processor.load(snapshot, resize="torch" if reference_torchvision() else "pil")
    got, mask = encode_prompts(processor, load_text_encoder(snapshot, torch.float32), PROMPTS, image)
    assert mask.dtype == want_mask.dtype == torch.int64 and torch.equal(mask, want_mask)
    assert got.shape == want.shape and mask[0].sum() < mask[1].sum()
    assert torch.all(got[mask == 0] == 0)
    assert report(f"embeds ({layout})", got, want)[1] < 1e-4


def reference_torchvision():
    import importlib.util
    return importlib.util.find_spec("torchvision") is not None


def test_key_layouts_and_lm_head(snapshots):
    published, v5, _ = snapshots
    a, b = load_text_encoder(published, torch.float32), load_text_encoder(v5, "float32")
    assert not any("lm_head" in k for k in a.state_dict())
    assert isinstance(a.layers, torch.nn.ModuleList) and isinstance(a.visual.blocks, torch.nn.ModuleList)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_bfloat16_as_accurate_as_reference(snapshots):
    """bf16 error against the float32 reference is no worse than transformers' own bf16 run."""
    published, _, reference = snapshots
    inputs = Processor.load(published)(PROMPTS, random_image(130, 410))
    valid = inputs["attention_mask"].bool()

    def run_reference(dtype):
        model = reference.to(dtype)
        with torch.no_grad():
            return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         pixel_values=inputs["pixel_values"].repeat(2, 1).to(dtype),
                         image_grid_thw=inputs["image_grid_thw"].repeat(2, 1),
                         mm_token_type_ids=(inputs["input_ids"] == IMAGE_TOKEN_ID).int(),
                         output_hidden_states=True).hidden_states[-1][valid].float()

    try:
        want, want_bf16 = run_reference(torch.float32), run_reference(torch.bfloat16)
    finally:
        reference.to(torch.float32)
    ours = load_text_encoder(published, torch.bfloat16)
    got = ours(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_grid_thw"])
    assert got.dtype == torch.bfloat16
    ours_err = ((got[valid].float() - want).norm() / want.norm()).item()
    ref_err = ((want_bf16 - want).norm() / want.norm()).item()
    print(f"bf16 relative Frobenius error vs float32 reference: ours {ours_err:.2e}, transformers {ref_err:.2e}")
    assert ours_err < 1.5 * ref_err


def test_refusals(snapshots):
    published, _, _ = snapshots
    encoder, processor = load_text_encoder(published, torch.float32), Processor.load(published)
    with pytest.raises(PromptError, match="limit is 1024"):
        encode_prompts(processor, encoder, ["fine", "雪 " * 1100], random_image(64, 64))
    with pytest.raises(PromptError, match="at least 14 px"):
        encode_prompts(processor, encoder, ["fine"], random_image(10, 64))
    bad = Path(published).parent / "bad"
    (bad / "text_encoder").mkdir(parents=True)
    (bad / "model_index.json").write_text("{}")
    config = json.loads((published / "text_encoder" / "config.json").read_text())
    (bad / "text_encoder" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    for f in (published / "text_encoder").glob("*.safetensors"):
        (bad / "text_encoder" / f.name).symlink_to(f)
    with pytest.raises(LoadError, match="missing key"):
        load_text_encoder(bad, torch.float32)
    assert EDIT_TEMPLATE.count("<|image_pad|>") == 1
