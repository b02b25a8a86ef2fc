"""The whole edit from prompt embeddings vs diffusers' QwenImageEditPipeline: same snapshot, same seed."""
import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import RunOptions
from engine.pipelines.common import condition_size, edit, load_models, pack, unpack

SMALL_AREA = 96 * 96  # the reference hard-codes 1024²; both sides are pointed at a small area to keep CPU time low


def reference_pipeline(root, monkeypatch):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as mod
    orig = mod.calculate_dimensions
    monkeypatch.setattr(mod, "calculate_dimensions", lambda area, ratio: orig(SMALL_AREA, ratio))
    return mod.QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=AutoencoderKLQwenImage.from_pretrained(root / "vae"),
        text_encoder=None, tokenizer=None, processor=None,
        transformer=QwenImageTransformer2DModel.from_pretrained(root / "transformer"))


def test_condition_size_matches_reference():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
    for w, h in [(1024, 1024), (1920, 1080), (333, 777), (4000, 3000), (50, 2000), (817, 613)]:
        assert condition_size(w, h) == calculate_dimensions(1024 * 1024, w / h)[:2]


def test_pack_unpack_roundtrip():
    z = torch.randn(2, 16, 6, 10)
    assert torch.equal(unpack(pack(z), 6, 10), z)


def prompts(seed, dim=48):
    g = torch.Generator().manual_seed(seed)
    pe = torch.randn(1, 13, dim, generator=g)
    ne = torch.randn(1, 6, dim, generator=g)
    return pe, torch.ones(1, 13, dtype=torch.long), ne, torch.ones(1, 6, dtype=torch.long)


@pytest.mark.parametrize("size,cfg,out_size", [
    ((80, 60), 4.0, None),        # CFG on, cond/uncond of different lengths batched as B=2
    ((50, 90), 1.0, None),        # CFG off
    ((64, 64), 2.5, (48, 80)),    # output size differs from the condition size
])
def test_edit_matches_reference(tiny_snapshot, monkeypatch, size, cfg, out_size):
    root, _, _ = tiny_snapshot
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pe, pm, ne, nm = prompts(1)
    steps, seed = 3, 1234
    w, h = out_size or (None, None)

    ref = reference_pipeline(root, monkeypatch)
    want = ref(image=image, prompt_embeds=pe, prompt_embeds_mask=pm,
               negative_prompt_embeds=ne if cfg > 1 else None, negative_prompt_embeds_mask=nm if cfg > 1 else None,
               true_cfg_scale=cfg, num_inference_steps=steps, width=w, height=h,
               generator=torch.Generator("cpu").manual_seed(seed)).images[0]

    models = load_models(root, "cpu", "float32")
    opts = RunOptions(steps=steps, cfg=cfg, seed=seed, width=w, height=h, condition_area=SMALL_AREA)
    got = edit(models, image, pe, pm, ne if cfg > 1 else None, nm if cfg > 1 else None, opts)

    a, b = np.asarray(got).astype(int), np.asarray(want).astype(int)
    assert a.shape == b.shape
    diff = np.abs(a - b).max()
    print(f"max pixel difference {diff}/255, mean {np.abs(a - b).mean():.4f}")
    assert diff <= 2, f"max pixel difference {diff}/255"
    assert a.std() > 1, "degenerate output"


def test_same_seed_same_image(tiny_snapshot):
    root, _, _ = tiny_snapshot
    image = Image.new("RGB", (70, 50), (200, 30, 90))
    pe, pm, ne, nm = prompts(2)
    models = load_models(root, "cpu", "float32")
    opts = RunOptions(steps=2, cfg=3.0, seed=7, condition_area=SMALL_AREA)
    a = np.asarray(edit(models, image, pe, pm, ne, nm, opts))
    b = np.asarray(edit(models, image, pe, pm, ne, nm, opts))
    c = np.asarray(edit(models, image, pe, pm, ne, nm, RunOptions(steps=2, cfg=3.0, seed=8,
                                                                   condition_area=SMALL_AREA)))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_demo_snapshot_loads_in_diffusers(tmp_path):
    """The engine's own writer produces the layout diffusers saves: strict loads, no missing keys."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from engine.demo import write_demo_snapshot
    root = write_demo_snapshot(tmp_path / "demo")
    for cls, name in [(QwenImageTransformer2DModel, "transformer"), (AutoencoderKLQwenImage, "vae")]:
        _, info = cls.from_pretrained(root / name, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_streamed_plan_gives_the_same_image(tiny_snapshot):
    """A VRAM plan that streams blocks (and tiles nothing away from exactness) changes no pixel."""
    from engine.pipelines.budget import make_plan
    root, _, _ = tiny_snapshot
    image = Image.new("RGB", (72, 56), (30, 160, 90))
    pe, pm, ne, nm = prompts(4)
    import dataclasses
    plan = make_plan(root, image.size, None, None, 2, False, 8 * 2**30, "stream", "float32", area=SMALL_AREA)
    assert plan.mmdit_blocks == 2 and plan.decode_tile is None  # 2 blocks fit resident: nothing to gain
    streamed = dataclasses.replace(plan, mmdit_resident=0)      # force every block through the slots
    tiled = dataclasses.replace(plan, mmdit_resident=1, encode_tile=4, decode_tile=3)
    opts = RunOptions(steps=2, cfg=3.0, seed=3, condition_area=SMALL_AREA)
    want = np.asarray(edit(load_models(root, "cpu", "float32"), image, pe, pm, ne, nm, opts)).astype(int)
    got = np.asarray(edit(load_models(root, "cpu", "float32", plan=streamed), image, pe, pm, ne, nm, opts))
    assert np.array_equal(got, want)
    got = np.asarray(edit(load_models(root, "cpu", "float32", plan=tiled), image, pe, pm, ne, nm, opts))
    assert np.abs(got.astype(int) - want).max() <= 1  # exact tiling up to float32 rounding
    for split in ("rows", "forwards"):   # cond, then uncond: per block, or as whole forwards
        p = dataclasses.replace(plan, mmdit_resident=0, cfg_split=split)
        got = np.asarray(edit(load_models(root, "cpu", "float32", plan=p), image, pe, pm, ne, nm, opts))
        assert np.abs(got.astype(int) - want).max() <= 1, split  # B=1 vs B=2 GEMMs may round differently


def test_modulation_table_kept_for_the_same_schedule(tiny_snapshot, monkeypatch):
    """Without a plan, a second edit with the same schedule reuses the modulation table (the server's
    repeated requests skip the precompute) and gives the same image; another schedule rebuilds it; under a
    plan it is rebuilt every time (the plan frees it before the decode)."""
    import dataclasses

    import engine.pipelines.common as common
    from engine.pipelines.budget import make_plan
    root, _, _ = tiny_snapshot
    calls = []
    real = common.modulation_table_streamed
    monkeypatch.setattr(common, "modulation_table_streamed", lambda *a: calls.append(1) or real(*a))
    image = Image.new("RGB", (64, 48), (10, 200, 60))
    pe, pm, ne, nm = prompts(5)
    models = load_models(root, "cpu", "float32")
    opts = RunOptions(steps=2, cfg=3.0, seed=4, condition_area=SMALL_AREA)
    a = np.asarray(edit(models, image, pe, pm, ne, nm, opts))
    b = np.asarray(edit(models, image, pe, pm, ne, nm, opts))
    assert np.array_equal(a, b) and len(calls) == 1
    edit(models, image, pe, pm, ne, nm, dataclasses.replace(opts, steps=3))
    assert len(calls) == 2 and len(models.mod_tables) == 1
    plan = make_plan(root, image.size, None, None, 2, False, 8 * 2**30, "stream", "float32", area=SMALL_AREA)
    planned = load_models(root, "cpu", "float32", plan=plan)
    for _ in range(2):
        assert np.array_equal(np.asarray(edit(planned, image, pe, pm, ne, nm, opts)), a)
    assert len(calls) == 4 and not planned.mod_tables
