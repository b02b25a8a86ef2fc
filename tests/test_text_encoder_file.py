"""--text-encoder FILE: the Qwen2.5-VL text encoder from one .safetensors in ComfyUI's split-file layout
(qwen_2.5_vl_7b.safetensors: `model.*`, `visual.*`, `lm_head.weight` in bf16; the _fp8_scaled file: every Linear
weight float8_e4m3fn with a float32 per-tensor `scale_weight` and a `scaled_fp8` marker), written here from a tiny
snapshot's save_pretrained weights. The bf16 file gives the snapshot's embeddings bit for bit; the fp8 file those of
the snapshot model holding the dequantized weights, with its language-model Linears fp8 in memory; bad files fail
in one line before anything runs; the planner counts fp8 language-model Linears at their size. CPU."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cli
from engine.models.text_encoder import load_text_encoder
from engine.pipelines.text import encode_text, load_text_model, run_text_encoder
from engine.text.processor import load_processor
from engine.transforms.fp8 import TEXT_LINEARS, FP8Linear
from loaders import LoadError, Snapshot, read_tensors
from loaders.text_encoder_layout import convert_text_encoder_state
from tests.test_pipeline import SMALL_AREA
from tests.test_pipeline_text import text_snapshot  # noqa: F401 (fixture)
from tests.test_processor import random_image

BF16, FP8 = "qwen_2.5_vl_7b.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors"
PROMPTS = ["make the sky green", " "]
E4M3_MAX = 448.0
pytestmark = pytest.mark.usefixtures("one_thread")


def comfy_state(snapshot):
    """The snapshot's text encoder in ComfyUI's key layout (what save_pretrained writes: `model.layers.*`,
    `visual.*`, the Conv3d patch embedding), with lm_head.weight, in bf16."""
    state = {}
    for f in sorted((snapshot / "text_encoder").glob("*.safetensors")):
        state.update(load_file(str(f)))
    state = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
             for k, v in state.items()}
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}


def scaled(state):
    """ComfyUI's fp8_scaled rule: every Linear weight (2-D, not the embedding or the LM head) to float8_e4m3fn with
    one float32 number per tensor, amax / 448, as `<layer>.scale_weight` (plus a `scale_input` of 1, which ComfyUI
    keeps for static activation scaling); a `scaled_fp8` marker; the rest as it was (bf16)."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in state.items():
        if v.dim() == 2 and k.endswith(".weight") and k not in ("model.embed_tokens.weight", "lm_head.weight"):
            w = v.float()
            scale = w.abs().max() / E4M3_MAX
            out[k] = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            out[k[:-len("weight")] + "scale_weight"] = scale.reshape(())
            out[k[:-len("weight")] + "scale_input"] = torch.ones(())
        else:
            out[k] = v
    return out


def dequantized(state):
    """A scaled file's tensors as float32 values: W = weight.float() · scale, the rest widened."""
    out = {}
    for k, v in state.items():
        if k == "scaled_fp8" or k.endswith((".scale_weight", ".scale_input")):
            continue
        scale = state.get(k[:-len("weight")] + "scale_weight") if k.endswith(".weight") else None
        out[k] = v.float() * scale if scale is not None else v.float()
    return out


def config_only(snap, bare, pattern):
    """bare/: the snapshot's other folders linked, text_encoder/ with only its files matching `pattern` (no
    weights: what `--text-encoder FILE` completes)."""
    bare.mkdir()
    for item in snap.iterdir():
        if item.name != "text_encoder":
            (bare / item.name).symlink_to(item)
    (bare / "text_encoder").mkdir()
    for f in (snap / "text_encoder").glob(pattern):
        shutil.copy(f, bare / "text_encoder" / f.name)
    return bare


@pytest.fixture(scope="module")
def files(text_snapshot, tmp_path_factory):
    """(config-only snapshot: text_encoder/ holds config.json alone, the bf16 file, the fp8_scaled file, the fp8
    file's tensors)."""
    root = tmp_path_factory.mktemp("te_file")
    state = comfy_state(text_snapshot)
    save_file(state, str(root / BF16))
    fp8 = scaled(state)
    save_file(fp8, str(root / FP8))
    return config_only(text_snapshot, root / "config_only", "*.json"), root / BF16, root / FP8, fp8


def encode(model, snap):
    processor = load_processor(Snapshot(snap))
    return run_text_encoder(processor, model, [(random_image(64, 48, seed=3), PROMPTS)], "cpu")[0]


def test_bf16_file_equals_the_snapshot(text_snapshot, files):
    """The bf16 file on a snapshot whose text_encoder/ has no weights: the same prompt embeddings, bit for bit, as
    the snapshot's own text encoder in bf16 (both are the same bf16 values); the summary says what was read."""
    bare, bf16, _, _ = files
    image = random_image(64, 48, seed=3)
    want = encode_text(text_snapshot, image, PROMPTS, dtype="bfloat16")
    notes = []
    got = encode_text(bare, image, PROMPTS, dtype="bfloat16", text_encoder_file=bf16, notes=notes)
    for (g, gm), (w, wm) in zip(got, want):
        assert g.dtype == torch.bfloat16 and torch.equal(gm, wm) and torch.equal(g, w)
    assert notes and notes[0].startswith(f"text encoder from {BF16}: ") and "bf16)" in notes[0]
    assert "lm_head.weight not read" in notes[0]
    with pytest.raises(LoadError, match="no .safetensors file"):      # without the file, there are no weights
        encode_text(bare, image, PROMPTS)


def test_fp8_file_is_its_dequantized_self(text_snapshot, files):
    """The fp8_scaled file: its language model's 7 Linears per layer are FP8Linear in float8_e4m3fn with the
    per-tensor scale as one float32 per output channel; the vision tower's fp8 Linears are dequantized on load;
    the embeddings equal the snapshot model holding the file's dequantized values, and differ from the bf16 file's
    by the fp8 error only. --text-weights bf16 dequantizes the language model too (the same numbers)."""
    bare, bf16, fp8, fp8_state = files
    te = load_text_encoder(bare, torch.float32, "cpu", file=fp8)
    layers = len(te.layers)
    fp8_layers = {n: m for n, m in te.named_modules() if isinstance(m, FP8Linear)}
    assert sorted(fp8_layers) == sorted(f"layers.{i}.{n}" for i in range(layers) for n in TEXT_LINEARS)
    for name, m in fp8_layers.items():
        file_key = "model." + name
        assert m.weight.dtype == torch.float8_e4m3fn and torch.equal(m.weight.view(torch.uint8),
                                                                      fp8_state[file_key + ".weight"].view(torch.uint8))
        assert m.weight_scale.dtype == torch.float32 and m.weight_scale.shape == (m.weight.shape[0],)
        assert torch.all(m.weight_scale == fp8_state[file_key + ".scale_weight"])
    assert all(p.dtype == torch.float32 for p in te.visual.parameters())
    src = te.source["fp8"]
    vision_linears = 5 * len(te.visual.blocks) + 2
    assert src["layout"] == "scaled" and src["kept"] == 7 * layers and len(src["dequantized"]) == vision_linears
    assert src["input_scales"] == 7 * layers + vision_linears

    ref = load_text_encoder(text_snapshot, torch.float32, "cpu")
    ref.load_state_dict(convert_text_encoder_state(dequantized(fp8_state)))
    got, want = encode(te, text_snapshot), encode(ref, text_snapshot)
    base = encode(load_text_encoder(bare, torch.float32, "cpu", file=bf16), text_snapshot)
    for (g, gm), (w, wm), (b, _) in zip(got, want, base):
        assert torch.equal(gm, wm) and torch.equal(g, w)
        moved = ((g - b).norm() / b.norm()).item()
        print(f"fp8 file vs bf16 file: relative {moved:.2e}")
        assert 1e-3 < moved < 0.5, moved      # per-tensor e4m3 through peaked attention in a tiny model
    wide = load_text_encoder(bare, torch.float32, "cpu", file=fp8, weights="bf16")
    assert not any(isinstance(m, FP8Linear) for m in wide.modules())
    assert all(torch.equal(a, b) for a, b in zip(encode(wide, text_snapshot)[0], want[0]))


def test_text_weights_fp8_quantizes_a_bf16_file(files):
    """--text-weights fp8 with the bf16 file: quantized on load (one scale per output channel), as for a snapshot."""
    bare, bf16, fp8, _ = files
    notes = []
    te = load_text_model(Snapshot(bare), "float32", "cpu", "fp8", bf16, notes=notes)
    assert sum(isinstance(m, FP8Linear) for m in te.modules()) == 7 * len(te.layers)
    assert any("text-encoder Linears quantized to float8_e4m3fn" in n for n in notes), notes
    notes = []   # the fp8 file: nothing left to quantize
    load_text_model(Snapshot(bare), "float32", "cpu", "fp8", fp8, notes=notes)
    assert len(notes) == 1 and "kept in float8_e4m3fn" in notes[0]


def test_lm_head_from_the_file(files):
    """For decoding (the Layered caption) the file's lm_head.weight is read; without one, and untied, one line."""
    bare, bf16, _, _ = files
    te = load_text_encoder(bare, torch.float32, "cpu", lm_head=True, file=bf16)
    assert torch.equal(te.lm_head_weight(), load_file(str(bf16))["lm_head.weight"].float())
    headless = bf16.with_name("headless.safetensors")
    save_file({k: v for k, v in load_file(str(bf16)).items() if k != "lm_head.weight"}, str(headless))
    load_text_encoder(bare, torch.float32, "cpu", file=headless)                  # prefill needs no head
    assert json.loads((bare / "text_encoder" / "config.json").read_text())["tie_word_embeddings"] is False
    with pytest.raises(LoadError, match="headless.safetensors: lm_head.weight is missing"):
        load_text_encoder(bare, torch.float32, "cpu", lm_head=True, file=headless)


def test_mixed_layers_stay_as_they_are_and_refuse_to_stream(files):
    """A file with one fp8 Linear among bf16 ones: that layer is FP8Linear, the others stay plain Linears; under a
    VRAM plan (identical layers stream through shared slots) it is refused with the flags that make them alike."""
    bare, bf16, _, _ = files
    state = load_file(str(bf16))
    key = "model.layers.1.mlp.up_proj.weight"
    state[key] = state[key].to(torch.float8_e4m3fn)
    mixed = bf16.with_name("mixed.safetensors")
    save_file(state, str(mixed))
    te = load_text_model(Snapshot(bare), "float32", "cpu", file=mixed)
    assert [n for n, m in te.named_modules() if isinstance(m, FP8Linear)] == ["layers.1.mlp.up_proj"]
    assert type(te.layers[0].mlp.up_proj) is torch.nn.Linear
    with pytest.raises(LoadError, match="mix fp8 and bf16 Linears.*--text-weights fp8"):
        load_text_model(Snapshot(bare), "float32", "cpu", file=mixed, plan=SimpleNamespace())
    load_text_model(Snapshot(bare), "float32", "cpu", "fp8", mixed, plan=SimpleNamespace())


@pytest.fixture
def small_area(monkeypatch):
    import engine.pipelines.spec as sp
    orig = sp.condition_size      # the CLI's 1 MP condition is slow on a CPU
    monkeypatch.setattr(sp, "condition_size", lambda w, h, area=None: orig(w, h, SMALL_AREA))


def test_cli_encode_edit_batch_record_the_file(files, tmp_path, small_area, capsys):
    """`encode --text-encoder` writes the file's embeddings; `edit --prompt --text-encoder` gives the PNG that
    `edit --prompt-embeds` of those embeddings gives, and its PNG text names the file; `batch --text-encoder` the
    same bytes as the single edit."""
    bare, _, fp8, _ = files
    random_image(100, 80, seed=4).save(tmp_path / "in.png")
    common = ["--model", str(bare), "--image", str(tmp_path / "in.png"), "--device", "cpu"]
    assert cli.main(["encode", *common, "--prompt", "make it snowy", "--text-encoder", str(fp8),
                     "--out", str(tmp_path / "e.safetensors")]) == 0
    assert f"note: text encoder from {FP8}" in capsys.readouterr().err
    want = encode_text(bare, Image.open(tmp_path / "in.png"), ["make it snowy", " "], text_encoder_file=fp8)
    got = read_tensors(tmp_path / "e.safetensors")
    assert torch.equal(got["prompt_embeds"], want[0][0]) and torch.equal(got["negative_prompt_embeds"], want[1][0])
    with safe_open(str(tmp_path / "e.safetensors"), framework="pt") as f:    # the header says what made them
        assert f.metadata() == {"format": "pt", "model": bare.name, "text_encoder": FP8}
    run = ["--steps", "2", "--seed", "5"]
    assert cli.main(["edit", *common, *run, "--prompt-embeds", str(tmp_path / "e.safetensors"),
                     "--out", str(tmp_path / "a.png")]) == 0
    assert cli.main(["edit", *common, *run, "--prompt", "make it snowy", "--text-encoder", str(fp8),
                     "--out", str(tmp_path / "b.png")]) == 0
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    meta = json.loads(b.text["qwen_image_edit"])
    assert meta["text_encoder"] == FP8 and "text_encoder" not in json.loads(a.text["qwen_image_edit"])
    assert f"Text encoder: {FP8}" in b.text["parameters"]
    job = {"image": str(tmp_path / "in.png"), "prompt": "make it snowy", "seed": 5, "out": str(tmp_path / "c.png")}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(job) + "\n")
    assert cli.main(["batch", str(tmp_path / "jobs.jsonl"), "--model", str(bare), "--device", "cpu", "--steps", "2",
                     "--text-encoder", str(fp8)]) == 0
    assert (tmp_path / "c.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def bad_files(bf16, fp8_state, tmp):
    """(name, file, words of the one-line refusal)."""
    state = load_file(str(bf16))
    cases = []

    def case(name, tensors, words, raw=None):
        path = tmp / f"{name}.safetensors"
        if raw is not None:
            path.write_bytes(raw)
        else:
            save_file(tensors, str(path))
        cases.append((name, path, words))
    case("pickle", None, "pickled PyTorch checkpoint", raw=b"\x80\x04\x95" + bytes(64))
    case("text", None, "is not a safetensors file (no safetensors header); --text-encoder takes", raw=b"hello " * 20)
    case("transformer", {"model.diffusion_model.transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4),
                         "model.diffusion_model.img_in.weight": torch.zeros(4, 4)},
         "holds no text-encoder weights: it looks like a transformer (MMDiT) file")
    case("vae", {"encoder.conv1.weight": torch.zeros(4, 3, 3, 3), "decoder.conv1.weight": torch.zeros(4, 4, 3, 3)},
         "holds no text-encoder weights: it looks like a VAE")
    key = "model.layers.2.mlp.down_proj.weight"
    case("missing", {k: v for k, v in state.items() if k != key}, f"1 text-encoder tensor(s) missing, e.g. {key}")
    case("extra", {**state, "model.layers.3.mlp.down_proj.weight": state[key].clone()},
         "1 tensor(s) that text_encoder/config.json has no place for, e.g. model.layers.3.mlp.down_proj.weight")
    k = "model.layers.0.self_attn.k_proj.weight"
    case("shape", {**state, k: torch.zeros(8, state[k].shape[1], dtype=torch.bfloat16)},
         f"e.g. {k} is (8, {state[k].shape[1]}), expected {tuple(state[k].shape)}")
    s = "model.layers.1.mlp.up_proj.scale_weight"
    case("no_scale", {k: v for k, v in fp8_state.items() if k != s},
         "1 float8_e4m3fn Linear weight(s) have no scale beside them (scale_weight / weight_scale), "
         "e.g. model.layers.1.mlp.up_proj.weight")
    case("scale_shape", {**fp8_state, s: torch.ones(2, 2)},
         f"{s} is float32 [2, 2]: a weight scale is one float or one per output channel")
    w = "model.layers.0.mlp.gate_proj.weight"
    case("e5m2", {**fp8_state, w: fp8_state[w].float().to(torch.float8_e5m2)}, f"e.g. {w} is float8_e5m2")
    case("lora", {"lora_unet_layers_0.lora_down.weight": torch.zeros(2, 4)}, "is a LoRA")
    return cases


def test_bad_files_refused_in_one_line(files, tmp_path, capsys):
    """Each bad --text-encoder file: one line naming what is wrong, exit 2, no output written, no model loaded."""
    bare, bf16, _, fp8_state = files
    random_image(64, 48).save(tmp_path / "in.png")
    for name, path, words in bad_files(bf16, fp8_state, tmp_path):
        out = tmp_path / f"{name}.out.safetensors"
        rc = cli.main(["encode", "--model", str(bare), "--image", str(tmp_path / "in.png"), "--prompt", "x",
                       "--device", "cpu", "--text-encoder", str(path), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and words in err and str(path) in err, (name, err)
        assert not out.exists()
    rc = cli.main(["edit", "--model", str(bare), "--image", str(tmp_path / "in.png"), "--prompt", "x", "--device",
                   "cpu", "--text-encoder", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "text-encoder tensor(s) missing" in err
    assert not (tmp_path / "o.png").exists()


def lm_fp8_saving(cfg, dtype_bytes):
    """Bytes the 7 fp8 Linears of one language-model layer save: each weight at 1 byte instead of dtype_bytes, plus
    a float32 scale per output channel."""
    D, I, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    shapes = [(D, D), (kv, D), (kv, D), (D, D), (I, D), (I, D), (D, I)]          # q k v o gate up down [out, in]
    return sum(o * i * (dtype_bytes - 1) - 4 * o for o, i in shapes)


def test_planner_counts_fp8_text_layers(text_snapshot, files):
    """The text stage's planned peak drops by exactly the fp8 saving of the language-model layers on the GPU (all
    resident: every layer; streamed: the 2 slots), the other stages do not move; serve's plan likewise; the full
    size Qwen2.5-VL-7B saves 233 MB per layer in bf16. fp8_text reads --text-weights or the file's header."""
    from engine.config import MMDiTConfig, VAEConfig
    from engine.models.text_encoder import TextConfig, read_config
    from engine.models.vision import VisionConfig
    from engine.pipelines.budget import fp8_text, make_plan
    from engine.server.plan import serve_plan
    from engine.vram.memory import model_sizes_from_configs
    GiB = 2 ** 30
    cfg, _ = read_config(Snapshot(text_snapshot).config("text_encoder"))
    saving = lm_fp8_saving(cfg, 2)
    for mode, on_gpu in (("auto", cfg.num_hidden_layers), ("stream", 2)):
        wide, narrow = (make_plan(text_snapshot, [(64, 48)], None, None, 2, True, 8 * GiB, mode, "bfloat16",
                                  area=SMALL_AREA, text_fp8=f) for f in (False, True))
        assert wide.te_resident == narrow.te_resident
        assert wide.peaks["text"] - narrow.peaks["text"] == on_gpu * saving, mode
        assert {k: v for k, v in wide.peaks.items() if k != "text"} == \
            {k: v for k, v in narrow.peaks.items() if k != "text"}
        assert wide.host_pinned["text"] - narrow.host_pinned["text"] == \
            (cfg.num_hidden_layers - wide.te_resident) * saving
    wide, narrow = (serve_plan(text_snapshot, 8 * GiB, "float32", 4096 * 4096, text_fp8=f)[0] for f in (False, True))
    assert wide.peaks["text"] - narrow.peaks["text"] == 2 * lm_fp8_saving(cfg, 4)      # streamed: 2 slots
    full = [model_sizes_from_configs(MMDiTConfig(), (TextConfig(), VisionConfig()), VAEConfig(), 2, text_fp8=f)
            for f in (False, True)]
    assert full[0].te_layer_bytes - full[1].te_layer_bytes == lm_fp8_saving(TextConfig(), 2) == 232_847_360

    bare, bf16, fp8, _ = files
    opts = lambda **kw: SimpleNamespace(**{"text_weights": None, "text_encoder": None, **kw})
    assert not fp8_text(opts()) and fp8_text(opts(text_weights="fp8")) and not fp8_text(opts(text_weights="bf16"))
    assert fp8_text(opts(text_encoder=fp8)) and not fp8_text(opts(text_encoder=bf16))
    assert not fp8_text(opts(text_encoder=fp8, text_weights="bf16"))
    # host RAM on the CPU: quantizing on load holds the full-width model first, an fp8 file never does
    assert not fp8_text(opts(text_weights="fp8", text_encoder=bf16), on_host=True)
    assert fp8_text(opts(text_weights="fp8", text_encoder=fp8), on_host=True)


def test_serve_with_the_fp8_file_matches_cli(files, tmp_path):
    """`serve --text-encoder`: the file's text encoder loaded once; the same PNG as `cli.py edit --text-encoder`."""
    from starlette.testclient import TestClient

    from engine.server.app import create_app
    from tests.test_server import LOCAL, form, png, run_cli, start
    import engine.pipelines.spec as sp
    bare, _, fp8, _ = files
    orig = sp.condition_size
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sp, "condition_size", lambda w, h, area=1024 * 1024: orig(w, h, SMALL_AREA if area == 1024 * 1024
                                                                               else area))
        (tmp_path / "in.png").write_bytes(png())
        rc, err = run_cli(["edit", "--model", str(bare), "--image", str(tmp_path / "in.png"), "--prompt",
                           "make it snowy", "--steps", "2", "--seed", "5", "--device", "cpu", "--text-encoder",
                           str(fp8), "--out", str(tmp_path / "cli.png")])
        assert rc == 0, err
        worker, limits = start(bare, "--text-encoder", str(fp8))
        try:
            with TestClient(create_app(worker, limits), base_url=LOCAL) as client:
                got = client.post("/v1/edit", **form())
                assert got.status_code == 200 and got.content == (tmp_path / "cli.png").read_bytes()
                assert client.get("/health").json()["text_encoder"] == fp8.name
        finally:
            worker.close()


def test_layers_caption_and_split_read_the_file(tmp_path_factory, tmp_path):
    """`layers --text-encoder` on a Qwen-Image-Layered snapshot whose text_encoder/ has no weights: the caption
    (decoded with the file's lm_head) and the split equal the snapshot's own text encoder's in bf16, and the PNG
    text names the file."""
    from engine.pipelines.layered import LayeredOptions, caption_image
    from tests.test_layered import PROMPT, rgba_image, write_layered_snapshot
    snap = write_layered_snapshot(tmp_path_factory.mktemp("layered_te"))
    file = tmp_path / BF16
    save_file(comfy_state(snap), str(file))
    bare = config_only(snap, tmp_path / "config_only", "config.json")
    image = rgba_image(64, 48, seed=8)
    opts = LayeredOptions(area=SMALL_AREA)
    want = caption_image(snap, image, False, opts, dtype="bfloat16", max_new_tokens=6)
    assert caption_image(bare, image, False, opts, dtype="bfloat16", max_new_tokens=6, text_encoder_file=file) == want
    image.save(tmp_path / "in.png")
    run = lambda model, out, *extra: cli.main(["layers", "--model", str(model), "--image", str(tmp_path / "in.png"),
                                               "--prompt", PROMPT, "--layers", "2", "--steps", "2", "--device", "cpu",
                                               "--dtype", "bfloat16", "--out-dir", str(tmp_path / out), *extra])
    assert run(snap, "snap") == 0 and run(bare, "file", "--text-encoder", str(file)) == 0
    a, b = (Image.open(tmp_path / out / "layer_1.png") for out in ("snap", "file"))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert json.loads(b.text["qwen_image_edit"])["text_encoder"] == BF16
    assert "text_encoder" not in json.loads(a.text["qwen_image_edit"])


def test_inspect_names_the_files(files, capsys):
    _, bf16, fp8, _ = files
    assert cli.main(["inspect", str(bf16)]) == 0
    out = capsys.readouterr().out
    n = len(load_file(str(bf16)))
    assert f"text-encoder file (--text-encoder), {n} tensors ({n} bf16)" in out, out
    assert cli.main(["inspect", str(fp8)]) == 0
    assert "fp8 (scaled), language-model Linears all fp8" in capsys.readouterr().out
