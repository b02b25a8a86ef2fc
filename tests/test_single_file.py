"""--transformer FILE: the MMDiT from one .safetensors (bare, ComfyUI-prefixed, all-in-one, fp16 on disk, the 2511
marker) equals the one loaded from the snapshot folder and diffusers' model; bad files fail with one line."""
import pickle

import pytest
import torch
from safetensors.torch import save_file

from engine.models.mmdit import load_mmdit
from loaders import LoadError, Snapshot
from loaders.single_file import MARKER_2511, read_transformer_file, summary

from .conftest import make_transformer, make_vae, write_snapshot
from .test_mmdit import run_pair

COMFY = "model.diffusion_model."
SHAPES, LENS, L = [(1, 3, 4), (1, 4, 3)], [6, 4], 6   # two images, B=2 with different prompt lengths


@pytest.fixture(scope="module")
def ref():
    return make_transformer(seed=21)


@pytest.fixture(scope="module")
def snaps(tmp_path_factory, ref):
    """(full snapshot, the same with transformer/ holding only config.json): a file load must read no shard."""
    full = write_snapshot(tmp_path_factory.mktemp("full"), transformer=ref)
    bare = write_snapshot(tmp_path_factory.mktemp("config_only"), transformer=ref)
    for f in (bare / "transformer").glob("*.safetensors*"):
        f.unlink()
    return Snapshot(full), Snapshot(bare)


def write_file(path, state, prefix="", dtype=None, extra=None, metadata=None):
    tensors = {prefix + k: (v.to(dtype) if dtype else v).contiguous() for k, v in state.items()}
    save_file({**tensors, **(extra or {})}, str(path), metadata=metadata)
    return path


def fail(file, snap):
    with pytest.raises(LoadError) as e:
        load_mmdit(snap, torch.float32, "cpu", file=file)
    msg = str(e.value)
    assert "\n" not in msg and str(file) in msg, msg
    return msg


def close(a, b):
    return (a - b).abs().max().item() <= 2e-5 * b.abs().max().item()


@pytest.mark.parametrize("prefix", ["", COMFY, "diffusion_model."])
def test_layouts_match_snapshot_and_diffusers(tmp_path, ref, snaps, one_thread, prefix):
    file = write_file(tmp_path / "t.safetensors", ref.state_dict(), prefix)
    ours = load_mmdit(snaps[1], torch.float32, "cpu", file=file)
    from_snap = load_mmdit(snaps[0], torch.float32, "cpu")
    got, want = run_pair(ref, ours, SHAPES, LENS, L, 2, seed=1)
    assert close(got, want)
    assert torch.equal(got, run_pair(ref, from_snap, SHAPES, LENS, L, 2, seed=1)[0])
    assert ours.source["prefix"] == prefix and ours.source["tensors"] == len(ref.state_dict())
    assert ours.source["ignored"] == 0 and ours.source["overrides"] == {} and from_snap.source is None


def test_fp16_file_cast_to_fp32(tmp_path, ref, snaps, one_thread):
    file = write_file(tmp_path / "t16.safetensors", ref.state_dict(), COMFY, dtype=torch.float16)
    ours = load_mmdit(snaps[1], torch.float32, "cpu", file=file)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    assert ours.source["dtypes"] == {"fp16": len(ref.state_dict())}
    rounded = make_transformer(seed=21)  # the reference with the same fp16-rounded weights
    rounded.load_state_dict({k: v.half().float() for k, v in ref.state_dict().items()})
    got, want = run_pair(rounded, ours, SHAPES, LENS, L, 2, seed=2)
    assert close(got, want)


def test_all_in_one_takes_the_transformer(tmp_path, ref, snaps, one_thread):
    vae = {"first_stage_model." + k: v for k, v in make_vae().state_dict().items()}
    te = {f"text_encoders.qwen25_7b.transformer.model.layers.{i}.mlp.up_proj.weight": torch.randn(4, 4)
          for i in range(3)}
    file = write_file(tmp_path / "aio.safetensors", ref.state_dict(), COMFY, extra={**vae, **te})
    ours = load_mmdit(snaps[1], torch.float32, "cpu", file=file)
    got, want = run_pair(ref, ours, SHAPES, LENS, L, 2, seed=3)
    assert close(got, want)
    src = ours.source
    assert src["ignored"] == len(vae) + 3
    assert src["ignored_prefixes"] == {"first_stage_model.": len(vae), "text_encoders.": 3}
    assert f"{len(vae) + 3} tensors of other components ignored" in summary(src)


@pytest.mark.parametrize("marker_prefix", [COMFY, ""])
def test_2511_marker_turns_zero_cond_t_on(tmp_path, snaps, one_thread, marker_prefix):
    """Config zero_cond_t false + marker behaves as diffusers' zero_cond_t=True; without the marker it would not."""
    ref0 = make_transformer(seed=21, zero_cond_t=True)  # the same weights as the snapshot's (zero_cond_t false)
    extra = {marker_prefix + MARKER_2511: torch.tensor([])}
    file = write_file(tmp_path / "2511.safetensors", ref0.state_dict(), COMFY, extra=extra)
    ours = load_mmdit(snaps[1], torch.float32, "cpu", file=file)
    assert ours.cfg.zero_cond_t and ours.source["overrides"] == {"zero_cond_t": True}
    assert ours.source["index_timestep_zero"] and ours.source["ignored"] == 0
    assert "zero_cond_t on (transformer/config.json said false)" in summary(ours.source)
    got, want = run_pair(ref0, ours, SHAPES, LENS, L, 2, seed=4)
    assert close(got, want)
    without = run_pair(ref0, load_mmdit(snaps[0], torch.float32, "cpu"), SHAPES, LENS, L, 2, seed=4)[0]
    assert (without - want).abs().max() > 0.05 * want.abs().max()  # zero_cond_t visibly moves the output


def test_without_marker_config_stands(tmp_path, one_thread):
    ref1 = make_transformer(seed=22, zero_cond_t=True)
    snap = Snapshot(write_snapshot(tmp_path / "snap", transformer=ref1))
    ours = load_mmdit(snap, torch.float32, "cpu", file=write_file(tmp_path / "t.safetensors", ref1.state_dict()))
    assert ours.cfg.zero_cond_t and ours.source["overrides"] == {} and not ours.source["index_timestep_zero"]
    got, want = run_pair(ref1, ours, SHAPES, LENS, L, 2, seed=5)
    assert close(got, want)


def test_read_casts_per_tensor_and_checks_shapes_first(tmp_path, ref):
    file = write_file(tmp_path / "t.safetensors", ref.state_dict(), dtype=torch.bfloat16)
    state, info = read_transformer_file(file, torch.float16)
    assert {t.dtype for t in state.values()} == {torch.float16} and info["dtypes"] == {"bf16": len(state)}
    with pytest.raises(LoadError, match="wrong shape"):
        read_transformer_file(file, torch.float16, expected={**{k: v.shape for k, v in state.items()},
                                                             "img_in.weight": (1, 2)})


# fp8 files load (tests/test_fp8.py); these quantized dtypes are the ones refused
FP8_REFUSED = {
    "float8_e5m2": lambda s: {**s, "img_in.weight": s["img_in.weight"].to(torch.float8_e5m2)},
    "float8_e4m3fnuz": lambda s: {**s, "proj_out.weight": s["proj_out.weight"].to(torch.float8_e4m3fnuz)},
}


@pytest.mark.parametrize("case", list(FP8_REFUSED))
def test_other_fp8_dtypes_refused(tmp_path, ref, snaps, case):
    msg = fail(write_file(tmp_path / "fp8.safetensors", FP8_REFUSED[case](ref.state_dict()), COMFY), snaps[1])
    assert case in msg and "only float8_e4m3fn fp8 files are read" in msg, msg


def test_other_hidden_size_refused(tmp_path, snaps):
    other = make_transformer(seed=23, num_attention_heads=3)  # hidden 96, not 64
    msg = fail(write_file(tmp_path / "wide.safetensors", other.state_dict(), COMFY), snaps[1])
    assert "wrong shape" in msg and "does the checkpoint match its config.json" in msg, msg


def test_missing_keys_refused(tmp_path, ref, snaps):
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("transformer_blocks.1.")}
    msg = fail(write_file(tmp_path / "short.safetensors", state), snaps[1])
    assert "missing key(s): transformer_blocks.1." in msg, msg


def test_lora_refused(tmp_path, snaps):
    lora = {f"diffusion_model.transformer_blocks.0.attn.{m}.lora_{ab}.weight": torch.randn(4, 64)
            for m in ("to_q", "to_k") for ab in "AB"}
    msg = fail(write_file(tmp_path / "lightning.safetensors", lora), snaps[1])
    assert "is a LoRA" in msg and "--lora" in msg, msg


def test_vae_refused(tmp_path, snaps):
    msg = fail(write_file(tmp_path / "vae.safetensors", make_vae().state_dict()), snaps[1])
    assert "holds no transformer weights: it looks like a VAE" in msg, msg


def test_truncated_refused(tmp_path, ref, snaps):
    file = write_file(tmp_path / "cut.safetensors", ref.state_dict())
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    assert "is truncated" in fail(file, snaps[1])


@pytest.mark.parametrize("kind", ["torch_save", "pickle", "text", "empty", "missing"])
def test_not_safetensors_refused(tmp_path, ref, snaps, kind):
    file = tmp_path / "model.ckpt"
    if kind == "torch_save":
        torch.save(ref.state_dict(), file)
    elif kind == "pickle":
        file.write_bytes(pickle.dumps({"a": 1}))
    elif kind == "text":
        file.write_text("<html>404 Not Found</html>")
    elif kind == "empty":
        file.write_bytes(b"")
    msg = fail(file, snaps[1])
    want = {"torch_save": "pickled PyTorch checkpoint", "pickle": "pickled PyTorch checkpoint",
            "text": "not a safetensors file", "empty": "is empty", "missing": "does not exist"}[kind]
    assert want in msg, msg


@pytest.mark.parametrize("how", ["header_bytes", "offsets"])
def test_corrupt_refused(tmp_path, ref, snaps, how):
    import json
    import struct
    data = bytearray(write_file(tmp_path / "t.safetensors", ref.state_dict()).read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    if how == "header_bytes":   # garbage inside the JSON header
        data[9:13] = b"\xff\x00\xff\x00"
    else:                       # valid JSON whose tensors overlap: safetensors' own check refuses it
        header = json.loads(data[8:8 + n])
        key = next(k for k in header if k != "__metadata__")
        header[key]["data_offsets"] = [0, header[key]["data_offsets"][1] + 4]
        raw = json.dumps(header).encode()  # offsets count from the data start: a new header length is fine
        data = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    (tmp_path / "t.safetensors").write_bytes(bytes(data))
    msg = fail(tmp_path / "t.safetensors", snaps[1])
    assert ("corrupt safetensors header" if how == "header_bytes" else "the file is corrupt") in msg, msg
