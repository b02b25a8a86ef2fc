"""Several-device edits (engine.parallel) on the CPU with gloo, against the same edit in one process.

torchrun --nproc-per-node 2|4 runs tests/parallel_worker.py, which makes one split MMDiT forward (the model's
own output compared tensor by tensor) and `cli.py edit --parallel ...` (the PNG compared pixel by pixel), each
also with a deliberate fault (the gather in reverse rank order; for seq, attention kept to each rank's shard)
that must move the result: the parity checks could not pass with the rows, shards or exchange wrong.
The failure cases launch the ranks by hand with torchrun's variables, to see each rank's exit code and lines.
Snapshot: Edit-2511 (zero_cond_t: the split falls inside the second shard) with two images, CFG with prompts
of 13 and 6 tokens (the uncond row is padded: kv_len must mask it), float32.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import engine.pipelines.spec as spec_mod
from loaders import write_tensors
from tests.conftest import make_transformer, make_vae, write_snapshot
from tests.parallel_worker import forward_inputs

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "parallel_worker.py"
AREA = 96 * 96          # the CLI's 1 MP condition area, shrunk on both sides (as test_cli_plus does)
STEPS, CFG = 3, 4.0
TOL, MOVES = 2, 10      # parity: max 2/255; what is under test moves the image by >= 10/255
pytestmark = pytest.mark.usefixtures("one_thread")


class Env:
    def __init__(self, root):
        self.root = root
        self.snap = write_snapshot(root / "snap", make_transformer(seed=5, zero_cond_t=True),
                                   make_vae(seed=6, scale=0.2))
        index = root / "snap" / "model_index.json"
        index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "QwenImageEditPlusPipeline"}))
        rng = np.random.default_rng(0)
        self.images = []
        for name, (w, h) in zip("ab", [(120, 90), (70, 110)]):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png")
            self.images.append(root / f"{name}.png")
        g = torch.Generator().manual_seed(1)
        self.embeds = root / "prompt.safetensors"
        write_tensors({"prompt_embeds": torch.randn(1, 13, 48, generator=g),
                       "prompt_embeds_mask": torch.ones(1, 13, dtype=torch.long),
                       "negative_prompt_embeds": torch.randn(1, 6, 48, generator=g),
                       "negative_prompt_embeds_mask": torch.ones(1, 6, dtype=torch.long)}, self.embeds)
        self.runs = 0

    def argv(self, out, *extra, cfg=CFG):
        return ["edit", "--model", str(self.snap), *[a for p in self.images for a in ("--image", str(p))],
                "--prompt-embeds", str(self.embeds), "--steps", str(STEPS), "--cfg", str(cfg), "--seed", "7",
                "--device", "cpu", "--out", str(out), *extra]

    def out(self, name):
        self.runs += 1
        return self.root / f"{name}_{self.runs}.png"

    def spec(self, edits, forward=None):
        """The worker's job file: edits [(argv, fault)], forward mode or None."""
        self.runs += 1
        path = self.root / f"spec_{self.runs}.json"
        fwd = forward and {"mode": forward, "snapshot": str(self.snap), "out": str(self.root / f"fwd_{self.runs}")}
        if fwd:
            Path(fwd["out"]).mkdir()
        path.write_text(json.dumps({"area": AREA, "forward": fwd,
                                    "edits": [{"argv": a, "fault": f} for a, f in edits]}))
        return path, fwd and Path(fwd["out"])


def small_area(mp):
    """The CLI's 1 MP condition area shrunk to AREA in this process (the worker does the same in its own)."""
    orig = spec_mod.condition_size
    mp.setattr(spec_mod, "condition_size",
               lambda w, h, area=1024 * 1024: orig(w, h, AREA if area == 1024 ** 2 else area))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The files, and the one-process references: the MMDiT output on forward_inputs(), the CLI's PNG."""
    from engine.models.mmdit import load_mmdit
    from loaders import Snapshot
    e = Env(tmp_path_factory.mktemp("parallel"))
    mm = load_mmdit(Snapshot(e.snap), torch.float32, "cpu")
    x, txt, txt_len, t, shapes = forward_inputs(mm.cfg.joint_attention_dim)
    with torch.inference_mode():
        e.forward = mm(x, txt, txt_len, t, shapes)
    with pytest.MonkeyPatch.context() as mp:
        small_area(mp)
        e.single = e.out("single")
        assert cli.main(e.argv(e.single)) == 0
    return e


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "QIE_PARALLEL_TIMEOUT": "60", **extra}


def torchrun(n, spec):
    """torchrun --nproc-per-node n tests/parallel_worker.py spec -> CompletedProcess (ranks' output merged)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(WORKER), str(spec)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env=_env())


def by_hand(world, spec, tmp, started=None, cmd=None, **extra):
    """`started` of `world` ranks launched with torchrun's variables -> [(exit code, error lines)] by rank."""
    port, procs = free_port(), []
    for r in range(world if started is None else started):
        out, err = open(tmp / f"rank{r}.out", "w"), open(tmp / f"rank{r}.err", "w")
        rank_env = _env(WORLD_SIZE=str(world), RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port), **extra)
        procs.append(subprocess.Popen(cmd or [sys.executable, str(WORKER), str(spec)], stdout=out, stderr=err,
                                      cwd=ROOT, env=rank_env))
    results = []
    for r, p in enumerate(procs):
        rc = p.wait(timeout=120)
        text = (tmp / f"rank{r}.err").read_text().replace("\r", "\n")
        results.append((rc, [line for line in text.splitlines() if line.startswith("error:")], text))
    return results


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a - b).max())


def check_forward(env, folder, local=False):
    """The split forward equals one process's to float32 rounding; the reversed gather (and, for seq, local
    attention) moves it far away."""
    ref, scale = env.forward, env.forward.abs().max().item()
    got = torch.load(folder / "forward.pt")
    err = (got - ref).abs().max().item()
    moved = {"reversed": (torch.load(folder / "forward_reversed.pt") - ref).abs().max().item()}
    if local:
        moved["local"] = (torch.load(folder / "forward_local.pt") - ref).abs().max().item()
    print(f"\nMMDiT output vs one process: max |diff| {err:.2e} (output max {scale:.1f}); faults move it by {moved}")
    assert err <= 2e-6 * scale, err
    assert (ref[0] - ref[1]).abs().max() > 0.2 * scale       # cond and uncond rows are far apart
    for name, m in moved.items():
        assert m > 0.2 * scale, (name, m)


def check_edits(env, proc, good, bad):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 2, proc.stdout        # rank 0 alone prints (two edits)
    diff, moved = max_diff(pixels(good), pixels(env.single)), max_diff(pixels(bad), pixels(env.single))
    print(f"image vs one process: max pixel difference {diff}/255; reversed gather: {moved}/255")
    assert diff <= TOL, diff
    assert moved >= MOVES, moved
    assert pixels(good).std() > 1


@pytest.mark.parametrize("mode", ["cfg", "seq"])
def test_two_ranks_match_one_process(env, mode):
    """--parallel cfg / seq on 2 gloo ranks: the single-process MMDiT output and image."""
    good, bad = env.out(mode), env.out(mode + "_reversed")
    spec, folder = env.spec([(env.argv(good, "--parallel", mode), None),
                             (env.argv(bad, "--parallel", mode), "reverse-gather")], forward=mode)
    proc = torchrun(2, spec)
    check_edits(env, proc, good, bad)
    check_forward(env, folder, local=mode == "seq")


def test_cfg_seq_on_four_ranks(env):
    """cfg+seq: 2 rows x 2 shards on 4 ranks (sequence groups {0, 1} and {2, 3})."""
    good, bad = env.out("cfg_seq"), env.out("cfg_seq_reversed")
    spec, folder = env.spec([(env.argv(good, "--parallel", "cfg+seq"), None),
                             (env.argv(bad, "--parallel", "cfg+seq"), "reverse-gather")], forward="cfg+seq")
    check_edits(env, torchrun(4, spec), good, bad)
    check_forward(env, folder, local=True)


def check_refused(results, out, says):
    """Every rank exits non-zero; rank 0 prints one line that says `says`; the others print none; no file."""
    codes = [rc for rc, _, _ in results]
    assert all(rc != 0 for rc in codes), codes
    assert len(results[0][1]) == 1 and says in results[0][1][0], results[0][2][-2000:]
    for rc, lines, text in results[1:]:
        assert lines == [], text[-2000:]
    assert not out.exists()
    print(f"\nexit codes {codes}; rank 0: {results[0][1][0]}")


@pytest.mark.parametrize("case", ["cfg_on_3", "seq_on_3", "no_parallel", "cfg_off"])
def test_bad_world_refused(env, tmp_path, case):
    mode, world, says, extra = {
        "cfg_on_3": ("cfg", 3, "--parallel cfg runs on 2 ranks (cond, uncond); torchrun started 3", ()),
        "seq_on_3": ("seq", 3, "3 sequence ranks do not divide the transformer's 2 attention heads", ()),
        "no_parallel": (None, 2, "started as 2 processes (WORLD_SIZE) without --parallel", ()),
        "cfg_off": ("cfg", 2, "CFG is off", ("--cfg", "1")),
    }[case]
    out = env.out(case)
    argv = env.argv(out, *(("--parallel", mode) if mode else ()), *extra)
    spec, _ = env.spec([(argv, None)])
    check_refused(by_hand(world, spec, tmp_path), out, says)


def test_world_size_without_torchrun(env, tmp_path):
    """WORLD_SIZE=2 but none of torchrun's other variables: one line, non-zero, before any model work."""
    out = env.out("no_torchrun")
    proc = subprocess.run([sys.executable, "cli.py", *env.argv(out, "--parallel", "seq")], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=_env(WORLD_SIZE="2"))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not" in lines[0]
    assert not out.exists()


def test_missing_rank(env, tmp_path):
    """One of two ranks never starts: rank 0 gives up after QIE_PARALLEL_TIMEOUT with one line."""
    out = env.out("missing")
    spec, _ = env.spec([(env.argv(out, "--parallel", "seq"), None)])
    (rc, lines, text), = by_hand(2, spec, tmp_path, started=1, QIE_PARALLEL_TIMEOUT="3")
    assert rc != 0 and len(lines) == 1 and "not every one of the 2 ranks joined within 3 s" in lines[0], text[-2000:]
    assert not out.exists()


def test_rank_failing_to_load(env, tmp_path):
    """Rank 1 cannot load its weights: rank 0 says so in one line, both exit non-zero, nothing written."""
    out = env.out("fail_load")
    spec, _ = env.spec([(env.argv(out, "--parallel", "cfg"), "fail-load")])
    check_refused(by_hand(2, spec, tmp_path), out, "rank 1: transformer/diffusion_pytorch_model.safetensors: "
                                                   "unreadable on this rank (test)")


def test_rank_failing_in_the_loop(env, tmp_path):
    """Rank 1 raises inside step 2 (between collectives): it prints its line, rank 0 sees the lost rank and
    prints one, both exit non-zero, nothing written."""
    out = env.out("fail_step")
    spec, _ = env.spec([(env.argv(out, "--parallel", "seq"), "fail-step")])
    results = by_hand(2, spec, tmp_path)
    assert all(rc != 0 for rc, _, _ in results), [rc for rc, _, _ in results]
    (_, lines0, text0), (_, lines1, text1) = results
    assert len(lines0) == 1 and "another rank stopped during the denoise" in lines0[0], text0[-2000:]
    assert lines1 == ["error: rank 1: RuntimeError: rank 1 fails in step 2 (test)"], text1[-2000:]
    assert not out.exists()


def test_blocks_over_two_cpu_devices(env, capsys):
    """--parallel blocks --devices cpu,cpu: the blocks split 1 + 1 with the hooks in place; the same bits."""
    with pytest.MonkeyPatch.context() as mp:
        small_area(mp)
        out = env.out("blocks")
        assert cli.main(env.argv(out, "--parallel", "blocks", "--devices", "cpu,cpu")) == 0
    assert "blocks split: cpu: blocks 0-0, cpu: blocks 1-1" in capsys.readouterr().err
    assert np.array_equal(pixels(out), pixels(env.single))

    from engine.parallel.blocks import place_blocks
    from engine.pipelines.load import load_models
    models = load_models(env.snap, "cpu", "float32")
    place_blocks(models, [torch.device("cpu")] * 2)
    mm = models.transformer
    assert all(len(b._forward_pre_hooks) == 1 for b in mm.transformer_blocks)
    x, txt, txt_len, t, shapes = forward_inputs(mm.cfg.joint_attention_dim)
    with torch.inference_mode():
        assert torch.equal(mm(x, txt, txt_len, t, shapes), env.forward)


def test_block_split_by_free_memory():
    from engine.parallel.blocks import plan_split, split_counts
    from loaders import LoadError
    gib = 2 ** 30
    assert split_counts(2, [1, 1]) == [1, 1] and split_counts(5, [1, 1]) == [3, 2]
    assert plan_split(60, gib, [None, None], [0, 0]) == [30, 30]            # host memory: equal halves
    # two 24 GB cards, the first also holding 3 GiB of non-block weights and the VAE
    counts = plan_split(60, 0.68 * gib, [23 * gib, 23 * gib], [3 * gib, 0])
    assert sum(counts) == 60 and counts[0] < counts[1] and counts[1] * 0.68 <= 23 and counts[0] * 0.68 <= 20, counts
    assert plan_split(4, gib, [10 * gib, 2 * gib], [0, 0]) == [3, 1]
    with pytest.raises(LoadError, match="60 blocks need 40.8 GiB, the devices have 30.0 GiB free"):
        plan_split(60, 0.68 * gib, [16 * gib, 16 * gib], [2 * gib, 0])


@pytest.mark.parametrize("devices,says", [(None, "needs --devices"), ("cpu", "at least two --devices"),
                                          ("cpu,tpu:0", "'tpu:0' is not a device"),
                                          ("cpu,cuda:7", "does not exist here")])
def test_blocks_device_errors(env, capsys, devices, says):
    if devices == "cpu,cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this host has a cuda:7")
    out = env.out("blocks_bad")
    assert cli.main(env.argv(out, "--parallel", "blocks", *(("--devices", devices) if devices else ()))) == 2
    err = capsys.readouterr().err
    assert says in err, err
    assert not out.exists()


@pytest.mark.gpu
def test_blocks_cuda_and_cpu(env):
    """GPU: blocks over cuda:0 and the CPU, float32: activations really cross devices; the same output as all
    on cuda:0 to float32 rounding (kernels on one side, torch references on the other)."""
    from engine.parallel.blocks import place_blocks
    from engine.pipelines.load import load_models
    from engine.vram.offload import modulation_table_streamed
    x, txt, txt_len, t, shapes = (a.cuda() if torch.is_tensor(a) and a.is_floating_point() else a
                                  for a in forward_inputs(48))
    one = load_models(env.snap, "cuda", "float32")
    with torch.inference_mode():   # the modulation weights stay on the host: the table is made as the loop does
        want = one.transformer(x, txt, txt_len, t, shapes,
                               mods=modulation_table_streamed(one.transformer, [t[:1]], "cuda")[0]).cpu()
    split = load_models(env.snap, "cpu", "float32")
    place_blocks(split, [torch.device("cuda", 0), torch.device("cpu")])
    mm = split.transformer
    assert next(mm.transformer_blocks[0].attn.parameters()).is_cuda
    assert not next(mm.transformer_blocks[1].attn.parameters()).is_cuda
    with torch.inference_mode():
        got = mm(x, txt, txt_len, t, shapes, mods=modulation_table_streamed(mm, [t[:1]], "cuda:0")[0])
    assert got.is_cuda and mm._block_mover.moved > 0
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_bench_parallel_runs_on_the_cpu(tmp_path):
    """benchmarks/bench_parallel.py's --tiny run (gloo, 2 ranks): every row it reports, the split outputs equal
    to one rank's, the exchange timed; its full-size cases are the DESIGN's 1024² (8552) and 4K (53608) edits."""
    from benchmarks import bench_parallel as bench
    (h, w), (hc, wc), lens = bench.CASES["4k"]
    assert h * w + hc * wc + lens[0] == 53608 and 64 * 64 * 2 + bench.CASES["1024_cfg"][2][0] == 8552
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "benchmarks.bench_parallel", "--tiny", "--reps", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(out.read_text())["cases"]
    assert set(cases) == {"1024_cfg", "4k"} and "cfg" in cases["1024_cfg"] and "cfg" not in cases["4k"]
    for row in cases.values():
        assert row["one_ms"] > 0
        for mode in ("seq", "cfg"):
            if mode in row:
                assert row[mode]["rel_l2_vs_one"] < 1e-5 and row[mode]["speedup"] > 0, row
        assert row["seq"]["exchange_ms_in_step"] > 0 and row["seq"]["exchange_ms_alone"] > 0
