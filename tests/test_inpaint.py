"""Inpainting vs diffusers on tiny random snapshots saved by its own save_pretrained: an Edit snapshot as
QwenImageEditInpaintPipeline, a Qwen-Image one as QwenImageInpaintPipeline, from prompt text, strength 1.0
and 0.6, CFG on and off, masks of another size; outpainting; the CLI's --mask/--strength/--outpaint and its
one-line refusals. CPU, float32; the Edit's ≈1 MP working area is shrunk on both sides."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import cli
from engine.config import RunOptions
from engine.pipelines import inpaint as ip
from engine.pipelines.common import encode_text, load_models
from tests.conftest import make_transformer, make_vae, write_snapshot
from tests.test_generate import generate_snapshot
from tests.test_pipeline import SMALL_AREA
from tests.test_processor import (HAS_TORCHVISION, random_image, reference_processor, write_image_config,
                                  write_tokenizer_folders)
from tests.test_text_encoder import IMAGE_TOKEN_ID, redraw, tiny_config

PROMPT = "replace the masked part with a small wooden house 木屋"
RESIZE = "torch" if HAS_TORCHVISION else "pil"
IMAGE = random_image(120, 90, seed=3)


def make_mask(size, box, mode="L"):
    """White (repaint) box and ellipse on black, at `size`; box in fractions of the size."""
    w, h = size
    m = Image.new(mode, size, 0)
    x0, y0, x1, y1 = (int(f * s) for f, s in zip(box, (w, h, w, h)))
    ImageDraw.Draw(m).rectangle((x0, y0, x1, y1), fill="white")
    ImageDraw.Draw(m).ellipse((0, int(0.7 * h), int(0.3 * w), h - 1), fill="white")
    return m


MASK = make_mask(IMAGE.size, (0.3, 0.2, 0.8, 0.6))
MASK_OTHER = make_mask((50, 70), (0.45, 0.1, 0.9, 0.5), mode="RGB")    # another size and aspect


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory, one_thread):
    """{"edit": a QwenImageEditPipeline snapshot with processor/, "qwen": a QwenImagePipeline one}."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    te = redraw(Qwen2_5_VLForConditionalGeneration(tiny_config())).eval()
    root = tmp_path_factory.mktemp("editinpaint")
    write_snapshot(root, make_transformer(seed=5, joint_attention_dim=te.config.text_config.hidden_size),
                   make_vae(seed=6, scale=0.2))
    te.save_pretrained(root / "text_encoder")
    json_folder, _ = write_tokenizer_folders(root / "tok")
    json_folder.rename(root / "processor")
    write_image_config(root / "processor", legacy=False)
    return {"edit": root, "qwen": generate_snapshot(tmp_path_factory.mktemp("qwenimage"), te)}


def reference(kind, root, monkeypatch):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_inpaint as edit_mod
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_inpaint as qwen_mod
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    te = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder").eval()
    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
                 vae=AutoencoderKLQwenImage.from_pretrained(root / "vae"), text_encoder=te,
                 transformer=QwenImageTransformer2DModel.from_pretrained(root / "transformer"))
    if kind == "qwen":
        return qwen_mod.QwenImageInpaintPipeline(tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"), **parts)
    orig = edit_mod.calculate_dimensions
    monkeypatch.setattr(edit_mod, "calculate_dimensions", lambda area, ratio: orig(SMALL_AREA, ratio))
    # diffusers 0.42.1 does not forward mm_token_type_ids to a transformers-5 Qwen2.5-VL (diffusers #14194)
    forward = te.forward
    monkeypatch.setattr(te, "forward", lambda **kw: forward(
        **kw, mm_token_type_ids=(kw["input_ids"] == IMAGE_TOKEN_ID).int()))
    processor = reference_processor(root / "processor", monkeypatch)
    return edit_mod.QwenImageEditInpaintPipeline(tokenizer=processor.tokenizer, processor=processor, **parts)


def ours(kind, root, image, mask, cfg, strength, steps, seed, size=(None, None), resize=RESIZE):
    negative = [" "] if cfg > 1 else []
    rows = encode_text(root, [image] if kind == "edit" else [], [PROMPT] + negative, area=SMALL_AREA, resize=resize)
    models = load_models(root, "cpu", "float32")
    neg = rows[1] if negative else (None, None)
    opts = RunOptions(steps=steps, cfg=cfg, seed=seed, width=size[0], height=size[1], condition_area=SMALL_AREA)
    return ip.inpaint(models, image, mask, *rows[0], *neg, opts, strength)


def pixels(im):
    return np.asarray(im).astype(int)


CASES = [("edit", 1.0, 4.0, MASK, None), ("edit", 0.6, 1.0, MASK_OTHER, None), ("edit", 0.6, 4.0, MASK_OTHER, None),
         ("qwen", 1.0, 1.0, MASK, (80, 64)), ("qwen", 0.6, 4.0, MASK_OTHER, (96, 48))]


@pytest.mark.parametrize("kind,strength,cfg,mask,size", CASES)
def test_inpaint_matches_reference(snapshots, monkeypatch, kind, strength, cfg, mask, size):
    root, steps, seed = snapshots[kind], 3, 17
    kw = dict(width=size[0], height=size[1]) if size else {}
    with torch.no_grad():
        want = reference(kind, root, monkeypatch)(
            image=IMAGE, mask_image=mask, prompt=PROMPT, negative_prompt=" " if cfg > 1 else None,
            true_cfg_scale=cfg, strength=strength, num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(seed), **kw).images[0]
    got = ours(kind, root, IMAGE, mask, cfg, strength, steps, seed, size or (None, None))
    a, b = pixels(got), pixels(want)
    assert a.shape == b.shape
    diff = np.abs(a - b).max()
    print(f"{kind} strength {strength} cfg {cfg} {a.shape[1]}x{a.shape[0]}: max pixel difference {diff}/255")
    assert diff <= 2 and a.std() > 5, (diff, a.std())


def test_mask_and_posterior_sample_move_the_image(snapshots, monkeypatch):
    """Sensitivity: another mask, and the posterior's mean instead of a sample, each move the image far
    past the parity tolerance; outside the mask the output keeps to the original's latents."""
    root = snapshots["edit"]
    base = pixels(ours("edit", root, IMAGE, MASK, 1.0, 0.6, 3, 17))
    other = pixels(ours("edit", root, IMAGE, MASK_OTHER, 1.0, 0.6, 3, 17))
    black = pixels(ours("edit", root, IMAGE, Image.new("L", IMAGE.size), 1.0, 0.6, 3, 17))
    posterior = ip.posterior

    def mean_only(vae, image, tile=None):
        mean, logvar = posterior(vae, image, tile)
        return mean, torch.full_like(logvar, -30.0)          # std e^-15: the mean, to float32 rounding
    monkeypatch.setattr(ip, "posterior", mean_only)
    mean = pixels(ours("edit", root, IMAGE, MASK, 1.0, 0.6, 3, 17))
    moves = {"mask": np.abs(other - base).max(), "no mask": np.abs(black - base).max(),
             "mean": np.abs(mean - base).max()}
    print("max pixel change:", moves)
    assert all(m >= 10 for m in moves.values()), moves


def test_outpaint_canvas_and_mask():
    canvas, mask = ip.outpaint(IMAGE, (5, 0, 7, 3))
    a, m = np.asarray(canvas), np.asarray(mask.convert("L"))
    assert canvas.size == (IMAGE.width + 12, IMAGE.height + 3) and mask.size == canvas.size
    assert np.array_equal(a[:IMAGE.height, 5:5 + IMAGE.width], np.asarray(IMAGE))
    assert np.array_equal(a[:, 0], a[:, 5]) and np.array_equal(a[-1], a[IMAGE.height - 1])     # edge-extended
    assert (m[:IMAGE.height, 5:5 + IMAGE.width] == 0).all() and (m[:, :5] == 255).all() and (m[-3:] == 255).all()


def test_cli_inpaint_and_outpaint(snapshots, tmp_path, monkeypatch, capsys):
    """edit --mask (an Edit snapshot, a mask of another size: a note) and edit --outpaint (Qwen-Image) write
    what the API makes, and the PNG names the inpaint pipeline."""
    import engine.pipelines.spec as sp
    orig = sp.condition_size        # the CLI's 1 MP area is slow on a CPU
    monkeypatch.setattr(sp, "condition_size", lambda w, h, area=None: orig(w, h, SMALL_AREA))
    IMAGE.save(tmp_path / "in.png")
    MASK_OTHER.save(tmp_path / "m.png")
    common = ["--image", str(tmp_path / "in.png"), "--prompt", PROMPT, "--steps", "3", "--seed", "2", "--device", "cpu"]
    assert cli.main(["edit", "--model", str(snapshots["edit"]), *common, "--mask", str(tmp_path / "m.png"),
                     "--cfg", "1", "--out", str(tmp_path / "a.png")]) == 0
    assert "note: the mask is 50x70, the image 120x90" in capsys.readouterr().err
    want = ours("edit", snapshots["edit"], IMAGE, ip.read_mask(tmp_path / "m.png"), 1.0, 0.6, 3, 2, resize="pil")
    a = Image.open(tmp_path / "a.png")
    assert np.array_equal(np.asarray(a), np.asarray(want))
    meta = json.loads(a.text["qwen_image_edit"])
    assert meta["pipeline"] == "QwenImageEditInpaintPipeline" and meta["mask"] == "m.png" and meta["strength"] == 0.6
    assert "Mask: m.png" in a.text["parameters"] and "Denoising strength: 0.6" in a.text["parameters"]

    assert cli.main(["edit", "--model", str(snapshots["qwen"]), *common, "--outpaint", "0,8,24,0", "--cfg", "1",
                     "--width", "96", "--height", "64", "--out", str(tmp_path / "b.png")]) == 0
    canvas, mask = ip.outpaint(IMAGE, (0, 8, 24, 0))
    want = ours("qwen", snapshots["qwen"], canvas, mask, 1.0, 1.0, 3, 2, size=(96, 64))
    b = Image.open(tmp_path / "b.png")
    assert b.size == (96, 64) and np.array_equal(np.asarray(b), np.asarray(want))
    meta = json.loads(b.text["qwen_image_edit"])
    assert meta["pipeline"] == "QwenImageInpaintPipeline" and meta["outpaint"] == "0,8,24,0" and meta["strength"] == 1


def test_bad_inputs_refused(snapshots, tmp_path, capsys):
    """Each bad input: one line, exit 2, nothing written, before any model loads."""
    IMAGE.save(tmp_path / "in.png")
    MASK.save(tmp_path / "m.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    plus = write_snapshot(tmp_path / "plus")
    (plus / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPlusPipeline"}))
    out = tmp_path / "o.png"
    edit_ = ["edit", "--model", str(snapshots["edit"]), "--image", str(tmp_path / "in.png"), "--prompt", "x",
             "--device", "cpu", "--out", str(out)]
    mask = ["--mask", str(tmp_path / "m.png")]
    cases = [
        (edit_ + ["--mask", str(tmp_path / "bad.png")], "cannot read mask"),
        (edit_ + ["--mask", str(tmp_path / "none.png")], "does not exist"),
        (edit_ + mask + ["--strength", "0"], "--strength must be in (0, 1]"),
        (edit_ + mask + ["--strength", "1.5"], "--strength must be in (0, 1]"),
        (edit_ + mask + ["--strength", "nan"], "--strength must be in (0, 1]"),
        (edit_ + mask + ["--strength", "1e-20"], "runs no step"),
        (edit_ + ["--strength", "0.5"], "--strength needs --mask"),
        (edit_ + ["--outpaint", "1,2,3"], "--outpaint wants L,T,R,B"),
        (edit_ + ["--outpaint", "0,0,1000000000,0"], "over the 100 MP limit for images"),
        (edit_ + mask + ["--width", "64"], "drop --width/--height"),
        (edit_ + mask + ["--image", str(tmp_path / "in.png")], "an inpaint takes one --image"),
        (["edit", "--model", str(plus), *edit_[3:], *mask], "QwenImageEditPlusPipeline has no inpaint pipeline"),
    ]
    for argv, needle in cases:
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and needle in err, (argv, err)
        print(err.strip())
    assert not out.exists()
