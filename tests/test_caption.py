"""Qwen-Image-Layered's automatic caption (empty prompt) vs diffusers' get_image_caption on a tiny random
Qwen2.5-VL saved by transformers, with the published Qwen2.5-VL generation_config.json (do_sample with
top_k 1, repetition_penalty 1.05, two eos ids): the generated token ids and text for the English and the
Chinese template; our KV-cache decode against re-running the prefill for every token; the whole layered run
with an empty prompt against the reference's. CPU, float32."""
import json

import numpy as np
import pytest
import torch

from engine.models.decode import generation_settings, greedy_decode
from engine.models.text_encoder import load_text_encoder
from engine.pipelines import layered as lay
from engine.pipelines.text import encode_text
from tests.test_layered import SMALL_AREA, reference_pipeline, rgba_image, write_layered_snapshot
from tests.test_processor import reference_processor, write_image_config, write_tokenizer_folders

GENERATION = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
              "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1}


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory, one_thread):
    root = write_layered_snapshot(tmp_path_factory.mktemp("caption"))
    (root / "text_encoder" / "generation_config.json").write_text(json.dumps(GENERATION))
    write_tokenizer_folders(root / "tok2")[0].rename(root / "processor")
    write_image_config(root / "processor", legacy=False)
    return root


def resize_mode(pipe):
    """Our processor backend matching the reference's image processor (torchvision-style or PIL)."""
    from transformers.image_processing_backends import TorchvisionBackend
    return "torch" if isinstance(pipe.vl_processor.image_processor, TorchvisionBackend) else "pil"


def reference(snapshot, monkeypatch, max_new_tokens=None):
    """The reference pipeline with its VL processor, generate's output ids recorded (max_new_tokens: cap
    its 512 tokens, for speed)."""
    pipe = reference_pipeline(snapshot, monkeypatch)
    pipe.vl_processor = reference_processor(snapshot / "processor", monkeypatch)
    calls, generate = [], pipe.text_encoder.generate

    def record(**kw):
        out = generate(**{**kw, "max_new_tokens": max_new_tokens or kw["max_new_tokens"]})
        calls.append(out[0, kw["input_ids"].shape[1]:].tolist())
        return out
    monkeypatch.setattr(pipe.text_encoder, "generate", record)
    return pipe, calls


@pytest.mark.parametrize("use_en_prompt,tokens", [(True, None), (False, 160)])
def test_caption_matches_reference(snapshot, monkeypatch, use_en_prompt, tokens):
    """The reference's get_image_caption on the image it shows the VL model (the input at the working size):
    all 512 tokens for the English template, the first 160 (for speed) for the Chinese one."""
    image = rgba_image(151, 67, seed=2)
    pipe, calls = reference(snapshot, monkeypatch, max_new_tokens=tokens)
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_layered import calculate_dimensions
    w, h = calculate_dimensions(640 * 640, image.width / image.height)
    template = pipe.image_caption_prompt_en if use_en_prompt else pipe.image_caption_prompt_cn
    assert template == (lay.CAPTION_TEMPLATE_EN if use_en_prompt else lay.CAPTION_TEMPLATE_CN)
    with torch.no_grad():
        want = pipe.get_image_caption(pipe.image_processor.resize(image, h, w), use_en_prompt, torch.device("cpu"))
    got, ids = lay.caption_image(snapshot, image, use_en_prompt, lay.LayeredOptions(area=SMALL_AREA),
                                max_new_tokens=tokens, resize=resize_mode(pipe))
    print(f"{len(ids)} tokens, first {ids[:8]}; caption {got[:60]!r}")
    assert ids == calls[0] and len(ids) == (tokens or 512)
    assert got == want and got


def test_cache_equals_no_cache(snapshot):
    """The KV cache and the continued M-RoPE positions against re-running the prefill for every token,
    with and without the repetition penalty."""
    from engine.text.processor import Processor
    enc = load_text_encoder(snapshot, torch.float32, lm_head=True)
    inputs = Processor.load(snapshot)([""], rgba_image(90, 60, seed=3), lay.CAPTION_TEMPLATE_EN)
    for penalty in (1.0, 1.05):
        runs = [greedy_decode(enc, inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"], 24,
                              repetition_penalty=penalty, use_cache=c) for c in (True, False)]
        assert runs[0] == runs[1] and len(runs[0]) == 24


def test_generation_settings():
    assert generation_settings(GENERATION) == (1.05, [151645, 151643], True)
    assert generation_settings(None, {"eos_token_id": 7}) == (1.0, [7], True)
    assert generation_settings({"do_sample": True, "top_k": 50})[2] is False


def test_empty_prompt_layers_match_reference(snapshot, monkeypatch):
    """The reference's __call__ with prompt="" (its own caption, Chinese by default), 96 caption tokens on
    both sides (the 512-token captions are compared above)."""
    image = rgba_image(90, 90, seed=5)
    pipe, calls = reference(snapshot, monkeypatch, max_new_tokens=96)
    with torch.no_grad():
        want = pipe(image=image, prompt="", negative_prompt=None, true_cfg_scale=1.0, layers=2, num_inference_steps=2,
                    generator=torch.Generator("cpu").manual_seed(13), resolution=640).images[0]
    opts = lay.LayeredOptions(layers=2, steps=2, cfg=1.0, seed=13, area=SMALL_AREA)
    caption, ids = lay.caption_image(snapshot, image, False, opts, max_new_tokens=96, resize=resize_mode(pipe))
    assert ids == calls[0] and len(ids) == 96
    got = lay.layered(lay.load_layered(snapshot), image, *encode_text(snapshot, [], [caption])[0], opts=opts)
    diffs = [int(np.abs(np.asarray(g).astype(int) - np.asarray(w).astype(int)).max()) for g, w in zip(got, want)]
    print("max pixel difference per layer", diffs)
    assert len(got) == len(want) == 2 and max(diffs) <= 2


def test_cli_blank_prompt_captions(snapshot, tmp_path, capsys, monkeypatch):
    """`cli.py layers --prompt " " --use-en-prompt` captions the image with the English template and records
    the caption; the layers equal the API's run on that caption (caption and working area shrunk)."""
    import functools

    import cli
    from PIL import Image
    monkeypatch.setattr(lay, "CAPTION_MAX_TOKENS", 12)
    monkeypatch.setattr(lay, "LayeredOptions", functools.partial(lay.LayeredOptions, area=SMALL_AREA))
    src, out = tmp_path / "in.png", tmp_path / "L"
    rgba_image(75, 50, seed=2).save(src)
    args = ["layers", "--model", str(snapshot), "--image", str(src), "--layers", "2", "--steps", "1", "--cfg", "1",
            "--device", "cpu", "--out-dir", str(out), "--prompt", " ", "--use-en-prompt"]
    assert cli.main(args) == 0
    image = Image.open(src)
    opts = lay.LayeredOptions(layers=2, steps=1, cfg=1.0, seed=0)
    caption, ids = lay.caption_image(snapshot, image, True, opts)
    assert len(ids) == 12 and f"caption (12 tokens" in capsys.readouterr().err
    pngs = [Image.open(out / f"layer_{i}.png") for i in range(2)]
    assert json.loads(pngs[0].text["qwen_image_edit"])["prompt"] == caption
    want = lay.layered(lay.load_layered(snapshot), image, *encode_text(snapshot, [], [caption])[0], opts=opts)
    assert all(np.array_equal(np.asarray(p), np.asarray(w)) for p, w in zip(pngs, want))
