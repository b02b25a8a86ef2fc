"""Qwen-Image-Layered (QwenImageLayeredPipeline) vs diffusers on a tiny random snapshot saved by its own
save_pretrained (transformer with layer3d rope + additional_t_cond, the 4-channel VAE at weight std 0.2,
scheduler, Qwen2.5-VL, the real Qwen tokenizer): every layer, all four channels, CFG on and off, odd input
sizes; the layer3d rope against diffusers' transformer; the OpenRaster file read back; the CLI's one-line
refusals. CPU, float32. The working area is shrunk on both sides (the reference hard-codes 640²/1024²)."""
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from engine.pipelines.layered import LayeredOptions, layered, load_layered, rgba_input
from engine.pipelines.text import encode_text
from loaders.ora import read_ora, write_ora
from tests.conftest import TINY_VAE, make_transformer, randomize_, write_snapshot
from tests.test_mmdit import ours_from, run_pair
from tests.test_processor import random_image, write_tokenizer_folders
from tests.test_text_encoder import redraw, tiny_config

PROMPT = "a cat on a red sofa under a lamp, 沙发上的猫"
SMALL_AREA = 80 * 80


def rgba_image(w, h, seed):
    im = random_image(w, h, seed=seed)
    yy, xx = np.mgrid[0:h, 0:w]
    alpha = np.clip(255 * (1.3 - np.hypot(xx / w - 0.5, yy / h - 0.5) * 2.2), 0, 255).astype(np.uint8)
    im.putalpha(Image.fromarray(alpha))
    return im


def make_rgba_vae(seed):
    from diffusers import AutoencoderKLQwenImage
    g = torch.Generator().manual_seed(seed + 100)
    stats = dict(latents_mean=(0.5 * torch.randn(16, generator=g)).tolist(),
                 latents_std=(1 + torch.rand(16, generator=g)).tolist())
    return randomize_(AutoencoderKLQwenImage(**TINY_VAE, input_channels=4, **stats), seed, scale=0.2).eval()


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory, one_thread):
    return write_layered_snapshot(tmp_path_factory.mktemp("layered"))


def write_layered_snapshot(root):
    """A tiny QwenImageLayeredPipeline snapshot in `root`: layer3d/additional_t_cond transformer, RGBA VAE,
    Qwen2.5-VL text encoder, the real tokenizer. Returns root."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    te = redraw(Qwen2_5_VLForConditionalGeneration(tiny_config())).eval()
    write_snapshot(root, make_transformer(seed=9, joint_attention_dim=te.config.text_config.hidden_size,
                                          use_additional_t_cond=True, use_layer3d_rope=True), make_rgba_vae(10))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageLayeredPipeline"}))
    te.save_pretrained(root / "text_encoder")
    json_folder, _ = write_tokenizer_folders(root / "tok")
    json_folder.rename(root / "tokenizer")
    return root


def reference_pipeline(root, monkeypatch):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered as mod
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    orig = mod.calculate_dimensions
    monkeypatch.setattr(mod, "calculate_dimensions", lambda area, ratio: orig(SMALL_AREA, ratio))
    return mod.QwenImageLayeredPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=AutoencoderKLQwenImage.from_pretrained(root / "vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"), processor=None,
        transformer=QwenImageTransformer2DModel.from_pretrained(root / "transformer"))


def ours(snapshot, image, cfg, layers, seed, steps=2, normalize=False):
    prompts = [PROMPT] + ([" "] if cfg > 1 else [])
    rows = encode_text(snapshot, [], prompts)
    neg = rows[1] if cfg > 1 else (None, None)
    opts = LayeredOptions(layers=layers, steps=steps, cfg=cfg, seed=seed, cfg_normalize=normalize, area=SMALL_AREA)
    return layered(load_layered(snapshot), image, *rows[0], *neg, opts)


@pytest.mark.parametrize("cfg,layers,size,normalize", [(4.0, 3, (151, 67), False), (1.0, 2, (61, 97), False),
                                                       (3.0, 2, (90, 90), True)])
def test_layers_match_reference(snapshot, monkeypatch, cfg, layers, size, normalize):
    image = rgba_image(*size, seed=layers)
    pipe = reference_pipeline(snapshot, monkeypatch)
    with torch.no_grad():
        want = pipe(image=image, prompt=PROMPT, negative_prompt=" " if cfg > 1 else None, true_cfg_scale=cfg,
                    layers=layers, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(13),
                    resolution=640, cfg_normalize=normalize).images[0]
    got = ours(snapshot, image, cfg, layers, 13, normalize=normalize)
    from engine.pipelines.layered import SPEC     # the text-only template, its 34 dropped tokens, 512 kept
    assert (SPEC.template(0), SPEC.drop) == (pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx)
    assert len(got) == len(want) == layers
    diffs = []
    for g, w in zip(got, want):
        a, b = np.asarray(g).astype(int), np.asarray(w).astype(int)
        assert g.mode == w.mode == "RGBA" and a.shape == b.shape
        diffs.append(int(np.abs(a - b).max()))
        assert a.std(axis=(0, 1)).min() > 3, a.std(axis=(0, 1))     # every channel carries signal
    print(f"cfg {cfg}, {layers} layers, {size} -> {got[0].size}: max pixel difference per layer {diffs}/255")
    assert max(diffs) <= 2, diffs


def test_layered_is_sensitive(snapshot):
    """The seed, CFG normalization and the condition image's alpha each move the layers far past 2/255."""
    image = rgba_image(96, 64, seed=1)
    base = [np.asarray(im).astype(int) for im in ours(snapshot, image, 4.0, 2, 3)]
    opaque = image.copy()
    opaque.putalpha(255)
    moves = {}
    for name, out in (("seed", ours(snapshot, image, 4.0, 2, 4)),
                      ("normalize", ours(snapshot, image, 4.0, 2, 3, normalize=True)),
                      ("alpha", ours(snapshot, opaque, 4.0, 2, 3))):
        moves[name] = max(int(np.abs(np.asarray(o).astype(int) - b).max()) for o, b in zip(out, base))
    print("max pixel change:", moves)
    assert all(m >= 10 for m in moves.values()), moves


@pytest.mark.parametrize("shapes,txt_lens,L", [
    ([(1, 3, 4)] * 4 + [(1, 3, 4)], [6, 4], 6),       # 3 layers + composite + condition
    ([(1, 2, 2)] * 7 + [(1, 2, 2)], [5], 5),           # more frames than h/2: the text starts past the layers
    ([(1, 3, 5)] * 3 + [(1, 5, 3)], [7], 7),           # odd grids, the condition of another shape
])
def test_layer3d_rope_matches_diffusers(shapes, txt_lens, L):
    ref = make_transformer(seed=12, use_layer3d_rope=True, use_additional_t_cond=True)
    got, want = run_pair(ref, ours_from(ref), shapes, txt_lens, L, len(txt_lens), seed=3,
                         additional=torch.zeros(len(txt_lens), dtype=torch.long))
    err = (got - want).abs().max().item()
    print(f"{shapes[0]} x {len(shapes)}: max abs diff {err:.2e} (ref max {want.abs().max():.2f})")
    assert err <= 2e-5 * want.abs().max().item()
    plain = ours_from(make_transformer(seed=12, use_additional_t_cond=True))   # the same weights, 2D rope
    with torch.no_grad():
        other = run_pair(ref, plain, shapes, txt_lens, L, len(txt_lens), seed=3,
                         additional=torch.zeros(len(txt_lens), dtype=torch.long))[0]
    assert (other - want).abs().max() > 100 * err


def test_ora_round_trip(tmp_path):
    layers = [rgba_image(37, 21, seed=s) for s in range(3)]
    path = tmp_path / "x.ora"
    write_ora(path, layers)
    with zipfile.ZipFile(path) as z:
        first = z.infolist()[0]
        assert first.filename == "mimetype" and first.compress_type == zipfile.ZIP_STORED
        assert z.read("mimetype") == b"image/openraster" and first.header_offset == 0
    raw = path.read_bytes()
    assert raw[30:38] == b"mimetype" and raw[38:54] == b"image/openraster"   # readable without unzipping
    size, stack, names = read_ora(path)
    assert size == (37, 21) and [n for n, _ in stack] == ["layer_2", "layer_1", "layer_0"]   # top first
    assert all(np.array_equal(np.asarray(im), np.asarray(src)) for (_, im), src in zip(stack[::-1], layers))
    assert {"stack.xml", "mergedimage.png", "Thumbnails/thumbnail.png"} <= set(names)


def test_cli_layers_writes_pngs_and_ora(snapshot, tmp_path, capsys):
    """An RGB input (made opaque, with a note) through the CLI at 640² equals the API on the converted image."""
    src = tmp_path / "in.png"
    random_image(75, 50, seed=2).save(src)
    out = tmp_path / "L"
    assert cli.main(["layers", "--model", str(snapshot), "--image", str(src), "--prompt", PROMPT, "--layers", "2",
                     "--steps", "2", "--seed", "5", "--device", "cpu", "--out-dir", str(out)]) == 0
    assert "note: the image (mode RGB) has no alpha: converted to opaque RGBA" in capsys.readouterr().err
    rows = encode_text(snapshot, [], [PROMPT, " "])
    want = layered(load_layered(snapshot), rgba_input(Image.open(src))[0], *rows[0], *rows[1],
                   LayeredOptions(layers=2, steps=2, seed=5))
    pngs = [Image.open(out / f"layer_{i}.png") for i in range(2)]
    assert all(p.mode == "RGBA" and np.array_equal(np.asarray(p), np.asarray(w)) for p, w in zip(pngs, want))
    meta = json.loads(pngs[1].text["qwen_image_edit"])
    assert meta["pipeline"] == "QwenImageLayeredPipeline" and meta["layer"] == 1 and meta["prompt"] == PROMPT
    size, stack, _ = read_ora(out / "layers.ora")
    assert size == pngs[0].size == (768, 512) and [n for n, _ in stack] == ["layer_1", "layer_0"]


def one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and all(n in err for n in needles), err


@pytest.mark.parametrize("extra,needle", [
    (["--prompt", "x", "--resolution", "800"], "--resolution must be 640 or 1024"),
    (["--prompt", "x", "--layers", "1"], "--layers must be 2 to 10"),
    (["--prompt", "x", "--layers", "11"], "--layers must be 2 to 10"),
    (["--prompt", "x", "--steps", "0"], "--steps must be at least 1"),
])
def test_cli_refusals(snapshot, tmp_path, capsys, extra, needle):
    src = tmp_path / "in.png"
    rgba_image(40, 40, seed=0).save(src)
    rc = cli.main(["layers", "--model", str(snapshot), "--image", str(src), "--device", "cpu",
                   "--out-dir", str(tmp_path / "L")] + extra)
    one_line_error(capsys, rc, needle)
    assert not (tmp_path / "L").exists()


def test_wrong_snapshot_and_images(snapshot, tiny_snapshot, tmp_path, capsys):
    src = tmp_path / "in.png"
    rgba_image(40, 40, seed=0).save(src)
    rc = cli.main(["layers", "--model", str(tiny_snapshot[0]), "--image", str(src), "--prompt", "x",
                   "--device", "cpu", "--out-dir", str(tmp_path / "L")])
    one_line_error(capsys, rc, "Qwen-Image-Layered snapshot")
    rc = cli.main(["edit", "--model", str(snapshot), "--image", str(src), "--prompt", "x", "--device", "cpu",
                   "--out", str(tmp_path / "o.png")])
    one_line_error(capsys, rc, "cli.py layers")
    rc = cli.main(["generate", "--model", str(snapshot), "--prompt", "x", "--device", "cpu",
                   "--out", str(tmp_path / "o.png")])
    one_line_error(capsys, rc, "cli.py layers")
    rc = cli.main(["layers", "--model", str(snapshot), "--image", str(tmp_path / "missing.png"), "--prompt", "x",
                   "--device", "cpu", "--out-dir", str(tmp_path / "L")])
    one_line_error(capsys, rc, "does not exist")
    blank = tmp_path / "blank.png"
    Image.new("RGBA", (40, 40), (10, 20, 30, 0)).save(blank)
    rc = cli.main(["layers", "--model", str(snapshot), "--image", str(blank), "--prompt", "x",
                   "--device", "cpu", "--out-dir", str(tmp_path / "L")])
    one_line_error(capsys, rc, "fully transparent")
    (tmp_path / "a_file").write_bytes(b"keep me")
    rc = cli.main(["layers", "--model", str(snapshot), "--image", str(src), "--prompt", "x",
                   "--device", "cpu", "--out-dir", str(tmp_path / "a_file")])
    one_line_error(capsys, rc, "is a file; give a folder")
    assert (tmp_path / "a_file").read_bytes() == b"keep me"


def test_image_without_alpha_is_made_opaque():
    rgb = random_image(30, 20, seed=1)
    im, note = rgba_input(rgb)
    assert im.mode == "RGBA" and np.asarray(im)[..., 3].min() == 255 and "no alpha" in note
    im, note = rgba_input(rgb.convert("LA"))
    assert im.mode == "RGBA" and note is None
    im, note = rgba_input(rgba_image(30, 20, seed=1))
    assert note is None


def test_rgba_vae_matches_diffusers(snapshot):
    """The 4-channel VAE: encode (posterior mean) and decode, all four channels, float32."""
    from diffusers import AutoencoderKLQwenImage
    from engine.models.vae import load_vae
    from loaders import Snapshot
    ref, ours_vae = AutoencoderKLQwenImage.from_pretrained(snapshot / "vae").eval(), load_vae(Snapshot(snapshot))
    g = torch.Generator().manual_seed(0)
    x, z = torch.rand(1, 4, 40, 56, generator=g) * 2 - 1, torch.randn(1, 16, 5, 7, generator=g)
    with torch.no_grad():
        enc_want = ref.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]
        dec_want = ref.decode(z[:, :, None]).sample[:, :, 0]
    enc, dec = ours_vae.encode(x), ours_vae.decode(z)
    assert dec.shape == (1, 4, 40, 56)
    e1 = ((enc - enc_want).abs().max() / enc_want.abs().max()).item()
    e2 = ((dec - dec_want).abs().max() / dec_want.abs().max()).item()
    print(f"RGBA VAE: encode {e1:.1e}, decode {e2:.1e} relative")
    assert e1 < 1e-5 and e2 < 1e-4 and dec_want[:, 3].std() > 0.05


def test_streamed_tiled_and_split_equals_resident(snapshot):
    """Under a VRAM plan (every block streamed, the VAE tiled, CFG as two B=1 forwards or one row per block)
    the layers equal the resident run: streaming and tiling are exact, the CFG split only changes GEMM batch
    sizes (float32 rounding)."""
    import dataclasses

    from engine.vram.planner import Plan
    image = rgba_image(120, 70, seed=4)
    rows = encode_text(snapshot, [], [PROMPT, " "])
    opts = lambda: LayeredOptions(layers=2, steps=2, cfg=4.0, seed=3, area=SMALL_AREA)
    want = [np.asarray(im).astype(int) for im in layered(load_layered(snapshot), image, *rows[0], *rows[1], opts())]
    base = Plan(budget=0, mode="stream", mmdit_resident=0, mmdit_blocks=2, te_resident=0, te_layers=0,
                vision_resident=0, vision_blocks=0, encode_tile=3, decode_tile=2, peaks={}, host_pinned={},
                streamed_per_step=0)
    for split in ("forwards", "rows"):
        models = load_layered(snapshot, plan=dataclasses.replace(base, cfg_split=split))
        assert models.stream is not None and models.plan.decode_tile == 2
        got = layered(models, image, *rows[0], *rows[1], opts())
        models.stream.remove()
        diffs = [int(np.abs(np.asarray(g).astype(int) - w).max()) for g, w in zip(got, want)]
        assert max(diffs) <= 1, (split, diffs)


def test_lora_and_fp8_reach_the_layers(snapshot, tmp_path, capsys):
    """`layers --lora` fuses into the Layered transformer (the layers move, the PNG text names the file);
    `--weights fp8` quantizes its block Linears (a dequantized run on the CPU, within fp8 error)."""
    from tests.test_lora import layout, linear_shapes, random_lora, write
    src = tmp_path / "in.png"
    rgba_image(64, 48, seed=8).save(src)
    model = ours_from(make_transformer(seed=9, joint_attention_dim=16, use_additional_t_cond=True,
                                       use_layer3d_rope=True))
    shapes = {n: s for n, s in linear_shapes(model.transformer_blocks).items()}
    lora = write(tmp_path / "l.safetensors",
                 layout("transformer", {f"transformer_blocks.{n}": v for n, v in random_lora(shapes, 2).items()}))
    run = lambda out, *extra: cli.main(["layers", "--model", str(snapshot), "--image", str(src), "--prompt", PROMPT,
                                        "--layers", "2", "--steps", "2", "--device", "cpu", "--out-dir",
                                        str(tmp_path / out), *extra])
    assert run("plain") == 0 and run("lora", "--lora", f"{lora}:0.7") == 0 and run("fp8", "--weights", "fp8") == 0
    err = capsys.readouterr().err
    assert "block Linears quantized to float8_e4m3fn" in err
    read = lambda out: np.asarray(Image.open(tmp_path / out / "layer_1.png")).astype(int)
    assert np.abs(read("lora") - read("plain")).max() > 20
    assert 0 < np.abs(read("fp8") - read("plain")).max() <= 40
    meta = json.loads(Image.open(tmp_path / "lora" / "layer_0.png").text["qwen_image_edit"])
    assert meta["loras"] == [[str(lora), 0.7]]


def test_planner_sizes_the_layered_job():
    """The split's MMDiT sequence is (layers + 1) noisy frames plus the condition frame; on the full-size
    configs a 4-layer 1024 split streams under 16 GiB and a too-small budget names a layer count."""
    import dataclasses

    from engine.config import MMDiTConfig, VAEConfig
    from engine.models.text_encoder import TextConfig
    from engine.models.vision import VisionConfig
    from engine.vram.memory import GiB, Job, model_sizes_from_configs
    from engine.vram.planner import plan, smallest_budget
    sizes = model_sizes_from_configs(MMDiTConfig(use_additional_t_cond=True, use_layer3d_rope=True),
                                     (TextConfig(), VisionConfig()), VAEConfig(input_channels=4), 2)
    jobs = {r: Job(r, r, r, r, batch=2, text_len=200, vl_tokens=0, frames=5) for r in (640, 1024)}
    assert jobs[1024].tokens == 6 * 64 * 64 and jobs[640].tokens == 6 * 40 * 40
    p = plan(16 * GiB, jobs[1024], sizes)
    assert 0 < p.mmdit_resident < p.mmdit_blocks and max(p.peaks.values()) < 16 * GiB
    assert smallest_budget(jobs[640], sizes, "stream") < smallest_budget(jobs[1024], sizes, "stream")
    more = dataclasses.replace(jobs[1024], frames=11)
    assert smallest_budget(more, sizes, "stream") > smallest_budget(jobs[1024], sizes, "stream")
