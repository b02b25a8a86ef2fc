"""Bad input gets one clear line and a non-zero exit; good-but-odd images are read correctly."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from engine.models.mmdit import load_mmdit
from loaders import LoadError, Snapshot, load_state_dict, read_image, save_component

from .conftest import make_transformer, write_snapshot

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def snap(tmp_path):
    write_snapshot(tmp_path / "s", transformer=make_transformer(seed=2))
    return tmp_path / "s"


def shards(snap):
    return sorted((snap / "transformer").glob("*.safetensors"))


def test_not_a_snapshot(tmp_path):
    with pytest.raises(LoadError, match="no model_index.json"):
        Snapshot(tmp_path)
    with pytest.raises(LoadError, match="is not a folder"):
        Snapshot(tmp_path / "nope")


def test_missing_component(snap):
    shutil.rmtree(snap / "transformer")
    with pytest.raises(LoadError, match="lacks transformer/"):
        Snapshot(snap).weights("transformer")


def test_truncated_shard(snap):
    f = shards(snap)[1]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LoadError, match=f"cannot read .*{f.name}.*truncated or corrupt"):
        load_state_dict(snap / "transformer")


def test_corrupt_header(snap):
    f = shards(snap)[0]
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(LoadError, match="truncated or corrupt"):
        load_state_dict(snap / "transformer")


def test_missing_shard(snap):
    shards(snap)[2].unlink()
    with pytest.raises(LoadError, match="shard\\(s\\) named in .* are missing"):
        load_state_dict(snap / "transformer")


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(LoadError, match="no .safetensors file"):
        load_state_dict(tmp_path)


def _rewrite(snap, edit_fn):
    folder = snap / "transformer"
    state = load_state_dict(folder)
    cfg = json.loads((folder / "config.json").read_text())
    edit_fn(state)
    shutil.rmtree(folder)
    save_component(folder, state, cfg)


def test_missing_keys_are_named(snap):
    _rewrite(snap, lambda s: [s.pop(k) for k in [k for k in s if "transformer_blocks.1." in k]])
    with pytest.raises(LoadError, match=r"transformer: \d+ missing key\(s\): transformer_blocks\.1\..* and \d+ more"):
        load_mmdit(Snapshot(snap), torch.float32, "cpu")


def test_unexpected_and_wrong_shape(snap):
    def edit(s):
        s["extra.weight"] = torch.zeros(3)
        s["proj_out.bias"] = torch.zeros(7)
    _rewrite(snap, edit)
    with pytest.raises(LoadError, match=r"1 unexpected key\(s\): extra.weight.*proj_out.bias is \(7,\), expected \(64,\)"):
        load_mmdit(Snapshot(snap), torch.float32, "cpu")


def test_config_mismatch_reports_shapes(snap):
    cfg_file = snap / "transformer" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["num_layers"] = 3
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="missing key"):
        load_mmdit(Snapshot(snap), torch.float32, "cpu")


# ---- images -------------------------------------------------------------------------------------------

def test_cmyk_palette_16bit_alpha(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
    assert read_image(tmp_path / "c.jpg").mode == "RGB"
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").size == (30, 20)
    grey16 = (np.linspace(0, 65535, 20 * 30).reshape(20, 30)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    a = np.asarray(read_image(tmp_path / "g16.png"))
    assert a[0, 0, 0] == 0 and a[-1, -1, 0] == 255 and 100 < a[10, 15, 0] < 160  # scaled, not clipped
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.asarray(read_image(tmp_path / "a.png")).min() == 255


def test_exif_rotation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").size == (20, 40)


def test_corrupt_and_missing_image(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(LoadError, match="cannot read image"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(LoadError, match="does not exist"):
        read_image(tmp_path / "none.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "t.png")
    (tmp_path / "t2.png").write_bytes((tmp_path / "t.png").read_bytes()[:40])  # truncated
    with pytest.raises(LoadError, match="cannot read image"):
        read_image(tmp_path / "t2.png")


# ---- CLI ----------------------------------------------------------------------------------------------

def run_cli(*args, cwd=ROOT, env_cache=None):
    env = {"PATH": "/usr/bin:/bin", "QIE_CACHE": str(env_cache or "/nonexistent")}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_cli_errors_are_one_line(tmp_path, snap):
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    (tmp_path / "exists.png").write_bytes(b"keep me")
    r = run_cli("edit", "--model", str(snap), "--image", str(tmp_path / "in.png"), "--prompt-embeds", "x",
                "--out", str(tmp_path / "exists.png"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--force" in r.stderr
    assert (tmp_path / "exists.png").read_bytes() == b"keep me"
    r = run_cli("edit", "--model", str(snap), "--image", str(tmp_path / "in.png"), "--prompt-embeds",
                str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o.png"))
    assert r.returncode == 2 and "does not exist" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("edit", "--model", str(tmp_path), "--image", str(tmp_path / "in.png"), "--prompt", "x",
                "--out", str(tmp_path / "o.png"))
    assert r.returncode == 2 and "no model_index.json" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("inspect", str(tmp_path))
    assert r.returncode == 2 and "no model_index.json" in r.stderr
    r = run_cli("edit", "--model", str(snap), "--image", str(tmp_path / "in.png"), "--prompt", "x",
                "--device", "cpu", "--vram", "8GiB", "--out", str(tmp_path / "o.png"))
    assert r.returncode == 2 and "--device cuda" in r.stderr and r.stderr.count("\n") == 1


def test_cli_inspect(snap):
    r = run_cli("inspect", str(snap))
    assert r.returncode == 0, r.stderr
    assert "QwenImageTransformer2DModel" in r.stdout and "text_encoder  missing" in r.stdout


def test_cli_demo_runs(tmp_path):
    out = tmp_path / "demo.png"
    r = run_cli("demo", "--steps", "2", "--width", "64", "--height", "64", "--out", str(out),
                env_cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert "random weights" in r.stdout and "denoise" in r.stdout
    assert Image.open(out).size == (64, 64)


def test_cli_demo_runs_twice_with_its_default_output(tmp_path):
    """The README's first command, twice in a row: the demo replaces its own demo_out.png."""
    for _ in range(2):
        r = run_cli("demo", "--steps", "1", "--width", "32", "--height", "32", cwd=tmp_path,
                    env_cache=tmp_path / "cache")
        assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "demo_out.png").size == (32, 32)


def test_cli_refuses_a_size_that_cannot_fit(tmp_path, tiny_snapshot):
    """100000x100000 on the CPU was killed by the kernel (exit 137, no message): now one line before any
    work, with what it needs and the largest size that fits this machine."""
    root, _, _ = tiny_snapshot
    Image.new("RGB", (64, 48)).save(tmp_path / "in.png")
    torch.manual_seed(0)
    from loaders import write_tensors
    write_tensors({"prompt_embeds": torch.randn(1, 5, 48)}, tmp_path / "e.safetensors")
    r = run_cli("edit", "--model", str(root), "--image", str(tmp_path / "in.png"), "--prompt-embeds",
                str(tmp_path / "e.safetensors"), "--device", "cpu", "--width", "100000", "--height", "100000",
                "--out", str(tmp_path / "o.png"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "100000x100000 edit needs" in r.stderr and "of host RAM" in r.stderr
    assert "the largest output that fits is --width" in r.stderr
    assert not (tmp_path / "o.png").exists()
    w = int(r.stderr.split("--width ")[1].split()[0])
    assert 16 <= w < 100000


def test_cli_embeddings_of_wrong_width_or_mask(tmp_path, tiny_snapshot):
    from engine.pipelines.common import _prompt_rows
    from loaders import write_tensors
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    write_tensors({"prompt_embeds": torch.zeros(1, 5, 32)}, tmp_path / "e.safetensors")
    r = run_cli("edit", "--model", str(tiny_snapshot[0]), "--image", str(tmp_path / "in.png"), "--prompt-embeds",
                str(tmp_path / "e.safetensors"), "--device", "cpu", "--out", str(tmp_path / "o.png"))
    assert r.returncode == 2 and "32 wide" in r.stderr and r.stderr.count("\n") == 1
    with pytest.raises(LoadError, match="prompt_embeds_mask is \\(1, 9\\), expected \\(1, 5\\)"):
        _prompt_rows(torch.zeros(1, 5, 48), torch.ones(1, 9), "prompt_embeds")


def test_large_and_float_images(tmp_path, monkeypatch):
    import loaders.images as images
    monkeypatch.setattr(images, "MAX_PIXELS", 800)  # stands in for 100 MP: PIL's own bomb check must not win
    Image.new("RGB", (30, 30)).save(tmp_path / "big.png")  # 900 px: our check, PIL's bomb check not reached
    with pytest.raises(LoadError, match="30x30 .* downscale it first"):
        read_image(tmp_path / "big.png")
    Image.new("RGB", (60, 40)).save(tmp_path / "big.png")  # 2400 px: past PIL's 2x bomb limit, same message
    with pytest.raises(LoadError, match="downscale it first"):
        read_image(tmp_path / "big.png")
    monkeypatch.undo()
    Image.new("RGB", (40, 20)).save(tmp_path / "ok.png")
    assert read_image(tmp_path / "ok.png").size == (40, 20)
    half = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F")
    half.save(tmp_path / "f.tiff")
    assert abs(int(np.asarray(read_image(tmp_path / "f.tiff"))[0, 0, 0]) - 128) <= 1  # [0, 1] floats, not /255


def test_out_of_memory_advice_names_the_least_budget(tiny_snapshot, tmp_path):
    """Out of GPU memory: the one line names the --vram the planner would run this edit in."""
    from engine.pipelines.budget import edit_job
    from engine.vram.planner import gib_up, smallest_budget
    root = str(tiny_snapshot[0])
    args = cli.build_parser().parse_args(["edit", "--model", root, "--image", "in.png", "--prompt", "x",
                                          "--out", str(tmp_path / "o.png"), "--width", "64", "--height", "48"])
    assert "--vram SIZE" in cli._oom_advice(args)             # the job was never sized: generic advice
    dim = tiny_snapshot[1].config.joint_attention_dim
    tensors = {"prompt_embeds": torch.zeros(1, 9, dim), "negative_prompt_embeds": torch.zeros(1, 5, dim)}
    args.job = (root, Image.new("RGB", (80, 60)), 2, False, tensors)
    job, sizes = edit_job(root, (80, 60), 64, 48, 2, False, cli._dtype(args), steps=args.steps, text_len=9)
    least = gib_up(smallest_budget(job, sizes, "stream")).replace(" ", "")
    advice = cli._oom_advice(args)
    assert f"--vram {least}" in advice and "--offload auto" in advice and "\n" not in advice
    args.vram = "8GiB"                                           # a plan was in force and fell short
    assert "a lower --vram" in cli._oom_advice(args) and f"--vram {least} --offload stream" in cli._oom_advice(args)
    assert job.width == 64 and job.height == 48 and job.batch == 2 and job.text_len == 9
