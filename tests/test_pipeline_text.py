"""Prompt, image, seed -> PNG: our whole edit vs diffusers' QwenImageEditPipeline with its text encoder,
on one tiny random snapshot (transformer, VAE, scheduler, Qwen2.5-VL, real Qwen tokenizer). CPU, float32."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from engine.config import RunOptions
from engine.pipelines.common import edit, encode_text, load_models
from tests.conftest import make_transformer, make_vae, write_snapshot
from tests.test_pipeline import SMALL_AREA
from tests.test_processor import random_image, reference_processor, write_image_config, write_tokenizer_folders
from tests.test_text_encoder import IMAGE_TOKEN_ID, redraw, tiny_config


@pytest.fixture(scope="module")
def text_snapshot(tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration
    root = tmp_path_factory.mktemp("textsnap")
    te = redraw(Qwen2_5_VLForConditionalGeneration(tiny_config())).eval()
    transformer = make_transformer(seed=5, joint_attention_dim=te.config.text_config.hidden_size)
    write_snapshot(root, transformer, make_vae(seed=6))
    te.save_pretrained(root / "text_encoder")
    json_folder, _ = write_tokenizer_folders(root / "tok")
    json_folder.rename(root / "processor")
    write_image_config(root / "processor", legacy=False)
    return root


def reference_edit(root, image, prompt, negative, cfg, steps, seed, monkeypatch):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as mod
    from transformers import Qwen2_5_VLForConditionalGeneration
    orig = mod.calculate_dimensions
    monkeypatch.setattr(mod, "calculate_dimensions", lambda area, ratio: orig(SMALL_AREA, ratio))
    te = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder").eval()
    # diffusers 0.42.1 does not forward mm_token_type_ids to a transformers-5 Qwen2.5-VL (diffusers #14194,
    # fix in PR #14189): without it the model falls back to 1-D positions. Apply that fix around the model.
    forward = te.forward
    monkeypatch.setattr(te, "forward", lambda **kw: forward(**kw, mm_token_type_ids=(kw["input_ids"] == IMAGE_TOKEN_ID).int()))
    processor = reference_processor(root / "processor", monkeypatch)
    pipe = mod.QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=AutoencoderKLQwenImage.from_pretrained(root / "vae"), text_encoder=te,
        tokenizer=processor.tokenizer, processor=processor,
        transformer=QwenImageTransformer2DModel.from_pretrained(root / "transformer"))
    with torch.no_grad():
        return pipe(image=image, prompt=prompt, negative_prompt=negative, true_cfg_scale=cfg,
                    num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed)).images[0]


@pytest.mark.parametrize("prompt,cfg", [("把背景换成雪天", 4.0), ("put a red hat on the cat 🎩, keep the rest", 1.0)])
def test_prompt_edit_matches_reference(text_snapshot, monkeypatch, prompt, cfg):
    image = random_image(120, 90, seed=3)
    negative = " " if cfg > 1 else None
    want = reference_edit(text_snapshot, image, prompt, negative, cfg, 2, 99, monkeypatch)

    rows = encode_text(text_snapshot, image, [prompt] + ([negative] if negative else []), area=SMALL_AREA)
    models = load_models(text_snapshot, "cpu", "float32")
    neg = rows[1] if negative else (None, None)
    got = edit(models, image, *rows[0], *neg, RunOptions(steps=2, cfg=cfg, seed=99, condition_area=SMALL_AREA))
    a, b = np.asarray(got).astype(int), np.asarray(want).astype(int)
    diff = np.abs(a - b).max()
    print(f"max pixel difference {diff}/255")
    assert a.shape == b.shape and diff <= 2, diff


def test_long_prompt_refused_by_cli(text_snapshot, tmp_path, capsys):
    random_image(64, 64).save(tmp_path / "in.png")
    rc = cli.main(["encode", "--model", str(text_snapshot), "--image", str(tmp_path / "in.png"),
                   "--prompt", "snow " * 1100, "--device", "cpu", "--out", str(tmp_path / "e.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "limit is 1024" in err and err.count("\n") == 1
    assert not (tmp_path / "e.safetensors").exists()


def test_cli_encode_then_edit_equals_prompt_edit(text_snapshot, tmp_path, monkeypatch):
    """`encode` writes what `edit --prompt-embeds` reads; both routes give the same PNG."""
    import engine.pipelines.spec as sp
    orig = sp.condition_size  # the CLI's 1 MP condition is slow on a CPU
    monkeypatch.setattr(sp, "condition_size", lambda w, h, area=None: orig(w, h, SMALL_AREA))
    random_image(100, 80, seed=4).save(tmp_path / "in.png")
    common = ["--model", str(text_snapshot), "--image", str(tmp_path / "in.png"), "--device", "cpu"]
    run = ["--steps", "2", "--seed", "5"]
    assert cli.main(["encode", *common, "--prompt", "make it snowy", "--out", str(tmp_path / "e.safetensors")]) == 0
    assert cli.main(["edit", *common, *run, "--prompt-embeds", str(tmp_path / "e.safetensors"),
                     "--out", str(tmp_path / "a.png")]) == 0
    assert cli.main(["edit", *common, *run, "--prompt", "make it snowy", "--out", str(tmp_path / "b.png")]) == 0
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    # the PNG text says how each was made: the prompt, or the embeddings file it came from
    meta_a, meta_b = json.loads(a.text["qwen_image_edit"]), json.loads(b.text["qwen_image_edit"])
    assert meta_b["prompt"] == "make it snowy" and meta_a["prompt_embeds"] == "e.safetensors"
    assert {k: v for k, v in meta_a.items() if k != "prompt_embeds"} == {k: v for k, v in meta_b.items() if k != "prompt"}
    assert meta_b["seed"] == 5 and meta_b["steps"] == 2 and meta_b["negative_prompt"] == " " and meta_b["cfg"] == 4.0


def test_cli_batch_equals_single_edits(text_snapshot, tmp_path, monkeypatch, capsys):
    """One model load for a prompt job and an embeddings job: the same PNGs as two single edits."""
    import json

    import engine.pipelines.spec as sp
    orig = sp.condition_size
    monkeypatch.setattr(sp, "condition_size", lambda w, h, area=None: orig(w, h, SMALL_AREA))
    random_image(100, 80, seed=4).save(tmp_path / "a.png")
    random_image(70, 90, seed=5).save(tmp_path / "b.png")
    common = ["--model", str(text_snapshot), "--device", "cpu"]
    assert cli.main(["encode", *common, "--image", str(tmp_path / "b.png"), "--prompt", "snow",
                     "--out", str(tmp_path / "e.safetensors")]) == 0
    for img, extra, out in [("a.png", ["--prompt", "make it snowy", "--seed", "3"], "single_a.png"),
                            ("b.png", ["--prompt-embeds", str(tmp_path / "e.safetensors"), "--cfg", "2.5"], "single_b.png")]:
        assert cli.main(["edit", *common, "--image", str(tmp_path / img), "--steps", "2", *extra,
                         "--out", str(tmp_path / out)]) == 0
    jobs = [{"image": str(tmp_path / "a.png"), "prompt": "make it snowy", "seed": 3, "out": str(tmp_path / "batch_a.png")},
            {"image": str(tmp_path / "b.png"), "prompt_embeds": str(tmp_path / "e.safetensors"), "cfg": 2.5,
             "out": str(tmp_path / "batch_b.png")}]
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    assert cli.main(["batch", str(tmp_path / "jobs.jsonl"), *common, "--steps", "2"]) == 0
    for x in "ab":
        assert (tmp_path / f"batch_{x}.png").read_bytes() == (tmp_path / f"single_{x}.png").read_bytes()

    # a bad line stops the batch before any work: one line naming it, nothing written
    jobs.append({"image": str(tmp_path / "a.png"), "prompt": "x", "out": str(tmp_path / "c.png"), "sead": 1})
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    capsys.readouterr()
    assert cli.main(["batch", str(tmp_path / "jobs.jsonl"), *common, "--force"]) == 2
    err = capsys.readouterr().err
    assert "jobs.jsonl:3: unknown field(s) sead" in err and err.count("\n") == 1
    assert not (tmp_path / "c.png").exists()
    assert cli.main(["batch", str(tmp_path / "jobs.jsonl"), *common]) == 2  # outputs exist, no --force
    assert "exists; pass --force" in capsys.readouterr().err


def test_planner_sizes_the_text_from_the_prompt(text_snapshot):
    """The plan's text sizes come from tokenizing (no model): the same length encode_text produces."""
    from engine.pipelines.budget import make_plan, prompt_lengths
    image = random_image(120, 90, seed=3)
    prompts = ["put a red hat on the cat 🎩, keep the rest", " "]
    text_len, vl_tokens = prompt_lengths(text_snapshot, image, prompts, area=SMALL_AREA)
    rows = encode_text(text_snapshot, image, prompts, area=SMALL_AREA)
    assert text_len == max(r[0].shape[1] for r in rows) and vl_tokens > 0
    args = (text_snapshot, image.size, None, None, 2, True, 4 * 2 ** 30, "stream", "float32")
    exact = make_plan(*args, area=SMALL_AREA, text_len=text_len, vl_tokens=vl_tokens)
    bound = make_plan(*args, area=SMALL_AREA)       # the worst-case prompt length
    assert exact.peaks["text"] < bound.peaks["text"] and exact.peaks["denoise"] < bound.peaks["denoise"]
