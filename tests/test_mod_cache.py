"""Modulation tables on disk (engine.pipelines.mod_cache): a later process's edit reads the table instead of
visiting the modulation weights, with the same image; what the table depends on changes its key; a damaged
entry is recomputed; the folder stays bounded."""
import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import engine.pipelines.common as common
from engine.config import RunOptions
from engine.pipelines import mod_cache
from engine.pipelines.common import edit, load_models

from .test_pipeline import SMALL_AREA, prompts

IMAGE = Image.new("RGB", (64, 48), (10, 200, 60))
OPTS = RunOptions(steps=2, cfg=3.0, seed=4, condition_area=SMALL_AREA)


@pytest.fixture
def computed(monkeypatch):
    """Counts the tables computed from the weights."""
    calls = []
    real = common.modulation_table_streamed
    monkeypatch.setattr(common, "modulation_table_streamed", lambda *a: calls.append(1) or real(*a))
    return calls


def fresh(root, folder, **kw):
    """The models as a new process loads them (no table in memory), the disk cache in `folder`."""
    models = load_models(root, "cpu", "float32", **kw)
    models.mod_cache = folder
    return models


def run(models, opts=OPTS):
    return np.asarray(edit(models, IMAGE, *prompts(5), opts)).astype(int)


def entries(folder):
    return sorted(folder.glob("*.safetensors"))


def test_a_later_process_reads_the_table(tiny_snapshot, tmp_path, computed):
    root, _, _ = tiny_snapshot
    folder = tmp_path / "mod"
    want = run(load_models(root, "cpu", "float32"))             # no cache: the reference image
    assert np.array_equal(run(fresh(root, folder)), want) and len(computed) == 2
    (entry,) = entries(folder)
    assert np.array_equal(run(fresh(root, folder)), want) and len(computed) == 2    # read, not computed

    # the entry is what the edit used: other modulations in it change the image
    table = load_file(entry)
    g = torch.Generator().manual_seed(0)
    save_file({k: v + torch.randn(v.shape, generator=g) for k, v in table.items()}, entry)
    moved = run(fresh(root, folder))
    assert np.abs(moved - want).max() > 8 and len(computed) == 2

    # damaged: recomputed (same image) and rewritten
    entry.write_bytes(entry.read_bytes()[:100])
    assert np.array_equal(run(fresh(root, folder)), want) and len(computed) == 3
    assert load_file(entry).keys() == table.keys()


def test_under_a_plan_the_table_is_read_and_not_kept(tiny_snapshot, tmp_path, computed):
    from engine.pipelines.budget import make_plan
    root, _, _ = tiny_snapshot
    folder = tmp_path / "mod"
    plan = make_plan(root, IMAGE.size, None, None, 2, False, 8 * 2**30, "stream", "float32", area=SMALL_AREA)
    plan = dataclasses.replace(plan, mmdit_resident=0)
    want = run(fresh(root, folder, plan=plan))
    models = fresh(root, folder, plan=plan)
    assert np.array_equal(run(models), want) and len(computed) == 1 and not models.mod_tables


def test_what_the_table_depends_on_changes_its_key(tiny_snapshot, tmp_path, computed):
    root, _, _ = tiny_snapshot
    folder = tmp_path / "mod"
    models = fresh(root, folder)
    ts = [1000.0, 500.0]
    key = mod_cache.table_key(models, ts)
    assert key == mod_cache.table_key(fresh(root, folder), ts)
    assert key != mod_cache.table_key(models, [1000.0, 501.0])
    assert key != mod_cache.table_key(dataclasses.replace(models, dtype=torch.bfloat16), ts)
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"x")
    with_lora = dataclasses.replace(models, source={**models.source, "loras": [(str(lora), 1.0)]})
    assert key != mod_cache.table_key(with_lora, ts)
    assert mod_cache.table_key(with_lora, ts) != mod_cache.table_key(
        dataclasses.replace(with_lora, source={**models.source, "loras": [(str(lora), 0.5)]}), ts)
    # a weights file rewritten in place is another model
    weights = models.weight_files[0]
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert key != mod_cache.table_key(models, ts)
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    # nothing to name the weights by: no disk cache
    assert mod_cache.table_key(dataclasses.replace(models, weight_files=[]), ts) is None
    gone = dataclasses.replace(models, source={**models.source, "loras": [("<a Lora object>", 1.0)]})
    assert mod_cache.table_key(gone, ts) is None

    # another schedule: another entry, the first one kept
    run(models)
    run(models, dataclasses.replace(OPTS, steps=3))
    assert len(entries(folder)) == 2 and len(computed) == 2


def test_the_folder_is_trimmed_oldest_first(tmp_path):
    for i in range(5):
        p = tmp_path / f"{i}.safetensors"
        p.write_bytes(b"\0" * 1000)
        os.utime(p, ns=(10**18 + i * 10**9,) * 2)
    mod_cache.trim(tmp_path, limit=3500)
    assert [p.name for p in entries(tmp_path)] == ["2.safetensors", "3.safetensors", "4.safetensors"]


def test_an_unwritable_folder_only_loses_the_cache(tiny_snapshot, tmp_path, computed):
    root, _, _ = tiny_snapshot
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    want = run(fresh(root, blocker / "mod"))
    assert np.array_equal(run(fresh(root, blocker / "mod")), want) and len(computed) == 2
