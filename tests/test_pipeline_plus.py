"""Edit-2509/2511 (QwenImageEditPlusPipeline) vs diffusers on tiny random snapshots saved by its own
save_pretrained: the prompt embeddings for 1-3 images, and the whole edit from prompt text with CFG on and
off, zero_cond_t on and off. CPU, float32. The VL model sees each image at the reference's 384² (real size);
the VAE area is shrunk on both sides to keep CPU time low."""
import json

import numpy as np
import pytest
import torch

from engine.config import RunOptions
from engine.pipelines.common import edit, encode_text, load_models
from engine.pipelines.edit import SPEC as EDIT
from engine.pipelines.text import prompt_images
from tests.conftest import make_transformer, make_vae, write_snapshot
from tests.test_pipeline import SMALL_AREA
from tests.test_processor import HAS_TORCHVISION, random_image, reference_processor, write_image_config, write_tokenizer_folders
from tests.test_text_encoder import IMAGE_TOKEN_ID, redraw, tiny_config

PROMPT = "put Picture 2's coat on the person in Picture 1 把背景换成雪天"
# three aspect ratios, so each image gets its own VL grid and VAE size
IMAGES = [random_image(120, 90, seed=3), random_image(70, 110, seed=4), random_image(100, 100, seed=5)]
# transformers' processor resizes with torchvision where it is installed, else with PIL; we match either
RESIZE = "torch" if HAS_TORCHVISION else "pil"


def plus_snapshot(root, zero_cond_t, te):
    transformer = make_transformer(seed=5, joint_attention_dim=te.config.text_config.hidden_size,
                                   zero_cond_t=zero_cond_t)
    write_snapshot(root, transformer, make_vae(seed=6, scale=0.2))
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageEditPlusPipeline"}))
    te.save_pretrained(root / "text_encoder")
    json_folder, _ = write_tokenizer_folders(root / "tok")
    json_folder.rename(root / "processor")
    write_image_config(root / "processor", legacy=False)
    return root


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """{zero_cond_t: snapshot}: 2509 (off) and 2511 (on), the same text encoder."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    te = redraw(Qwen2_5_VLForConditionalGeneration(tiny_config())).eval()
    return {z: plus_snapshot(tmp_path_factory.mktemp(f"plus{int(z)}"), z, te) for z in (False, True)}


def reference_pipeline(root, monkeypatch, with_text=True):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as mod
    from transformers import Qwen2_5_VLForConditionalGeneration
    orig = mod.calculate_dimensions       # the VAE's (and the output's) 1 MP area shrinks; the VL's 384² stays
    monkeypatch.setattr(mod, "calculate_dimensions",
                        lambda area, ratio: orig(SMALL_AREA if area == 1024 * 1024 else area, ratio))
    te = processor = None
    if with_text:
        te = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder").eval()
        # diffusers 0.42.1 does not forward mm_token_type_ids to a transformers-5 Qwen2.5-VL (diffusers
        # #14194, PR #14189): without it the model falls back to 1-D positions. The fix, applied around it:
        forward = te.forward
        monkeypatch.setattr(te, "forward", lambda **kw: forward(
            **kw, mm_token_type_ids=(kw["input_ids"] == IMAGE_TOKEN_ID).int()))
        processor = reference_processor(root / "processor", monkeypatch)
    return mod.QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=AutoencoderKLQwenImage.from_pretrained(root / "vae"), text_encoder=te,
        tokenizer=processor and processor.tokenizer, processor=processor,
        transformer=QwenImageTransformer2DModel.from_pretrained(root / "transformer"))


def reference_embeds(pipe, images, prompt):
    """The reference's own resize of each image for the VL model, then its encode_prompt."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions
    vl = []
    for im in images:
        w, h = calculate_dimensions(CONDITION_IMAGE_SIZE, im.size[0] / im.size[1])
        vl.append(pipe.image_processor.resize(im, h, w))
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompt, image=vl, device=torch.device("cpu"))
    return embeds, vl


@pytest.mark.parametrize("n", [1, 2, 3])
def test_prompt_embeds_match_reference(snapshots, monkeypatch, n):
    root = snapshots[True]
    pipe = reference_pipeline(root, monkeypatch)
    want, vl = reference_embeds(pipe, IMAGES[:n], PROMPT)
    ours_vl = prompt_images(pipe_spec(root), IMAGES[:n])
    assert [im.size for im in ours_vl] == [im.size for im in vl]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours_vl, vl))
    (got, mask), = encode_text(root, IMAGES[:n], [PROMPT], resize=RESIZE)
    assert got.shape == want.shape and int(mask.sum()) == want.shape[1]
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"{n} image(s): {want.shape[1]} tokens, max rel diff {err:.2e}")
    assert err < 1e-4


def pipe_spec(root):
    from engine.pipelines import pipeline_for
    return pipeline_for(root)


def test_wrong_template_moves_the_embeddings(snapshots):
    """The same two images through the original Edit's single-image template give other embeddings: the
    template is what this test suite checks, and it is visible."""
    from engine.models.text_encoder import encode_prompts, load_text_encoder
    from engine.text.processor import load_processor
    from loaders import Snapshot
    root = snapshots[True]
    snap = Snapshot(root)
    processor, te = load_processor(snap), load_text_encoder(snap, torch.float32)
    vl = prompt_images(pipe_spec(root), IMAGES[:1])
    plus, _ = encode_prompts(processor, te, [PROMPT], vl, pipe_spec(root).template(1))
    plain, _ = encode_prompts(processor, te, [PROMPT], vl, EDIT.template(1))
    assert plus.shape != plain.shape or (plus - plain).abs().max() > 0.1


def run_both(root, monkeypatch, images, cfg, steps=2, seed=11):
    negative = " " if cfg > 1 else None
    pipe = reference_pipeline(root, monkeypatch)
    with torch.no_grad():
        want = pipe(image=images, prompt=PROMPT, negative_prompt=negative, true_cfg_scale=cfg,
                    num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    rows = encode_text(root, images, [PROMPT] + ([negative] if negative else []), resize=RESIZE)
    models = load_models(root, "cpu", "float32")
    neg = rows[1] if negative else (None, None)
    got = edit(models, images, *rows[0], *neg, RunOptions(steps=steps, cfg=cfg, seed=seed, condition_area=SMALL_AREA))
    return np.asarray(got).astype(int), np.asarray(want).astype(int), rows, models


@pytest.mark.parametrize("n,cfg,zero_cond_t", [(1, 4.0, True), (2, 4.0, True), (2, 1.0, True), (2, 4.0, False),
                                               (1, 1.0, False)])
def test_edit_matches_reference(snapshots, monkeypatch, n, cfg, zero_cond_t):
    root = snapshots[zero_cond_t]
    a, b, rows, models = run_both(root, monkeypatch, IMAGES[:n], cfg)
    assert a.shape == b.shape
    # the output takes the last image's size (and differs from the first's where their aspects differ)
    from engine.pipelines.spec import condition_size
    w, h = condition_size(*IMAGES[n - 1].size, SMALL_AREA)
    assert a.shape[:2] == (h, w) and (n == 1 or (w, h) != condition_size(*IMAGES[0].size, SMALL_AREA))
    diff = np.abs(a - b).max()
    print(f"{n} image(s), cfg {cfg}, zero_cond_t {zero_cond_t}: max pixel difference {diff}/255")
    assert diff <= 2, diff
    assert a.std() > 1, "degenerate output"


def test_conditioning_moves_the_image(snapshots):
    """Sensitivity: zero_cond_t, the second image and the Plus template each move the output by far more
    than the parity tolerance, so the parity tests above could not pass with one of them wrong."""
    images = IMAGES[:2]
    opts = RunOptions(steps=2, cfg=1.0, seed=11, condition_area=SMALL_AREA)
    out = {}
    for z, root in snapshots.items():
        (pe, pm), = encode_text(root, images, [PROMPT])
        models = load_models(root, "cpu", "float32")
        out[z] = np.asarray(edit(models, images, pe, pm, None, None, opts)).astype(int)
        if z:
            (pe1, pm1), = encode_text(root, images[1:], [PROMPT])      # one image only, in the prompt too
            out["one"] = np.asarray(edit(models, images[1:], pe1, pm1, None, None, opts)).astype(int)
            out["prompt_one"] = np.asarray(edit(models, images, pe1, pm1, None, None, opts)).astype(int)
    moves = {k: int(np.abs(out[k] - out[True]).max()) for k in (False, "one", "prompt_one")}
    print("max pixel change vs the 2511 two-image edit:", moves)
    assert all(m >= 5 * 2 for m in moves.values()), moves     # >= 5x the parity tolerance


def test_four_images_refused(snapshots, tmp_path, capsys):
    import cli
    paths = []
    for i in range(4):
        IMAGES[i % 3].save(tmp_path / f"{i}.png")
        paths += ["--image", str(tmp_path / f"{i}.png")]
    rc = cli.main(["edit", "--model", str(snapshots[True]), *paths, "--prompt", "x", "--device", "cpu",
                   "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "takes 1 to 3 images" in err and "got 4" in err and err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()


def test_original_edit_takes_one_image(tiny_snapshot, tmp_path, capsys):
    import cli
    root, _, _ = tiny_snapshot
    IMAGES[0].save(tmp_path / "a.png")
    rc = cli.main(["edit", "--model", str(root), "--image", str(tmp_path / "a.png"), "--image",
                   str(tmp_path / "a.png"), "--prompt", "x", "--device", "cpu", "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "QwenImageEditPipeline takes one image" in err and err.count("\n") == 1


def test_unknown_pipeline_class_refused(tmp_path, capsys):
    import cli
    from loaders import LoadError
    root = write_snapshot(tmp_path / "s")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    with pytest.raises(LoadError, match="names pipeline 'FluxKontextPipeline'; this engine runs "
                                        "QwenImageEditPipeline, QwenImageEditPlusPipeline"):
        load_models(root)
    IMAGES[0].save(tmp_path / "a.png")
    rc = cli.main(["edit", "--model", str(root), "--image", str(tmp_path / "a.png"), "--prompt", "x",
                   "--device", "cpu", "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "FluxKontextPipeline" in err and err.count("\n") == 1
