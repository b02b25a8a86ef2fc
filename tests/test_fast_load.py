"""loaders.fast_read against safe_open, bit for bit, and where the fast path puts each tensor.

The old path (safe_open + Tensor.to(dtype), QIE_READER=safe_open) is the reference for every tensor. The
structure tests place the MMDiT on the meta device standing in for the GPU: resident weights stay meta (they
were never on the host), streamed blocks' weights are views of the StreamHandle's flat buffers that the reader
filled, the modulation weights views of HostModulation's buffers.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from loaders import LoadError, Snapshot, load_state_dict, save_component
from loaders.fast_read import read_header, read_into, tensor_index

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits(t):
    """A tensor's raw bytes as a comparable uint8 tensor (NaN == NaN, -0 != +0)."""
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8)


def assert_same(a, b, where=""):
    assert a.keys() == b.keys(), where
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (where, k, a[k].dtype, b[k].dtype)
        assert torch.equal(bits(a[k]), bits(b[k])), (where, k)


def odd_state(dtype, seed=0):
    """Odd sizes (so pieces start at offsets no dtype aligns to), a scalar, an empty tensor, specials."""
    g = torch.Generator().manual_seed(seed)
    state = {f"w{i}": (torch.randn(n, generator=g) * 3).to(dtype) for i, n in enumerate((1, 3, 423, 73, 4097, 8))}
    state["m.weight"] = torch.randn(37, 29, generator=g).to(dtype)
    state["scalar"] = torch.tensor(2.5).to(dtype)
    state["empty"] = torch.zeros(0, 5).to(dtype)
    state["special"] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 1e-30, 7e4]).to(dtype)
    state["ids"] = torch.arange(11, dtype=torch.int64)      # not floating: never cast
    return state


def write(folder, state, shard_bytes=None):
    save_component(folder, state, {"_class_name": "Test"}, shard_bytes=shard_bytes)
    return folder


@pytest.mark.parametrize("file_dtype", DTYPES)
@pytest.mark.parametrize("target", [None] + DTYPES)
def test_same_bits_as_safe_open(tmp_path, file_dtype, target):
    folder = write(tmp_path / "c", odd_state(file_dtype), shard_bytes=4000)
    assert len(list(folder.glob("*.safetensors"))) > 2 and any(folder.glob("*.index.json"))  # sharded
    want = load_state_dict(folder, dtype=target, reader="safe_open")
    got = load_state_dict(folder, dtype=target, reader="fast")
    assert_same(got, want)
    assert got["ids"].dtype == torch.int64


@pytest.mark.parametrize("chunk,threads", [(256, 3), (512, 1), (4096, 8)])
def test_chunks_split_tensors_and_scatter_into_destinations(tmp_path, chunk, threads):
    """Small chunks: a tensor spans many reads and a read many tensors; destinations are views into one flat
    buffer (as a streamed block's are), filled in place."""
    state = odd_state(torch.bfloat16, seed=3)
    write(tmp_path / "c", state, shard_bytes=6000)
    index = tensor_index(tmp_path / "c")
    flat = torch.full((sum(t.numel() for t in state.values()) * 8,), 255, dtype=torch.uint8)
    dests, at = {}, 0
    for k, t in state.items():      # views at odd byte offsets of the buffer, plus a bf16 -> fp32 cast
        dt = torch.float32 if k == "m.weight" else t.dtype
        n = t.numel() * dt.itemsize
        at = -(-at // dt.itemsize) * dt.itemsize
        dests[k] = flat[at:at + n].view(dt).view(t.shape)
        at += n + 1
    stats = read_into(index, dests, threads=threads, chunk=chunk)
    assert stats["bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    want = {k: (v.float() if k == "m.weight" else v) for k, v in state.items()}
    assert_same(dests, want)


def test_after_runs_once_each_buffer_is_full(tmp_path):
    """read_into's `after` callbacks (page-locking a buffer once filled): each runs once, when every byte of
    its buffer has landed, also for a buffer no destination lies in."""
    state = {f"b{j}.{n}": torch.randn(s) for j in range(3) for n, s in (("w", (33, 7)), ("v", (5,)))}
    write(tmp_path / "c", state, shard_bytes=700)
    bufs = [torch.zeros(33 * 7 + 5) for _ in range(3)] + [torch.zeros(4)]
    dests = {}
    for j in range(3):
        dests[f"b{j}.w"], dests[f"b{j}.v"] = bufs[j][:231].view(33, 7), bufs[j][231:]
    calls = []

    def check(j):
        if j < 3:
            assert torch.equal(bufs[j][:231].view(33, 7), state[f"b{j}.w"])
            assert torch.equal(bufs[j][231:], state[f"b{j}.v"])
        calls.append(j)
    read_into(tensor_index(tmp_path / "c"), dests, threads=3, chunk=256, after=[(b, lambda j=j: check(j))
                                                                               for j, b in enumerate(bufs)])
    assert sorted(calls) == [0, 1, 2, 3]


def test_keep_fp32_and_mixed_dtypes_in_one_file(tmp_path):
    g = torch.Generator().manual_seed(5)
    state = {"a.norm": torch.randn(5, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g),
             "c": torch.randn(3, generator=g).half(), "d.norm.weight": torch.randn(9, generator=g)}
    write(tmp_path / "c", state)
    for kw in ({"dtype": torch.bfloat16, "keep_fp32": ("norm",)}, {"dtype": torch.float16}, {}):
        assert_same(load_state_dict(tmp_path / "c", reader="fast", **kw),
                    load_state_dict(tmp_path / "c", reader="safe_open", **kw), kw)


def test_header_matches_safe_open(tmp_path):
    from safetensors import safe_open
    state = odd_state(torch.float16)
    save_file(state, str(tmp_path / "f.safetensors"), metadata={"format": "pt"})
    infos = read_header(tmp_path / "f.safetensors")
    with safe_open(str(tmp_path / "f.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(infos)
        for k in f.keys():
            assert list(infos[k].shape) == list(f.get_slice(k).get_shape()), k
            assert infos[k].dtype == state[k].dtype


def test_unknown_dtype_falls_back_to_safe_open(tmp_path):
    state = {"a": torch.arange(6, dtype=torch.int32).to(torch.uint16), "b": torch.randn(4)}
    write(tmp_path / "c", state)
    assert tensor_index(tmp_path / "c") is None
    assert_same(load_state_dict(tmp_path / "c"), state)


def test_truncated_and_corrupt_files(tmp_path):
    folder = write(tmp_path / "c", odd_state(torch.float32), shard_bytes=4000)
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(LoadError, match=f"cannot read .*{shard.name}.*ends at byte.*truncated or corrupt"):
        load_state_dict(folder)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(LoadError, match="not JSON.*truncated or corrupt"):
        load_state_dict(folder)
    shard.write_bytes(json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode())
    with pytest.raises(LoadError, match="truncated or corrupt"):
        load_state_dict(folder)


def test_file_shrinking_under_the_reader(tmp_path):
    """A header that promises bytes the file no longer has (cut after the header was read): LoadError."""
    write(tmp_path / "c", {"a": torch.randn(1000)})
    index = tensor_index(tmp_path / "c")
    path = Path(index["a"].path)
    path.write_bytes(path.read_bytes()[:-400])
    with pytest.raises(LoadError, match="truncated or corrupt"):
        read_into(index, {"a": torch.empty(1000)})


# ---- the MMDiT: the fast path vs the old one, and where each tensor lands -------------------------------


def write_own_snapshot(root, seed=11):
    """A tiny snapshot from the engine's own modules (no diffusers: the GPU machine may lack it): the MMDiT in
    fp32 shards with an index, the VAE in the checkpoint layout (loaders.vae_layout.to_3d), the scheduler."""
    from engine.config import MMDiTConfig, VAEConfig
    from engine.models.mmdit import MMDiT
    from engine.models.vae import QwenImageVAE
    from loaders.vae_layout import to_3d
    from tests.conftest import SCHEDULER, TINY_MMDIT, TINY_VAE, randomize_
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    torch.manual_seed(seed)
    mm = randomize_(MMDiT(MMDiTConfig(**TINY_MMDIT)), seed)
    save_component(root / "transformer", mm.state_dict(), {"_class_name": "QwenImageTransformer2DModel", **TINY_MMDIT},
                   shard_bytes=300_000)
    vcfg = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_VAE.items()})
    vae = randomize_(QwenImageVAE(vcfg), seed + 1, scale=0.1)
    save_component(root / "vae", to_3d(vae.state_dict(), vcfg), {"_class_name": "AutoencoderKLQwenImage", **TINY_VAE})
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return root


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    return write_own_snapshot(tmp_path_factory.mktemp("fast"))


def old_mmdit(snap, dtype, monkeypatch):
    from engine.models.mmdit import load_mmdit
    with monkeypatch.context() as m:
        m.setenv("QIE_READER", "safe_open")
        return load_mmdit(Snapshot(snap), dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mmdit_same_bits(snap, dtype, monkeypatch):
    from engine.models.mmdit import load_mmdit
    assert_same(load_mmdit(Snapshot(snap), dtype, "cpu").state_dict(), old_mmdit(snap, dtype, monkeypatch).state_dict())


def _inside(t, buf):
    a, n = buf.data_ptr(), buf.numel() * buf.element_size()
    return a <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= a + n


@pytest.mark.parametrize("resident", [None, 0, 1])
def test_placed_before_read(snap, resident, monkeypatch):
    """Under a plan the streamed blocks' weights are views of the buffers the reader filled and the
    resident ones never touched the host (meta stands in for the GPU); img_mod/txt_mod live in
    HostModulation's buffers; every host tensor has the old path's bits."""
    from engine.models.mmdit import load_mmdit
    from engine.pipelines.load import place_transformer
    plan = None if resident is None else SimpleNamespace(mmdit_resident=resident)
    placed = []
    model = load_mmdit(Snapshot(snap), torch.bfloat16, "meta",
                       place=lambda m: placed.append(place_transformer(m, "meta", plan)))
    (stream, mods), want = placed[0], old_mmdit(snap, torch.bfloat16, monkeypatch).state_dict()
    blocks = model.transformer_blocks
    n_streamed = 0 if plan is None else len(blocks) - resident
    assert (stream is None) == (plan is None) and len(mods.host) == len(blocks)
    for name, t in model.state_dict().items():
        j = int(name.split(".")[1]) if name.startswith("transformer_blocks.") else None
        if "_mod." in name:
            assert _inside(t, mods.host[j]), name
        elif j is not None and j >= len(blocks) - n_streamed:
            assert _inside(t, stream.host[j - (len(blocks) - n_streamed)]), name
        else:
            assert t.is_meta, name
            continue
        assert t.device.type == "cpu" and torch.equal(bits(t), bits(want[name])), name
    if stream is not None:
        assert stream.host_bytes == sum(b.numel() for b in stream.host)
        stream.remove()


def test_load_models_same_bits_with_plan_and_lora(snap, tmp_path, monkeypatch):
    """load_models on the fast path (LoRA fused in place, where the weights live) against the old path (fused
    on the host before streaming), resident and streamed."""
    from engine.pipelines.load import load_models
    from engine.models.mmdit import load_mmdit
    from tests.test_lora import layout, linear_shapes, random_lora
    lora = tmp_path / "lora.safetensors"
    shapes = linear_shapes(load_mmdit(Snapshot(snap), torch.float32, "cpu"))
    save_file(layout("bare_alpha", random_lora(shapes, seed=4)), str(lora))
    for plan in (None, SimpleNamespace(mmdit_resident=1)):
        new = load_models(snap, "cpu", "bfloat16", plan=plan, loras=[(lora, 0.7)])
        with monkeypatch.context() as m:
            m.setenv("QIE_READER", "safe_open")
            old = load_models(snap, "cpu", "bfloat16", plan=plan, loras=[(lora, 0.7)])
        assert_same(new.transformer.state_dict(), old.transformer.state_dict(), plan)
        assert_same(new.vae.state_dict(), old.vae.state_dict(), plan)
        assert new.mod_host is not None and (new.stream is None) == (plan is None)
        for m in (new, old):
            if m.stream is not None:
                m.stream.remove()


@pytest.mark.parametrize("lm_head", [False, True])
def test_text_encoder_same_bits(lm_head, tmp_path_factory, monkeypatch):
    """Both checkpoint layouts (published keys with lm_head; transformers 5 keys, tied, no lm_head), the
    patch embedding read through a view in the file's 5-d shape, cast to bf16."""
    from engine.models.text_encoder import load_text_encoder
    from tests.test_text_encoder import snapshots
    published, v5, _ = snapshots.__wrapped__(tmp_path_factory)
    for snap in (published, v5):
        new = load_text_encoder(Snapshot(snap), torch.bfloat16, "cpu", lm_head=lm_head)
        with monkeypatch.context() as m:
            m.setenv("QIE_READER", "safe_open")
            old = load_text_encoder(Snapshot(snap), torch.bfloat16, "cpu", lm_head=lm_head)
        assert_same(new.state_dict(), old.state_dict(), snap.name)
        if lm_head:
            assert torch.equal(bits(new.lm_head.weight), bits(old.lm_head.weight))
            assert (new.lm_head.weight is new.embed_tokens.weight) == (snap == v5)   # tied in v5


@pytest.mark.parametrize("size,cfg,out", [((80, 60), 4.0, None), ((50, 90), 1.0, (48, 80))])
def test_edit_shapes_are_the_denoise_shapes(snap, monkeypatch, size, cfg, out):
    """edit_shapes (what warm_up runs at, known before loading) equals what the MMDiT sees in edit(); warm_up runs
    the whole MMDiT forward at those shapes (a scratch model, or one holding a real block) and leaves the model's
    weights as they were."""
    from PIL import Image

    from engine.config import RunOptions
    from engine.models.mmdit import MMDiT
    from engine.pipelines.common import edit
    from engine.pipelines.load import edit_shapes, load_models, warm_up
    from tests.test_pipeline import SMALL_AREA, prompts
    pe, pm, ne, nm = prompts(3)
    pm[0, 10:] = 0                                           # a padded prompt: its valid length counts
    tensors = {"prompt_embeds": pe, "prompt_embeds_mask": pm, "negative_prompt_embeds": ne,
               "negative_prompt_embeds_mask": nm}
    image = Image.new("RGB", size, (20, 130, 90))
    w, h = out or (None, None)
    shapes, lens = edit_shapes(snap, [image], tensors, w, h, cfg, area=SMALL_AREA)
    seen, forward = [], MMDiT.forward

    def spy(self, x, txt, txt_len, t, img_shapes, **kw):
        seen.append((list(img_shapes), txt_len.tolist()))
        return forward(self, x, txt, txt_len, t, img_shapes, **kw)
    monkeypatch.setattr(MMDiT, "forward", spy)
    models = load_models(snap, "cpu", "float32")
    before = {k: v.clone() for k, v in models.transformer.state_dict().items()}
    warm_up(models.transformer, shapes, lens, "cpu", torch.float32)
    warm_up(models.transformer, shapes, lens, "cpu", torch.float32, block=models.transformer.transformer_blocks[0])
    assert_same(models.transformer.state_dict(), before)
    edit(models, image, pe, pm, ne, nm, RunOptions(steps=1, cfg=cfg, width=w, height=h, condition_area=SMALL_AREA))
    assert seen == [(shapes, lens)] * 3          # the two warm-ups, then the edit's one step


RSS_PROBE = r"""
import json, sys, torch
from types import SimpleNamespace
from loaders import Snapshot
from engine.models.mmdit import load_mmdit
from engine.pipelines.load import place_transformer
snap, resident = sys.argv[1], int(sys.argv[2])
def hwm():   # peak resident bytes since the last reset (VmHWM)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
torch.empty(1)
with open("/proc/self/clear_refs", "w") as f:   # "5": reset the peak to the current resident size
    f.write("5")
before = hwm()
placed = []
m = load_mmdit(Snapshot(snap), torch.bfloat16, "meta",
               place=lambda m: placed.append(place_transformer(m, "meta", SimpleNamespace(mmdit_resident=resident))))
after = hwm()
host = sum(t.numel() * t.element_size() for t in m.state_dict().values() if not t.is_meta)
total = sum(t.numel() * t.element_size() for t in m.state_dict().values())
print(json.dumps({"grew": after - before, "host": host, "total": total}))
"""


def test_host_ram_is_what_stays_on_the_host(tmp_path):
    """A fresh process loads an MMDiT of 4 x 19 MB blocks (bf16) on a stand-in device: its peak resident
    memory grows by the bytes that stay on the host (the streamed blocks and every block's modulation) and a
    few MiB, with 3 blocks resident or none (the latter shows that the measure sees what the reader wrote)."""
    from engine.models.mmdit import MMDiT
    from engine.config import MMDiTConfig
    cfg = dict(num_layers=4, attention_head_dim=64, num_attention_heads=8, joint_attention_dim=512,
               axes_dims_rope=(16, 24, 24))
    root = tmp_path / "s"
    (root / "transformer").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MMDiT(MMDiTConfig(**cfg)).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    save_component(root / "transformer", state, {"_class_name": "QwenImageTransformer2DModel", **cfg},
                   shard_bytes=20 << 20)
    del state
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    for resident in (3, 0):
        r = subprocess.run([sys.executable, "-c", RSS_PROBE, str(root), str(resident)], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        run = json.loads(r.stdout.strip().splitlines()[-1])
        if resident:
            assert run["host"] < 0.55 * run["total"], run                  # most of it is "on the device"
        assert 0.9 * run["host"] <= run["grew"] <= run["host"] + (16 << 20), (resident, run)


# ---- CUDA: the GPU destinations (staged through pinned buffers, cast on the GPU) ------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("file_dtype", DTYPES)
@pytest.mark.parametrize("target", [None] + DTYPES)
def test_cuda_same_bits_as_safe_open(tmp_path, file_dtype, target):
    """Every value's bits, but a NaN's payload where the GPU narrowed the dtype: CUDA's float -> bf16/fp16
    conversions write a canonical NaN (0x7fff) where the CPU's keep sign and payload (seen on the H200); a NaN
    stays a NaN at the same place."""
    folder = write(tmp_path / "c", odd_state(file_dtype), shard_bytes=4000)
    want = load_state_dict(folder, dtype=target, reader="safe_open")
    narrowed = target is not None and target.itemsize < file_dtype.itemsize or {target, file_dtype} == {
        torch.bfloat16, torch.float16}
    index = tensor_index(folder)
    for chunk, threads in ((256, 3), (32 << 20, 8)):
        got = {k: torch.full(v.shape, 7, dtype=v.dtype, device="cuda") for k, v in want.items()}
        read_into(index, got, threads=threads, chunk=chunk)
        assert all(t.is_cuda for t in got.values())
        expect = want
        if narrowed:   # the same NaN places, then every other value's bits (copies: `want` stays whole)
            nan = want["special"].isnan()
            assert nan.any() and torch.equal(got["special"].isnan().cpu(), nan), (chunk, threads)
            got["special"] = got["special"][~nan.cuda()]
            expect = {**want, "special": want["special"][~nan]}
        assert_same(got, expect, (chunk, threads))


@pytest.mark.gpu
@pytest.mark.parametrize("resident", [None, 1])
def test_cuda_load_models_places_and_pins(snap, resident, monkeypatch):
    """On CUDA: resident weights on the GPU, streamed blocks and the modulation weights in pinned host memory
    (the buffers the reader filled), all with the old path's bits; the modulation table matches."""
    from engine.models.mmdit import modulation_table
    from engine.pipelines.load import load_models
    from engine.vram.offload import modulation_table_streamed
    plan = None if resident is None else SimpleNamespace(mmdit_resident=resident)
    monkeypatch.delenv("QIE_READER", raising=False)     # the default reader: the fast one on CUDA too
    models = load_models(snap, "cuda", "bfloat16", plan=plan)
    want = old_mmdit(snap, torch.bfloat16, monkeypatch)
    blocks = len(models.transformer.transformer_blocks)
    for name, t in models.transformer.state_dict().items():
        j = int(name.split(".")[1]) if name.startswith("transformer_blocks.") else -1
        on_host = "_mod." in name or (plan is not None and j >= resident)
        assert t.device.type == ("cpu" if on_host else "cuda"), name
        if on_host:
            assert t.is_pinned(), name
        assert torch.equal(bits(t), bits(want.state_dict()[name])), name
    assert models.mod_host.pinned and len(models.mod_host.host) == blocks
    ts = torch.tensor([1.0, 0.5], dtype=torch.bfloat16)
    got = modulation_table_streamed(models.transformer, [t.reshape(1).cuda() for t in ts], "cuda")
    ref = modulation_table(want, ts)
    for step_got, step_ref in zip(got, ref):
        for (gi, gt), (ri, rt) in zip(step_got, step_ref):
            assert torch.allclose(gi.float().cpu(), ri.float(), atol=1e-2, rtol=1e-2)
            assert torch.allclose(gt.float().cpu(), rt.float(), atol=1e-2, rtol=1e-2)
    if models.stream is not None:
        models.stream.remove()


def test_warm_up_runs_on_the_calling_thread_while_loading(monkeypatch):
    """load_models' CUDA warm-up: the loader reads on a thread of its own and the calling thread (the one that
    denoises: cuDNN's attention graphs and cuBLAS's handles are per thread) runs warm_up from the moment the
    model is placed, during the read. The loader's exception is raised on the calling thread; a warm-up failure
    becomes one line and the model still loads."""
    import threading

    from engine.pipelines import load as load_mod
    caller, seen, started = threading.get_ident(), {}, threading.Event()

    def fake_warm_up(model, shapes, lens, device, dtype):
        seen.update(warm_thread=threading.get_ident(), model=model, shapes=(shapes, lens))
        started.set()
        if model == "broken":
            raise RuntimeError("CUDA out of memory\nmore")

    def load(on_placed, model="model"):
        seen["load_thread"] = threading.get_ident()
        on_placed(model)
        assert started.wait(10), "warm_up did not start while the weights were read"
        return model
    monkeypatch.setattr(load_mod, "warm_up", fake_warm_up)
    monkeypatch.setattr(load_mod.torch.cuda, "empty_cache", lambda: None)
    model, warming = load_mod._load_while_warming(load, ([(1, 4, 4)], [7]), "cuda", torch.bfloat16)
    assert model == "model" and warming["error"] is None and warming["seconds"] >= 0
    assert seen["warm_thread"] == caller != seen["load_thread"] and seen["shapes"] == ([(1, 4, 4)], [7])
    started.clear()
    model, warming = load_mod._load_while_warming(lambda f: load(f, "broken"), ([(1, 4, 4)], [7]), "cuda",
                                                  torch.bfloat16)
    assert model == "broken" and warming["error"] == "CUDA out of memory"

    def failing(on_placed):
        raise LoadError("shard 3 is truncated")
    with pytest.raises(LoadError, match="truncated"):
        load_mod._load_while_warming(failing, ([(1, 4, 4)], [7]), "cuda", torch.bfloat16)


@pytest.mark.gpu
def test_cuda_load_models_warms_up_while_reading(snap, monkeypatch):
    """On CUDA with warm=(shapes, lens): the warm-up runs (its time recorded, no skip note) on the calling thread
    while a loader thread reads, and the weights are the old path's bits all the same."""
    from engine.pipelines.load import load_models
    monkeypatch.delenv("QIE_READER", raising=False)
    models = load_models(snap, "cuda", "bfloat16", warm=([(1, 4, 4), (1, 4, 4)], [7, 5]))
    assert models.timings["warm_up"] > 0 and not any("warm-up" in n for n in models.source["notes"])
    want = old_mmdit(snap, torch.bfloat16, monkeypatch)
    for name, t in models.transformer.state_dict().items():
        assert torch.equal(bits(t), bits(want.state_dict()[name])), name
