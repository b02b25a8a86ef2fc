"""Qwen-Image text to image (QwenImagePipeline) vs diffusers on a tiny random snapshot saved by its own
save_pretrained (transformer, VAE at weight std 0.2, scheduler, Qwen2.5-VL, the real Qwen tokenizer in
tokenizer/, no processor/): the text-only template's embeddings, the whole image from prompt text and from
prompt embeddings, CFG on and off, odd sizes; the CLI's generate and its one-line refusals. CPU, float32."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from engine.config import RunOptions
from engine.pipelines.common import encode_text, load_models
from engine.pipelines.generate import SPEC, generate
from tests.conftest import make_transformer, make_vae, write_snapshot
from tests.test_processor import write_tokenizer_folders
from tests.test_text_encoder import redraw, tiny_config

PROMPT = "a red fox in the snow, 雪地里的红狐狸, with a sign that says 'Qwen' 🦊"


def generate_snapshot(root, te):
    write_snapshot(root, make_transformer(seed=7, joint_attention_dim=te.config.text_config.hidden_size),
                   make_vae(seed=8, scale=0.2))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    te.save_pretrained(root / "text_encoder")
    json_folder, _ = write_tokenizer_folders(root / "tok")
    json_folder.rename(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory, one_thread):
    from transformers import Qwen2_5_VLForConditionalGeneration
    te = redraw(Qwen2_5_VLForConditionalGeneration(tiny_config())).eval()
    return generate_snapshot(tmp_path_factory.mktemp("qwenimage"), te)


def reference_pipeline(root, with_text=True):
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    te = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder").eval() if with_text else None
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=AutoencoderKLQwenImage.from_pretrained(root / "vae"), text_encoder=te,
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer") if with_text else None,
        transformer=QwenImageTransformer2DModel.from_pretrained(root / "transformer"))


def pixels(im):
    return np.asarray(im).astype(int)


def test_template_and_defaults_match_reference(snapshot):
    """The text-only template, its 34 dropped tokens and the 512-token cut are the reference's, and its
    embeddings equal encode_prompt's; the default size is its 1024²."""
    from engine.text.processor import load_processor
    pipe = reference_pipeline(snapshot)
    assert SPEC.template(0) == pipe.prompt_template_encode and SPEC.drop == pipe.prompt_template_encode_start_idx
    assert SPEC.default_size == (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
    prefix = SPEC.template(0).split("{}")[0]
    assert len(load_processor(snapshot).tokenizer.encode(prefix)) == SPEC.drop
    prompts = [PROMPT, " "]
    with torch.no_grad():
        want = [pipe.encode_prompt(p, device=torch.device("cpu"))[0] for p in prompts]
    got = encode_text(snapshot, [], prompts)
    for (g, m), w in zip(got, want):
        assert g.shape == w.shape and int(m.sum()) == w.shape[1]
        err = ((g - w).abs().max() / w.abs().max()).item()
        print(f"{w.shape[1]} tokens: max rel diff {err:.2e}")
        assert err < 1e-4


def run_reference(pipe, cfg, size, seed, steps=2, **kw):
    with torch.no_grad():
        return pipe(true_cfg_scale=cfg, width=size[0], height=size[1], num_inference_steps=steps,
                    generator=torch.Generator("cpu").manual_seed(seed), **kw).images[0]


@pytest.mark.parametrize("cfg,size", [(4.0, (96, 64)), (1.0, (90, 70))])   # 90x70: floored to 80x64
def test_generate_from_prompt_matches_reference(snapshot, cfg, size):
    negative = " " if cfg > 1 else None
    want = run_reference(reference_pipeline(snapshot), cfg, size, 21, prompt=PROMPT, negative_prompt=negative)
    rows = encode_text(snapshot, [], [PROMPT] + ([negative] if negative else []))
    models = load_models(snapshot, "cpu", "float32")
    neg = rows[1] if negative else (None, None)
    got = generate(models, *rows[0], *neg, RunOptions(steps=2, cfg=cfg, seed=21, width=size[0], height=size[1]))
    a, b = pixels(got), pixels(want)
    assert a.shape == b.shape == (size[1] // 16 * 16, size[0] // 16 * 16, 3)
    diff = np.abs(a - b).max()
    print(f"cfg {cfg}, {size}: max pixel difference {diff}/255")
    assert diff <= 2 and a.std() > 5, (diff, a.std())


def embeddings(seed, n_pos=600, n_neg=9):
    """[1, L, 64] with masks: the prompt longer than the 512 tokens both pipelines keep."""
    g = torch.Generator().manual_seed(seed)
    pe, ne = torch.randn(1, n_pos, 64, generator=g), torch.randn(1, n_neg, 64, generator=g)
    return pe, torch.ones(1, n_pos, dtype=torch.long), ne, torch.ones(1, n_neg, dtype=torch.long)


@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_generate_from_embeddings_matches_reference(snapshot, cfg):
    pe, pm, ne, nm = embeddings(3)
    neg = (ne, nm) if cfg > 1 else (None, None)
    want = run_reference(reference_pipeline(snapshot, with_text=False), cfg, (48, 80), 5, prompt_embeds=pe,
                         prompt_embeds_mask=pm, negative_prompt_embeds=neg[0], negative_prompt_embeds_mask=neg[1])
    got = generate(load_models(snapshot, "cpu", "float32"), pe, pm, *neg,
                   RunOptions(steps=2, cfg=cfg, seed=5, width=48, height=80))
    diff = np.abs(pixels(got) - pixels(want)).max()
    print(f"embeddings, cfg {cfg}: max pixel difference {diff}/255")
    assert diff <= 2, diff


def test_template_prompt_and_cut_move_the_image(snapshot):
    """Sensitivity: the Edit system prompt instead of Qwen-Image's (text only, its 64 tokens dropped), another
    prompt, and tokens past 512 (which both pipelines cut) - the first two move the image far past the
    parity tolerance; the third does not move it at all."""
    from engine.models.text_encoder import load_text_encoder
    from engine.pipelines.text import encode_text_prompts
    from engine.text.processor import load_processor
    from engine.text.templates import SYSTEM
    processor, te = load_processor(snapshot), load_text_encoder(snapshot, torch.float32)
    wrong = SYSTEM + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    models = load_models(snapshot, "cpu", "float32")
    opts = RunOptions(steps=2, cfg=4.0, seed=4, width=64, height=64)

    def run(template, drop, prompt=PROMPT):     # the prompt and the negative " " through the template
        embeds, mask = encode_text_prompts(processor, te, [prompt, " "], template, drop)
        return pixels(generate(models, embeds[:1], mask[:1], embeds[1:], mask[1:], opts))
    base = run(SPEC.template(0), SPEC.drop)
    moves = {"template": np.abs(run(wrong, 64) - base).max(),
             "prompt": np.abs(run(SPEC.template(0), SPEC.drop, "a blue whale") - base).max()}
    print("max pixel change:", moves)
    assert all(m >= 10 for m in moves.values()), moves
    pe, pm, _, _ = embeddings(3)
    cut = pixels(generate(models, pe[:, :512], None, None, None, opts))
    assert np.array_equal(cut, pixels(generate(models, pe, pm, None, None, opts)))
    assert not np.array_equal(cut, pixels(generate(models, pe[:, :400], None, None, None, opts)))


def test_cli_generate_writes_what_the_api_makes(snapshot, tmp_path):
    out = tmp_path / "g.png"
    assert cli.main(["generate", "--model", str(snapshot), "--prompt", PROMPT, "--width", "64", "--height", "48",
                     "--steps", "2", "--seed", "9", "--device", "cpu", "--out", str(out)]) == 0
    rows = encode_text(snapshot, [], [PROMPT, " "])
    want = generate(load_models(snapshot, "cpu", "float32"), *rows[0], *rows[1],
                    RunOptions(steps=2, cfg=4.0, seed=9, width=64, height=48))
    im = Image.open(out)
    assert np.array_equal(np.asarray(im), np.asarray(want))
    meta = json.loads(im.text["qwen_image_edit"])
    assert meta["pipeline"] == "QwenImagePipeline" and meta["prompt"] == PROMPT and meta["size"] == "64x48"
    assert "images" not in meta and meta["cfg"] == 4.0 and meta["negative_prompt"] == " "


def test_planner_sizes_a_generate(snapshot):
    """Zero condition images: the text sizes come from the tokenizer alone, and a plan is made."""
    from engine.pipelines.budget import make_plan, prompt_lengths
    prompts = [PROMPT, " "]
    text_len, vl_tokens = prompt_lengths(snapshot, [], prompts)
    assert vl_tokens == 0 and text_len == max(r[0].shape[1] for r in encode_text(snapshot, [], prompts))
    plan = make_plan(snapshot, [], 64, 48, 2, True, 4 * 2 ** 30, "stream", "float32", text_len=text_len,
                     vl_tokens=0)
    assert plan.peaks["denoise"] > 0


def one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and all(n in err for n in needles), err


def test_wrong_command_for_the_snapshot(snapshot, tiny_snapshot, tmp_path, capsys):
    """An edit snapshot given to generate, and a Qwen-Image snapshot given to edit without --mask: one line
    naming the command that fits; nothing written."""
    out = str(tmp_path / "o.png")
    rc = cli.main(["generate", "--model", str(tiny_snapshot[0]), "--prompt", "x", "--device", "cpu", "--out", out])
    one_line_error(capsys, rc, "QwenImageEditPipeline edits images", "cli.py edit")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    rc = cli.main(["edit", "--model", str(snapshot), "--image", str(tmp_path / "a.png"), "--prompt", "x",
                   "--device", "cpu", "--out", out])
    one_line_error(capsys, rc, "QwenImagePipeline makes images from text", "cli.py generate", "--mask")
    assert not (tmp_path / "o.png").exists()
