"""`cli.py` on Edit-2509/2511 snapshots end to end: two --image files, a Kohya LoRA, the Lightning sampler,
a single-file transformer with the 2511 marker, batch jobs with images/lora, and the one-line refusals.
Pixels are compared with diffusers' QwenImageEditPlusPipeline (LoRA via load_lora_weights + fuse_lora).
CPU, float32; the VAE/output area is shrunk on both sides (the VL model keeps its 384²), as in
test_pipeline_plus."""
import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import cli
import engine.pipelines.spec as spec_mod
import engine.text.processor as processor_mod
from engine.scheduler import LIGHTNING
from loaders.single_file import MARKER_2511
from tests.test_lora import layout, linear_shapes, random_lora
from tests.test_pipeline import SMALL_AREA
from tests.test_pipeline_plus import IMAGES, PROMPT, RESIZE, reference_pipeline, snapshots  # noqa: F401 (fixture)
from tests.test_single_file import COMFY

FULL = 1024 * 1024
# tiny tensors: one thread is as fast, and steady while a neighbour holds one of the 2 cores (conftest)
pytestmark = pytest.mark.usefixtures("one_thread")
SEED, STEPS, CFG, SCALE = 11, 2, 4.0, 0.8
TOL, MOVES = 2, 10          # parity: max 2/255; sensitivity: what is under test moves the image by >= 10/255


class Env:
    """The module's files (two input images, a Kohya LoRA, single-file transformers) and a memo of CLI
    edits, so tests that compare against the same edit run it once."""

    def __init__(self, root, snaps):
        from diffusers import QwenImageTransformer2DModel
        self.root, self.snaps, self.runs = root, snaps, {}
        self.images = []
        for name, im in zip("ab", IMAGES[:2]):
            im.save(root / f"{name}.png")
            self.images.append(root / f"{name}.png")
        self.state = QwenImageTransformer2DModel.from_pretrained(snaps[True] / "transformer").state_dict()
        # Kohya LoRA (lora_unet_<module with _>.lora_down/lora_up/.alpha, alpha != rank) on every attention,
        # MLP and modulation Linear of the blocks; std 0.2 against base weights of std 0.2 moves the image
        shapes = {n: s for n, s in linear_shapes(QwenImageTransformer2DModel.from_pretrained(
            snaps[True] / "transformer")).items() if n.startswith("transformer_blocks.")}
        kinds = {k for n in shapes for k in (".attn.", "_mlp.", "_mod.") if k in n}
        assert kinds == {".attn.", "_mlp.", "_mod."}, kinds
        lora = random_lora(shapes, seed=7)
        assert all(a != down.shape[0] for down, _, a in lora.values())
        self.lora = root / "kohya_lora.safetensors"
        tensors = layout("kohya", lora)
        assert all(k.startswith("lora_unet_transformer_blocks_") for k in tensors)
        save_file(tensors, str(self.lora))

    def image_args(self, paths=None):
        return [a for p in (paths or self.images) for a in ("--image", str(p))]

    def reference_images(self):
        return [Image.open(p).convert("RGB") for p in self.images]

    def edit(self, *extra, zero_cond_t=True):
        """`cli.py edit` on the two images (memoized): (pixels [H, W, 3] int, PNG path, stderr)."""
        key = (zero_cond_t, extra)
        if key not in self.runs:
            out = self.root / f"edit{len(self.runs)}.png"
            argv = ["edit", "--model", str(self.snaps[zero_cond_t]), *self.image_args(), "--prompt", PROMPT,
                    "--steps", str(STEPS), "--seed", str(SEED), "--device", "cpu", "--out", str(out), *extra]
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = cli.main(argv)
            assert rc == 0, err.getvalue()
            self.runs[key] = (pixels(out), out, err.getvalue())
        return self.runs[key]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a - b).max())


@pytest.fixture(scope="module")
def env(snapshots, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        # the CLI's 1 MP VAE/output area is slow on a CPU: shrunk as the reference's is (the VL 384² stays)
        orig = spec_mod.condition_size
        mp.setattr(spec_mod, "condition_size",
                   lambda w, h, area=FULL: orig(w, h, SMALL_AREA if area == FULL else area))
        # The CLI's VL processor always resizes with PIL (README: "the CLI uses pil"), while the reference's
        # transformers processor uses torchvision where it is installed; the CLI has no flag for it, so for
        # these tests its processor is pointed at the reference's resize (RESIZE) instead of loosening TOL.
        load = processor_mod.load_processor
        mp.setattr(processor_mod, "load_processor", lambda snapshot, resize="pil": load(snapshot, resize=RESIZE))
        yield Env(tmp_path_factory.mktemp("cli_plus"), snapshots)


def reference(env, monkeypatch, lora=False, scheduler=None, cfg=CFG):
    """diffusers' QwenImageEditPlusPipeline on the 2511 snapshot, the same prompt, images, seed, steps, CFG."""
    pipe = reference_pipeline(env.snaps[True], monkeypatch)
    if lora:
        pipe.load_lora_weights(str(env.lora))
        pipe.fuse_lora(lora_scale=SCALE)
    if scheduler is not None:
        pipe.scheduler = scheduler
    with torch.no_grad():
        out = pipe(image=env.reference_images(), prompt=PROMPT, negative_prompt=" " if cfg > 1 else None,
                   true_cfg_scale=cfg, num_inference_steps=STEPS,
                   generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return np.asarray(out).astype(int)


def test_edit_two_images_kohya_lora_matches_diffusers(env, monkeypatch, capsys):
    """THE acceptance test: 2511 (zero_cond_t) + Kohya LoRA x0.8 + two --image files through `cli.py edit`
    gives diffusers' image with the LoRA loaded and fused; without --lora it is visibly another image."""
    want = reference(env, monkeypatch, lora=True)
    got, png, err = env.edit("--cfg", str(CFG), "--lora", f"{env.lora}:{SCALE}")
    plain, _, _ = env.edit("--cfg", str(CFG))
    diff, moved = max_diff(got, want), max_diff(plain, want)
    with capsys.disabled():
        print(f"\nCLI + Kohya LoRA vs diffusers: max pixel difference {diff}/255; without --lora: {moved}/255")
    assert diff <= TOL, diff
    assert moved >= MOVES, f"the LoRA moves the image by {moved}/255 only"
    assert got.std() > 1, "degenerate output"
    # the output takes the last image's (shrunk) size
    assert got.shape[:2] == spec_mod.condition_size(*IMAGES[1].size)[::-1]

    meta = json.loads(Image.open(png).text["qwen_image_edit"])
    assert meta["loras"] == [{"file": env.lora.name, "scale": SCALE}]
    assert meta["images"] == ["a.png", "b.png"]
    assert (meta["sampler"], meta["steps"], meta["seed"], meta["cfg"]) == ("default", STEPS, SEED, CFG)
    assert meta["prompt"] == PROMPT and meta["negative_prompt"] == " "
    assert meta["pipeline"] == "QwenImageEditPlusPipeline" and "transformer" not in meta

    capsys.readouterr()
    assert cli.main(["inspect", str(png)]) == 0
    shown = capsys.readouterr().out
    line = next(l for l in shown.splitlines() if l.startswith("qwen_image_edit: "))
    assert json.loads(line[len("qwen_image_edit: "):]) == meta
    for text in (f"Lora: {env.lora.name}:{SCALE:g}", "Steps: 2", "Sampler: default", f"Seed: {SEED}",
                 '"images": ["a.png", "b.png"]'):
        assert text in shown, (text, shown)


def test_lightning_sampler_matches_diffusers(env, monkeypatch):
    """--sampler lightning --cfg 1 is diffusers' pipeline with the Lightning scheduler config, CFG off; the
    default sampler gives another image."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    config = dataclasses.asdict(LIGHTNING)
    want = reference(env, monkeypatch, scheduler=FlowMatchEulerDiscreteScheduler(**config), cfg=1.0)
    got, png, _ = env.edit("--sampler", "lightning", "--cfg", "1")
    default, _, _ = env.edit("--sampler", "default", "--cfg", "1")
    diff, moved = max_diff(got, want), max_diff(default, got)
    print(f"lightning vs diffusers: max pixel difference {diff}/255; default sampler moves it by {moved}/255")
    assert diff <= TOL, diff
    assert moved >= MOVES, moved
    meta = json.loads(Image.open(png).text["qwen_image_edit"])
    assert meta["sampler"] == "lightning" and meta["cfg"] == 1.0 and "negative_prompt" not in meta


def test_single_file_transformer_with_2511_marker(env):
    """--transformer FILE (ComfyUI layout + __index_timestep_zero__) on the 2509 snapshot (config says
    zero_cond_t false) gives the 2511 snapshot's pixels; the 2509 snapshot alone gives others."""
    file = env.root / "qwen_image_edit_2511_comfy.safetensors"
    save_file({**{COMFY + k: v.contiguous() for k, v in env.state.items()},
               COMFY + MARKER_2511: torch.tensor([])}, str(file))
    assert json.loads((env.snaps[False] / "transformer" / "config.json").read_text())["zero_cond_t"] is False
    got, png, err = env.edit("--cfg", str(CFG), "--transformer", str(file), zero_cond_t=False)
    want, _, _ = env.edit("--cfg", str(CFG))
    off, _, _ = env.edit("--cfg", str(CFG), zero_cond_t=False)
    moved = max_diff(off, want)
    print(f"--transformer file on 2509 vs the 2511 snapshot: max pixel difference {max_diff(got, want)}/255; "
          f"2509 without the file: {moved}/255")
    assert np.array_equal(got, want)
    assert moved >= MOVES, moved
    assert "Edit-2511 marker: zero_cond_t on (transformer/config.json said false)" in err, err
    assert json.loads(Image.open(png).text["qwen_image_edit"])["transformer"] == file.name


def test_inspect_names_safetensors_files(env, capsys):
    """`inspect FILE.safetensors` says what a file is: a transformer file (prefix, 2511 marker) or a LoRA."""
    file = env.root / "inspect_2511.safetensors"
    save_file({**{COMFY + k: v.contiguous() for k, v in env.state.items()}, COMFY + MARKER_2511: torch.tensor([])},
              str(file))
    assert cli.main(["inspect", str(file)]) == 0
    out = capsys.readouterr().out
    assert "transformer file" in out and "model.diffusion_model." in out and "Edit-2511 marker" in out
    assert cli.main(["inspect", str(env.lora)]) == 0
    out = capsys.readouterr().out
    assert "LoRA on" in out and "rank" in out and "alpha" in out


def test_batch_images_and_lora_equal_single_edits(env, tmp_path):
    """batch lines with "images": [a, b] and "lora": "FILE:0.8" (and one without) = the single edits; the
    LoRA line runs first, so a LoRA leaking into the next model load would show."""
    a, b = (str(p) for p in env.images)
    jobs = [{"images": [a, b], "prompt": PROMPT, "lora": f"{env.lora}:{SCALE}", "out": str(tmp_path / "lora.png")},
            {"images": [a, b], "prompt": PROMPT, "out": str(tmp_path / "plain.png")}]
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    argv = ["batch", str(tmp_path / "jobs.jsonl"), "--model", str(env.snaps[True]), "--steps", str(STEPS),
            "--seed", str(SEED), "--cfg", str(CFG), "--device", "cpu"]
    assert cli.main(argv) == 0
    for name, extra in [("lora", ("--cfg", str(CFG), "--lora", f"{env.lora}:{SCALE}")), ("plain", ("--cfg", str(CFG)))]:
        single, png, _ = env.edit(*extra)
        assert np.array_equal(pixels(tmp_path / f"{name}.png"), single), name
        assert (tmp_path / f"{name}.png").read_bytes() == png.read_bytes(), name   # the PNG text too
    assert max_diff(pixels(tmp_path / "lora.png"), pixels(tmp_path / "plain.png")) >= MOVES


# ---- refusals: exit code 2, one line naming what is wrong, no output file ----

def refused(env, tmp_path, capsys, *extra, images=None, model=True):
    out = tmp_path / "out.png"
    capsys.readouterr()
    rc = cli.main(["edit", "--model", str(env.snaps[model]), *env.image_args(images), "--prompt", PROMPT,
                   "--steps", "1", "--device", "cpu", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert not out.exists()
    error = err[err.find("error: "):]
    assert err.count("error: ") == 1 and error.count("\n") == 1, err     # the error is one line
    assert err.count("\n") == 1, f"refused only after other work; stderr: {err!r}"    # and all there is
    return error


def test_four_images_refused(env, tmp_path, capsys):
    err = refused(env, tmp_path, capsys, images=[*env.images, *env.images])
    assert "QwenImageEditPlusPipeline takes 1 to 3 images" in err and "got 4" in err, err


def test_lora_with_unknown_modules_refused(env, tmp_path, capsys):
    tensors = {}
    for block in (0, 7):   # the tiny model has blocks 0 and 1
        stem = f"lora_unet_transformer_blocks_{block}_attn_to_q"
        tensors.update({f"{stem}.lora_down.weight": torch.randn(2, 64), f"{stem}.lora_up.weight": torch.randn(64, 2),
                        f"{stem}.alpha": torch.tensor(1.0)})
    save_file(tensors, str(tmp_path / "other.safetensors"))
    err = refused(env, tmp_path, capsys, "--lora", str(tmp_path / "other.safetensors"))
    assert "other.safetensors" in err and "1 layer(s) match no module of this model" in err, err
    assert "lora_unet_transformer_blocks_7_attn_to_q.lora_down.weight" in err, err


def test_flux_lora_refused(env, tmp_path, capsys):
    tensors = {}
    for stem in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"):
        tensors.update({f"{stem}.lora_down.weight": torch.randn(2, 64), f"{stem}.lora_up.weight": torch.randn(64, 2),
                        f"{stem}.alpha": torch.tensor(2.0)})
    save_file(tensors, str(tmp_path / "flux.safetensors"))
    err = refused(env, tmp_path, capsys, "--lora", f"{tmp_path / 'flux.safetensors'}:0.8")
    assert "flux.safetensors is for another model, not Qwen-Image" in err and "double_blocks" in err, err


def test_bad_lora_scale_refused(env, tmp_path, capsys):
    err = refused(env, tmp_path, capsys, "--lora", f"{env.lora}:abc")
    assert "'abc' is not a number" in err and "FILE:SCALE" in err, err


def test_e5m2_transformer_refused(env, tmp_path, capsys):
    """e4m3fn fp8 files load (tests/test_fp8.py); an e5m2 one is refused before the text encoder runs."""
    key = "transformer_blocks.0.attn.to_q.weight"
    state = {COMFY + k: (v.to(torch.float8_e5m2) if k == key else v).contiguous() for k, v in env.state.items()}
    save_file(state, str(tmp_path / "fp8.safetensors"))
    err = refused(env, tmp_path, capsys, "--transformer", str(tmp_path / "fp8.safetensors"))
    assert "fp8.safetensors" in err and key + " is float8_e5m2" in err, err
    assert "only float8_e4m3fn fp8 files are read" in err, err


def test_transformer_with_other_shapes_refused(env, tmp_path, capsys):
    state = {COMFY + k: v.contiguous() for k, v in env.state.items()}
    hidden, width = env.state["img_in.weight"].shape
    state[COMFY + "img_in.weight"] = torch.zeros(hidden, width // 2)
    save_file(state, str(tmp_path / "other.safetensors"))
    err = refused(env, tmp_path, capsys, "--transformer", str(tmp_path / "other.safetensors"), model=False)
    assert (f"1 wrong shape(s), e.g. img_in.weight is ({hidden}, {width // 2}), expected ({hidden}, {width})"
            in err and "config.json" in err and "other.safetensors" in err), err
