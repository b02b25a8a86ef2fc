"""Weight streaming on the CPU: the same hooks, slots and prefetch order as on the GPU, with plain copies.
A streamed model must give the unstreamed one's output bit for bit, forward after forward."""
import copy

import pytest
import torch

from engine.models.mmdit import drop_modulation_weights, modulation_table
from engine.vram.offload import modulation_table_streamed, move_except, stream_blocks
from engine.models.text_encoder import TextConfig, TextEncoder
from engine.models.vision import VisionConfig

from .conftest import TINY_MMDIT, randomize_
from .test_mmdit import make_transformer, ours_from

LAYERS = 5  # > 2 slots, so blocks really take turns


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and spares a shared machine's second core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mmdit():
    return ours_from(make_transformer(seed=21, num_layers=LAYERS, zero_cond_t=True))


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 3, 4), (1, 2, 3)]
    x, txt = torch.randn(2, 18, 64, generator=g), torch.randn(2, 7, TINY_MMDIT["joint_attention_dim"], generator=g)
    return x, txt, torch.tensor([7, 4]), shapes


def two_steps(model, table, ts):
    x, txt, txt_len, shapes = inputs()
    with torch.inference_mode():
        return [model(x, txt, txt_len, t.expand(2), shapes, mods=m) for t, m in zip(ts, table)]


def slot_range(handle):
    return [(s.flat.data_ptr(), s.flat.data_ptr() + s.flat.numel()) for s in handle.slots]


@pytest.mark.parametrize("resident", [0, 1, 3, LAYERS])
def test_streamed_mmdit_is_bit_exact(mmdit, resident):
    ts = torch.tensor([0.9, 0.4])
    ref = copy.deepcopy(mmdit)
    table = modulation_table(ref, ts)
    drop_modulation_weights(ref)
    want = two_steps(ref, table, ts)

    model = copy.deepcopy(ref)
    handle = stream_blocks(model.transformer_blocks, "cpu", resident)
    move_except(model, "cpu", model.transformer_blocks)
    n = LAYERS - resident
    assert len(handle.slots) == min(2, n) and handle.host_bytes == n * handle.slot_bytes
    slots_before = slot_range(handle)
    seen = []                                   # where a streamed block's weights are while it runs
    for blk in model.transformer_blocks[resident:]:
        blk.register_forward_pre_hook(lambda m, a: seen.append(m.attn.to_q.weight.data_ptr()))
    got = two_steps(model, table, ts)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert slot_range(handle) == slots_before  # slots allocated once, reused
    assert len(seen) == 2 * n and all(any(a <= p < b for a, b in slots_before) for p in seen)
    # one cold miss; the last block prefetched the first for the second forward
    assert handle.misses == (1 if n else 0)
    # n per forward, plus the wrap-around prefetch of the first block for a third forward
    assert handle.bytes_copied == (2 * n + 1 if n > 2 else n) * handle.slot_bytes
    assert handle.bytes_streamed_per_forward == (n * handle.slot_bytes if n > 2 else 0)
    host = [(h.data_ptr(), h.data_ptr() + h.numel()) for h in handle.host]
    for blk, (a, b) in zip(model.transformer_blocks[resident:], host):
        assert all(a <= p.data_ptr() < b for p in blk.parameters())   # between calls: host views

    handle.remove()
    for g, w in zip(two_steps(model, table, ts), want):
        assert torch.equal(g, w)


def test_rows_per_block_streams_each_block_once(mmdit):
    """CFG rows one at a time through each block: every streamed block is copied once per forward (not
    once per row), and the output is the batched forward's up to GEMM rounding of B=1 vs B=2."""
    ts = torch.tensor([0.9, 0.4])
    ref = copy.deepcopy(mmdit)
    table = modulation_table(ref, ts)
    drop_modulation_weights(ref)
    x, txt, txt_len, shapes = inputs()
    with torch.inference_mode():
        want = [ref(x, txt, txt_len, t.expand(2), shapes, mods=m) for t, m in zip(ts, table)]
    model = copy.deepcopy(ref)
    handle = stream_blocks(model.transformer_blocks, "cpu", 0)
    move_except(model, "cpu", model.transformer_blocks)
    calls, copied = [], []
    for blk in model.transformer_blocks:
        blk.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    with torch.inference_mode():
        for t, m, w in zip(ts, table, want):
            before = handle.bytes_copied
            got = model(x, txt, txt_len, t.expand(2), shapes, mods=m, rows_per_block=1)
            copied.append(handle.bytes_copied - before)
            # the per-row kv_len and mods slices: a swapped or unsliced row would be off by far more
            assert (got - w).abs().max() <= 1e-5 * w.abs().max()
    assert calls[:2 * LAYERS] == [1] * (2 * LAYERS)          # two calls of one row per block
    # first forward: LAYERS copies + the wrap-around prefetch; second: LAYERS again (not 2 x LAYERS)
    assert copied == [(LAYERS + 1) * handle.slot_bytes, LAYERS * handle.slot_bytes]
    handle.remove()


def test_mods_skipped_and_table_streamed(mmdit):
    """Modulation weights stay put (never in a slot); the block-by-block table equals modulation_table."""
    ts = torch.tensor([0.9, 0.5, 0.2])
    model = copy.deepcopy(mmdit)
    want = modulation_table(model, ts)
    handle = stream_blocks(model.transformer_blocks, "cpu", 1)
    names = [n for n, _ in model.transformer_blocks[0].named_parameters()]
    mod_bytes = sum(p.numel() * 4 for n, p in model.transformer_blocks[0].named_parameters() if "_mod." in n)
    all_bytes = sum(p.numel() * 4 for p in model.transformer_blocks[0].parameters())
    assert any("_mod." in n for n in names) and handle.slot_bytes >= all_bytes - mod_bytes
    assert handle.slot_bytes < all_bytes - mod_bytes + 256 * len(names)  # only alignment padding on top
    got = modulation_table_streamed(model, ts, "cpu")
    for step_got, step_want in zip(got, want):
        for (gi, gt), (wi, wt) in zip(step_got, step_want):
            assert torch.equal(gi, wi) and torch.equal(gt, wt)
    handle.remove()
    drop_modulation_weights(model)
    with pytest.raises(RuntimeError, match="dropped"):
        modulation_table_streamed(model, ts, "cpu")


def test_setup_under_inference_mode(mmdit):
    """The pipeline runs under inference_mode; streaming set up there must still run outside it."""
    ts = torch.tensor([0.7])
    ref = copy.deepcopy(mmdit)
    table = modulation_table(ref, ts)
    drop_modulation_weights(ref)
    model = copy.deepcopy(ref)
    with torch.inference_mode():
        handle = stream_blocks(model.transformer_blocks, "cpu", 0)
    x, txt, txt_len, shapes = inputs()
    with torch.no_grad():
        got = model(x, txt, txt_len, ts.expand(2), shapes, mods=table[0])
    assert torch.equal(got, two_steps(ref, table, ts)[0])
    handle.remove()


def test_refuses_mismatched_blocks(mmdit):
    model = copy.deepcopy(mmdit)
    model.transformer_blocks[3].attn.to_q = torch.nn.Linear(64, 64, bias=False)
    with pytest.raises(ValueError, match="streamed block 3 differs"):
        stream_blocks(model.transformer_blocks, "cpu", 0)


def tiny_text_encoder():
    cfg = TextConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                     num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3), image_token_id=99)
    vision = VisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          fullatt_block_indexes=(1, 3), window_size=56)
    return randomize_(TextEncoder(cfg, vision), seed=3).eval()


def text_inputs():
    g = torch.Generator().manual_seed(1)
    grid = torch.tensor([[1, 4, 8]])                       # 32 patches -> 8 merged image tokens
    ids = torch.randint(0, 99, (2, 20), generator=g)
    ids[:, 3:11] = 99
    return ids, torch.tensor([20, 15]), torch.randn(32, 3 * 2 * 14 * 14, generator=g), grid


@pytest.mark.parametrize("resident", [0, 1, LAYERS])
def test_streamed_text_encoder_is_bit_exact(resident):
    ref = tiny_text_encoder()
    want = ref.forward_packed(*text_inputs())
    model = copy.deepcopy(ref)
    lm = stream_blocks(model.layers, "cpu", resident, skip=())
    vision = stream_blocks(model.visual.blocks, "cpu", 0, skip=())
    move_except(model, "cpu", model.layers, model.visual.blocks)
    for _ in range(2):
        assert torch.equal(model.forward_packed(*text_inputs()), want)
    assert vision.misses == 1 and lm.misses == (1 if resident < LAYERS else 0)
    lm.remove()
    vision.remove()
    assert torch.equal(model.forward_packed(*text_inputs()), want)


class ClockedSync:
    """Stands in for the CUDA streams: a copy stream and a compute stream, each in order, joined only by
    events, tracked with vector clocks [copy ops, compute ops]. A slot read (a block running) must happen
    after the copy that filled the slot; a copy into a slot must happen after every earlier read of it.
    "Happens after" is judged from stream order and events alone, never from Python's program order."""

    def __init__(self, skip_waits=False):
        self.vec = {"copy": [0, 0], "compute": [0, 0]}
        self.last_write, self.reads, self.skip_waits = {}, {}, skip_waits

    def _join(self, stream, event):
        if event["vec"] is not None and not self.skip_waits:
            self.vec[stream] = [max(a, b) for a, b in zip(self.vec[stream], event["vec"])]

    def _tick(self, stream):
        self.vec[stream][0 if stream == "copy" else 1] += 1
        return tuple(self.vec[stream])

    def event(self):
        return {"vec": None}

    def copy(self, dst, src, after, done):
        self._join("copy", after)
        op = self._tick("copy")
        for r in self.reads.get(dst.data_ptr(), []):
            assert r[1] <= op[1], "a copy may overwrite a slot while a block still reads it"
        dst.copy_(src)
        self.last_write[dst.data_ptr()] = op
        done["vec"] = op

    def wait(self, event):
        self._join("compute", event)

    def record(self, event):
        event["vec"] = tuple(self.vec["compute"])

    def synchronize(self):
        pass

    def read(self, slot):
        op = self._tick("compute")
        assert self.last_write[slot][0] <= op[0], "a block may run before its slot is filled"
        self.reads.setdefault(slot, []).append(op)


def run_clocked(mmdit, sync, resident=0):
    from engine.vram.offload import StreamHandle
    ts = torch.tensor([0.9, 0.4, 0.1])
    model = copy.deepcopy(mmdit)
    table = modulation_table(model, ts)
    drop_modulation_weights(model)
    handle = StreamHandle(model.transformer_blocks, "cpu", resident, ("img_mod", "txt_mod"), False, sync=sync)

    def read(m, args):
        p = m.attn.to_q.weight.data_ptr()
        sync.read(next(s.flat.data_ptr() for s in handle.slots if 0 <= p - s.flat.data_ptr() < s.flat.numel()))
    for blk in model.transformer_blocks[resident:]:
        blk.register_forward_pre_hook(read)
    two_steps(model, table, ts)
    return sync


@pytest.mark.parametrize("resident", [0, 2])
def test_event_order_without_timing(mmdit, resident):
    sync = run_clocked(mmdit, ClockedSync(), resident)
    assert sum(len(r) for r in sync.reads.values()) == 3 * (LAYERS - resident)   # three forwards
    with pytest.raises(AssertionError, match="before its slot is filled|overwrite a slot"):
        run_clocked(mmdit, ClockedSync(skip_waits=True), resident)   # the checker catches missing waits


def test_edit_with_streamed_transformer(tiny_snapshot):
    """edit() on a streamed transformer gives the same image (its table reads the skipped, host-side mods)."""
    import numpy as np
    from PIL import Image

    from engine.config import RunOptions
    from engine.pipelines.common import edit, load_models
    from tests.test_pipeline import SMALL_AREA, prompts

    root, _, _ = tiny_snapshot
    image = Image.new("RGB", (70, 50), (200, 30, 90))
    pe, pm, ne, nm = prompts(2)
    opts = RunOptions(steps=3, cfg=3.0, seed=7, condition_area=SMALL_AREA)
    want = np.asarray(edit(load_models(root, "cpu", "float32"), image, pe, pm, ne, nm, opts))
    models = load_models(root, "cpu", "float32")
    mm = models.transformer
    handle = stream_blocks(mm.transformer_blocks, "cpu", 0)
    move_except(mm, "cpu", mm.transformer_blocks)
    got = np.asarray(edit(models, image, pe, pm, ne, nm, opts))
    assert np.array_equal(got, want) and handle.misses == 1
    handle.remove()


def test_resident_mode_leaves_modulation_on_host():
    """move_except_modulation: everything goes to the device but img_mod/txt_mod (the meta device stands in
    for the GPU); the bytes it reports are exactly the modulation weights'."""
    from engine.vram.offload import move_except_modulation
    from tests.conftest import make_transformer
    from tests.test_mmdit import ours_from
    model = ours_from(make_transformer(seed=1))
    mod_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "_mod." in n)
    assert move_except_modulation(model, "meta") == mod_bytes
    for name, p in model.named_parameters():
        assert p.device.type == ("cpu" if "_mod." in name else "meta"), name
