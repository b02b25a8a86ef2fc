"""`cli.py serve` on tiny snapshots with a text encoder (the real Qwen tokenizer): the HTTP API through
Starlette's TestClient (parity with `cli.py edit`, every error code, queue, cancel, token, failing jobs,
start-up errors) and a load test through a real uvicorn server on loopback. CPU, float32; the 1 MP
VAE/output area is shrunk as in test_cli_plus (the Plus VL model keeps its 384²)."""
import contextlib
import importlib.util
import io
import json
import math
import re
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import engine.pipelines.spec as spec_mod
from engine.pipelines.spec import condition_size as real_condition_size   # before small_area patches it
import engine.server.worker as worker_mod
from engine.server import build, prepare
from engine.server.app import create_app
from engine.server.form import Limits
from tests.test_pipeline import SMALL_AREA
from tests.test_pipeline_text import text_snapshot  # noqa: F401 (fixture)
from tests.test_processor import random_image

FULL = 1024 * 1024
LOCAL = "http://127.0.0.1"     # the Host the server answers (engine.server.app.SameOrigin)
pytestmark = pytest.mark.usefixtures("one_thread", "small_area")


@pytest.fixture(scope="module")
def small_area():
    with pytest.MonkeyPatch.context() as mp:
        orig = spec_mod.condition_size
        mp.setattr(spec_mod, "condition_size",
                   lambda w, h, area=FULL: orig(w, h, SMALL_AREA if area == FULL else area))
        yield


def png(width=100, height=80, seed=4):
    buf = io.BytesIO()
    random_image(width, height, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


def serve_args(model, *extra):
    args = cli.build_parser().parse_args(["serve", "--model", str(model), "--device", "cpu", "--port", "0", *extra])
    args.dtype = cli._dtype(args)
    return args


def start(model, *extra):
    worker, limits = prepare(serve_args(model, *extra))
    worker.start()
    assert worker.wait_ready(60), worker.startup_error
    return worker, limits


def form(images=None, **fields):
    """(files, data) for client.post: images [(name, bytes)], fields as strings."""
    images = [("in.png", png())] if images is None else images
    data = {"prompt": "make it snowy", "steps": "2", "seed": "5", **{k: str(v) for k, v in fields.items()}}
    return {"files": [("image", (name, data, "image/png")) for name, data in images], "data": data}


def wait_job(client, job_id, until=("done", "failed", "cancelled"), timeout=60, pause=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if view["state"] in until:
            return view
        time.sleep(pause)
    raise AssertionError(f"job {job_id} still {view}")


@pytest.fixture(scope="module")
def served(text_snapshot):
    """A warm worker (queue of 2) on the original-Edit snapshot, and a TestClient over it."""
    from starlette.testclient import TestClient
    worker, limits = start(text_snapshot, "--queue", "2")
    with TestClient(create_app(worker, limits), base_url=LOCAL) as client:
        yield client, worker, limits
    worker.close()


@contextlib.contextmanager
def patched_edit(monkeypatch, fail=None, hold=None):
    """The worker's edit, wrapped: seeds in `fail` raise that exception; a job with seed `hold` stops after
    its first step until the yielded gate is set (reached is set once it waits there)."""
    real, gate, reached = worker_mod.edit, threading.Event(), threading.Event()

    def edit(models, images, *tensors, progress=None):
        opts = tensors[4]
        if fail and opts.seed in fail:
            raise fail[opts.seed]

        def step(i):
            progress(i)
            if opts.seed == hold:
                reached.set()
                gate.wait(30)
        return real(models, images, *tensors, progress=step)
    monkeypatch.setattr(worker_mod, "edit", edit)
    try:
        yield gate, reached
    finally:
        gate.set()


def test_edit_matches_cli(served, text_snapshot, tmp_path):
    """The same image, prompt, steps and seed through `cli.py edit` and POST /v1/edit: the same PNG bytes
    (pixels and text); the same request twice: the same bytes; another seed moves the pixels."""
    client, _, _ = served
    (tmp_path / "in.png").write_bytes(png())
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["edit", "--model", str(text_snapshot), "--image", str(tmp_path / "in.png"),
                         "--prompt", "make it snowy", "--steps", "2", "--seed", "5", "--device", "cpu",
                         "--out", str(tmp_path / "cli.png")]) == 0
    want = (tmp_path / "cli.png").read_bytes()
    got = client.post("/v1/edit", **form())
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    a, b = Image.open(io.BytesIO(got.content)), Image.open(tmp_path / "cli.png")
    assert a.text == b.text and np.array_equal(np.asarray(a), np.asarray(b))
    meta = json.loads(a.text["qwen_image_edit"])
    assert meta["images"] == ["in.png"] and meta["seed"] == 5 and meta["steps"] == 2 and meta["cfg"] == 4.0
    assert got.content == want
    assert client.post("/v1/edit", **form()).content == want
    other = np.asarray(Image.open(io.BytesIO(client.post("/v1/edit", **form(seed=6)).content))).astype(int)
    assert np.abs(other - np.asarray(a).astype(int)).max() > 10


def test_health(served):
    client, worker, limits = served
    h = client.get("/health").json()
    assert h["model"] == worker.model and h["pipeline"] == "QwenImageEditPipeline" and h["device"] == "cpu"
    assert h["ready"] is True and h["state"] == "ready" and h["budget"] is None and h["error"] is None
    assert h["queue"] == 0 and h["queue_max"] == 2 and h["max_images"] == 1 and h["max_pixels"] == 4096 * 4096
    assert h["transformer"] is None and h["text_encoder"] is None and h["weights"] is None   # the snapshot's own
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/v1/jobs" in page.text
    assert "http" not in page.headers["content-security-policy"]        # nothing from outside


BAD = [  # (what, request kwargs for client.post, status, the error's words)
    ("no image", dict(data={"prompt": "x"}), 400, "image is required"),
    ("no prompt", dict(files=[("image", ("in.png", png(), "image/png"))]), 400, "prompt is required"),
    ("not a number", form(steps="many"), 400, "steps must be an integer, got 'many'"),
    ("not an image", form([("notes.txt", b"just text")]), 400, "cannot read image notes.txt"),
    ("truncated", form([("cut.png", png()[:400])]), 400, "cannot read image cut.png"),
    ("unknown field", form(sead=1), 400, "unknown field(s) sead"),
    ("not multipart", dict(json={"prompt": "x"}), 400, "multipart/form-data"),
    ("four files", form([(f"{i}.png", png()) for i in range(4)]), 400, "at most 3 images per request"),
    ("two images", form([("a.png", png()), ("b.png", png())]), 422, "QwenImageEditPipeline takes one image, got 2"),
    ("no steps", form(steps=0), 422, "steps must be 1 to 200, got 0"),
    ("many steps", form(steps=201), 422, "steps must be 1 to 200, got 201"),
    ("negative cfg", form(cfg=-1), 422, "cfg must be a number >= 0"),
    ("nan cfg", form(cfg="nan"), 422, "cfg must be a number >= 0"),
    ("wide", form(width=5000), 422, "width must be 16 to 4096 px, got 5000"),
    ("sampler", form(sampler="euler"), 422, "sampler must be one of default, lightning"),
]


@pytest.mark.parametrize("what,request_kw,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests(served, what, request_kw, status, words):
    for path in ("/v1/edit", "/v1/jobs"):
        r = served[0].post(path, **request_kw)
        assert r.status_code == status and words in r.json()["error"], (path, r.status_code, r.text)
        assert "\n" not in r.json()["error"]


def test_limits_413_422_404_409(served):
    client, worker, limits = served
    big = b"x" * (50 * 2 ** 20 + 1)
    r = client.post("/v1/edit", **form([("big.png", big)]))
    assert r.status_code == 413 and r.json()["error"] == "the upload is 50.0 MiB, over the 50 MiB limit"
    # no Content-Length (chunked): the limit holds while the body is read
    r = client.post("/v1/edit", content=(b"x" * 2 ** 20 for _ in range(51)),
                    headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and r.json()["error"] == "the upload is over the 50 MiB limit"
    from starlette.testclient import TestClient
    small = Limits(limits.spec, 90 * 90, "--max-pixels")
    with TestClient(create_app(worker, small), base_url=LOCAL) as tight:
        r = tight.post("/v1/edit", **form(width=256, height=128))
        assert r.status_code == 422 and r.json()["error"] == (
            "output 256x128 is 0.03 MP, over this server's limit of 0.01 MP (--max-pixels); "
            "ask for a smaller width/height")
        assert tight.post("/v1/edit", **form()).status_code == 422    # the default output: 96x96 here
    assert client.get("/v1/jobs/nope").status_code == 404
    assert client.get("/v1/jobs/nope/image").json()["error"].startswith("no job 'nope'")
    assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").json()


def test_queue_full_and_cancel(served, monkeypatch):
    """A running job (held at its first step) and two queued fill a queue of 2: the next is 429. A queued
    job cancels at once; the running one stops at its next step; the queued one after it still runs."""
    client, worker, _ = served
    with patched_edit(monkeypatch, hold=1) as (gate, reached):
        first = client.post("/v1/jobs", **form(seed=1, steps=20))
        assert first.status_code == 202 and first.json()["state"] in ("queued", "running")
        first = first.json()["id"]
        assert reached.wait(30)
        second, third = (client.post("/v1/jobs", **form(seed=s)).json()["id"] for s in (2, 3))
        assert client.get(f"/v1/jobs/{third}").json()["position"] == 1
        for path in ("/v1/jobs", "/v1/edit"):
            full = client.post(path, **form(seed=4))
            assert full.status_code == 429 and full.json()["error"] == "the queue is full (2 edits waiting); try again later"
        assert client.get("/health").json()["queue"] == 2
        assert client.delete(f"/v1/jobs/{third}").json()["state"] == "cancelled"
        assert client.get(f"/v1/jobs/{first}/image").status_code == 409
        assert client.delete(f"/v1/jobs/{first}").json()["state"] == "running"
        gate.set()
        view = wait_job(client, first)
        assert view["state"] == "cancelled" and view["error"] == "cancelled" and view["step"] < view["steps"]
        assert wait_job(client, second)["state"] == "done"
    image = client.get(f"/v1/jobs/{second}/image")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert client.delete(f"/v1/jobs/{second}").status_code == 409
    assert client.get(f"/v1/jobs/{third}/image").json()["error"] == f"job {third} is cancelled: cancelled"


def test_failing_jobs_then_a_good_one(served, monkeypatch):
    client, _, _ = served
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    with patched_edit(monkeypatch, fail={66: oom, 67: RuntimeError("boom\nsecond line")}):
        r = client.post("/v1/edit", **form(seed=66))
        assert r.status_code == 500 and r.json()["error"].startswith("out of GPU memory; ask for a smaller width/height")
        job = client.post("/v1/jobs", **form(seed=67)).json()["id"]
        assert wait_job(client, job) == {"id": job, "state": "failed", "step": 0, "steps": 2,
                                         "error": "RuntimeError: boom", "position": None}
        long = client.post("/v1/edit", **form(prompt="snow " * 1100))     # refused by the real processor
        assert long.status_code == 422 and "the limit is 1024" in long.json()["error"]
        good = client.post("/v1/edit", **form())
        assert good.status_code == 200 and good.content.startswith(b"\x89PNG")
    assert client.get("/health").json()["ready"]


def test_token(served):
    """With a token every route needs the header (401 otherwise); a non-loopback host needs a token."""
    from starlette.testclient import TestClient
    _, worker, limits = served
    with TestClient(create_app(worker, limits, token="s3cret"), base_url=LOCAL) as client:
        for path in ("/", "/health", "/v1/jobs/x"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = client.get(path, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
        assert client.post("/v1/edit", **form()).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert client.get("/health", headers=auth).status_code == 200
        assert client.post("/v1/edit", headers=auth, **form()).status_code == 200


def run_cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(argv)
    return rc, err.getvalue()


def test_startup_errors(text_snapshot, tmp_path, monkeypatch):
    """One line, exit 2: a non-loopback host without a token, a bad LoRA, no serve extra, a shard that
    fails to load (found by the worker while the server runs: the server stops)."""
    base = ["serve", "--model", str(text_snapshot), "--device", "cpu", "--port", "0"]
    rc, err = run_cli(base + ["--host", "0.0.0.0"])
    assert rc == 2 and err.count("\n") == 1 and "--host 0.0.0.0 is not a loopback address: give --token" in err
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    rc, err = run_cli(base + ["--lora", str(tmp_path / "bad.safetensors")])
    assert rc == 2 and err.count("\n") == 1 and "bad.safetensors" in err
    rc, err = run_cli(base + ["--vram", "8GiB"])
    assert rc == 2 and "--vram plans GPU memory; use it with --device cuda" in err
    find = importlib.util.find_spec
    with monkeypatch.context() as mp:
        mp.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else find(name, *a))
        rc, err = run_cli(base)
    assert rc == 2 and err == 'error: `serve` needs uvicorn: pip install -e ".[serve]"\n'

    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(text_snapshot, broken)
    shard = sorted((broken / "transformer").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    rc, err = run_cli(["serve", "--model", str(broken), "--device", "cpu", "--port", "0"])
    assert rc == 2 and err.splitlines()[-1].startswith("error: ") and shard.name in err.splitlines()[-1]


def test_not_ready_then_shutting_down(text_snapshot, monkeypatch):
    from starlette.testclient import TestClient
    gate, real = threading.Event(), worker_mod.load_models
    monkeypatch.setattr(worker_mod, "load_models", lambda *a, **k: gate.wait(30) and real(*a, **k))
    worker, limits = prepare(serve_args(text_snapshot))
    with TestClient(create_app(worker.start(), limits), base_url=LOCAL) as client:
        h = client.get("/health").json()
        assert h["ready"] is False and h["state"] == "loading"
        r = client.post("/v1/edit", **form())
        assert r.status_code == 503 and r.json()["error"].startswith("the models are still loading")
        gate.set()
        assert worker.wait_ready(60)
        assert client.post("/v1/edit", **form()).status_code == 200
        worker.close()
        r = client.post("/v1/jobs", **form())
        assert r.status_code == 503 and r.json()["error"] == "the server is shutting down"
        assert client.get("/health").json()["state"] == "shutting down"


def test_plus_two_images_match_cli(tmp_path_factory, tmp_path):
    """Edit-2511 (QwenImageEditPlusPipeline): two uploads in order are Picture 1 and 2, as two --image."""
    from starlette.testclient import TestClient
    from transformers import Qwen2_5_VLForConditionalGeneration
    from tests.test_pipeline_plus import plus_snapshot
    from tests.test_text_encoder import redraw, tiny_config
    te = redraw(Qwen2_5_VLForConditionalGeneration(tiny_config())).eval()
    root = plus_snapshot(tmp_path_factory.mktemp("plus_serve"), True, te)
    images = [("a.png", png(120, 90, 3)), ("b.png", png(70, 110, 4))]
    for name, data in images:
        (tmp_path / name).write_bytes(data)
    rc, err = run_cli(["edit", "--model", str(root), "--image", str(tmp_path / "a.png"), "--image",
                       str(tmp_path / "b.png"), "--prompt", "make it snowy", "--steps", "2", "--seed", "5",
                       "--device", "cpu", "--out", str(tmp_path / "cli.png")])
    assert rc == 0, err
    worker, limits = start(root)
    try:
        with TestClient(create_app(worker, limits), base_url=LOCAL) as client:
            got = client.post("/v1/edit", **form(images))
            assert got.status_code == 200 and got.content == (tmp_path / "cli.png").read_bytes()
            swapped = client.post("/v1/edit", **form(images[::-1])).content
            assert swapped != got.content
            assert json.loads(Image.open(io.BytesIO(swapped)).text["qwen_image_edit"])["images"] == ["b.png", "a.png"]
            assert client.get("/health").json()["max_images"] == 3
    finally:
        worker.close()


def test_lora_fused_at_load_matches_cli(served, text_snapshot, tmp_path):
    """--lora FILE:S on serve: fused once at load; the same PNG as `cli.py edit --lora FILE:S`, the LoRA in
    its text and in /health, and the LoRA moves the image."""
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file
    from starlette.testclient import TestClient
    from tests.test_lora import layout, linear_shapes, random_lora
    shapes = linear_shapes(QwenImageTransformer2DModel.from_pretrained(text_snapshot / "transformer"))
    save_file(layout("kohya", random_lora(shapes, seed=7)), str(tmp_path / "style.safetensors"))
    (tmp_path / "in.png").write_bytes(png())
    lora = f"{tmp_path / 'style.safetensors'}:0.8"
    rc, err = run_cli(["edit", "--model", str(text_snapshot), "--image", str(tmp_path / "in.png"), "--prompt",
                       "make it snowy", "--steps", "2", "--seed", "5", "--device", "cpu", "--lora", lora,
                       "--out", str(tmp_path / "cli.png")])
    assert rc == 0, err
    worker, limits = start(text_snapshot, "--lora", lora)
    try:
        with TestClient(create_app(worker, limits), base_url=LOCAL) as client:
            got = client.post("/v1/edit", **form())
            assert got.status_code == 200 and got.content == (tmp_path / "cli.png").read_bytes()
            assert "Lora: style.safetensors:0.8" in Image.open(io.BytesIO(got.content)).text["parameters"]
            assert client.get("/health").json()["loras"] == [{"file": "style.safetensors", "scale": 0.8}]
    finally:
        worker.close()
    plain = served[0].post("/v1/edit", **form()).content       # the same edit without the LoRA
    plain, fused = (np.asarray(Image.open(io.BytesIO(b))).astype(int) for b in (plain, got.content))
    assert np.abs(plain - fused).max() > 10


def test_fp8_weights_match_cli(text_snapshot, tmp_path):
    """--weights fp8 on serve: the block Linears quantized once at load; the same PNG as `cli.py edit --weights
    fp8` (and another one than bf16's)."""
    from starlette.testclient import TestClient
    (tmp_path / "in.png").write_bytes(png())
    outs = {}
    for weights in ("fp8", None):
        out = tmp_path / f"cli_{weights}.png"
        rc, err = run_cli(["edit", "--model", str(text_snapshot), "--image", str(tmp_path / "in.png"), "--prompt",
                           "make it snowy", "--steps", "2", "--seed", "5", "--device", "cpu", "--out", str(out)]
                          + (["--weights", weights] if weights else []))
        assert rc == 0, err
        outs[weights] = out.read_bytes()
    worker, limits = start(text_snapshot, "--weights", "fp8")
    try:
        with TestClient(create_app(worker, limits), base_url=LOCAL) as client:
            got = client.post("/v1/edit", **form())
            assert got.status_code == 200 and got.content == outs["fp8"]
            assert json.loads(Image.open(io.BytesIO(got.content)).text["qwen_image_edit"])["weights"] == "fp8"
    finally:
        worker.close()
    assert outs["fp8"] != outs[None]


def rss():
    """This process's resident memory in bytes (the server runs on its threads)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@contextlib.contextmanager
def running(args):
    """build(args) served by a real uvicorn on a loopback port, on a thread: yields (url, worker)."""
    server, sock, worker = build(args)
    worker.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert worker.wait_ready(60), worker.startup_error
        while not server.started:
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", worker
    finally:
        server.should_exit = True
        thread.join(30)
        worker.close()
        sock.close()


RSS_BOUND = 64 * 2 ** 20        # growth over 20 edits + 20 bad requests, after a first edit and a first error


def test_load_through_uvicorn(text_snapshot):
    """20 queued edits with 20 bad requests in between, on a real server over loopback: every one answered
    (edits done with a PNG, bad ones 4xx), host RAM flat within RSS_BOUND, health ok after."""
    import httpx
    with running(serve_args(text_snapshot, "--queue", "32")) as (url, worker), httpx.Client(base_url=url, timeout=60) as http:
        small = form([("in.png", png(64, 48))], steps=1)
        assert http.post("/v1/edit", **small).status_code == 200          # allocator and caches warm
        assert http.post("/v1/edit", **form([("bad.png", b"junk")])).status_code == 400
        before = rss()
        ids, bad = [], []
        for i in range(20):
            r = http.post("/v1/jobs", **form([("in.png", png(64, 48, seed=i))], steps=1, seed=i))
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
            bad.append(http.post("/v1/jobs", **(form([("x.png", b"junk")]) if i % 2 else form(steps=0))).status_code)
        assert bad == [422, 400] * 10
        wait_job(http, ids[-1], pause=0.1)        # first in, first out: the last one done, all are
        for job in ids:
            assert http.get(f"/v1/jobs/{job}").json()["state"] == "done"
            assert http.get(f"/v1/jobs/{job}/image").content.startswith(b"\x89PNG")
        grown = rss() - before
        print(f"host RAM: {before / 2 ** 20:.0f} MiB before, grew {grown / 2 ** 20:.1f} MiB "
              f"(bound {RSS_BOUND / 2 ** 20:.0f} MiB)")
        assert grown < RSS_BOUND
        h = http.get("/health").json()
        assert h["ready"] and h["queue"] == 0 and h["running"] is None


def test_client_gone_cancels_its_edit(text_snapshot, monkeypatch):
    """A POST /v1/edit whose client hangs up before the answer: its job is cancelled at the next step."""
    import httpx
    cancelled = []
    with running(serve_args(text_snapshot)) as (url, worker), patched_edit(monkeypatch, hold=9) as (gate, reached):
        cancel = worker.cancel
        monkeypatch.setattr(worker, "cancel", lambda job_id: cancelled.append(cancel(job_id)))
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=1)) as http:
            http.post("/v1/edit", **form(seed=9, steps=50))
        assert reached.is_set()
        deadline = time.monotonic() + 10
        while not cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        job, = cancelled
        while not job.finished:
            time.sleep(0.01)
        assert job.state == "cancelled" and job.step < 50


def test_vram_plan_for_serving(text_snapshot):
    """--vram plans once for the largest accepted edit with the text encoder beside the MMDiT: every
    stage's need within the budget; a tighter budget serves smaller outputs (the largest that fits);
    too small a budget names the least that serves."""
    from engine.server.plan import serve_plan
    from loaders import LoadError
    GiB, top = 2 ** 30, 4096 * 4096
    with pytest.raises(LoadError) as e:
        serve_plan(text_snapshot, GiB, "float32", top)
    least = str(e.value).rsplit("the smallest budget that fits is ", 1)[1]
    assert least.endswith(" GiB") and "256x256 output with the text encoder" in str(e.value)
    areas = []
    for budget in (float(least[:-4]) * GiB, 1.5 * GiB, 8 * GiB):
        plan, area = serve_plan(text_snapshot, int(budget), "float32", top)
        assert max(plan.needs.values()) <= budget and set(plan.needs) == {"text", "vae_encode", "denoise", "vae_decode"}
        assert plan.te_resident == 0 and plan.vision_resident == 0
        areas.append(area)
    assert areas[0] < areas[1] < areas[2] == top
    side = math.isqrt(areas[1])
    assert serve_plan(text_snapshot, int(1.5 * GiB), "float32", (side + 16) ** 2)[1] == areas[1]  # the largest
    # fp8 block Linears are planned at 1 byte (+ scales), not at the model dtype's 4
    wide, _ = serve_plan(text_snapshot, 8 * GiB, "float32", top)
    narrow, _ = serve_plan(text_snapshot, 8 * GiB, "float32", top, fp8=True)
    assert narrow.peaks["denoise"] < wide.peaks["denoise"]


def test_host_and_origin_checked(served):
    """Against other web pages: a Host that does not name this server is 403 (DNS rebinding), a POST or
    DELETE from another origin is 403 (a cross-site multipart form needs no preflight); the same origin,
    localhost on any port and a client that sends no Origin are served."""
    from starlette.testclient import TestClient
    client, worker, limits = served
    r = client.get("/health", headers={"Host": "evil.example:7860"})
    assert r.status_code == 403 and "evil.example" in r.json()["error"] and "\n" not in r.json()["error"]
    assert client.post("/v1/jobs", headers={"Host": "rebound.example"}, **form()).status_code == 403
    for origin in ("http://evil.example", "http://127.0.0.1.evil.example", "null", "http://localhost:3000"):
        r = client.post("/v1/edit", headers={"Origin": origin}, **form())
        assert r.status_code == 403 and r.json()["error"].startswith("cross-origin POST"), origin
    assert client.delete("/v1/jobs/x", headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.get("/health", headers={"Origin": "http://evil.example"}).status_code == 200  # a read: CORS blocks it
    assert client.post("/v1/edit", headers={"Origin": LOCAL}, **form()).status_code == 200     # the page
    for host in ("localhost:7860", "127.0.0.1:1", "[::1]:7860"):
        origin = f"http://{host}"
        assert client.get("/health", headers={"Host": host}).status_code == 200, host
        assert client.delete("/v1/jobs/x", headers={"Host": host, "Origin": origin}).status_code == 404, host
    with TestClient(create_app(worker, limits, token="t", host="192.168.1.5"), base_url="http://192.168.1.5:80") as lan:
        auth = {"Authorization": "Bearer t"}
        assert lan.get("/health", headers=auth).status_code == 200
        assert lan.get("/health", headers={**auth, "Host": "evil.example"}).status_code == 403


def test_extreme_aspect_ratios(served, monkeypatch):
    """An image too thin to resize (20000x1) and one whose default output would pass MAX_SIDE (4000x1 at
    1 MP: 64768x32) are 422 with one line, not 500."""
    client, _, _ = served
    for path in ("/v1/edit", "/v1/jobs"):
        r = client.post(path, **form([("thin.png", png(20000, 1))]))
        assert r.status_code == 422 and "aspect ratio is too extreme" in r.json()["error"], r.text
        assert "\n" not in r.json()["error"]
    monkeypatch.setattr(spec_mod, "condition_size", real_condition_size)     # the 1 MP area
    r = client.post("/v1/edit", **form([("thin.png", png(4000, 1))]))
    assert r.status_code == 422 and r.json()["error"].startswith("the default output 64768x32 ") and (
        "4096 px" in r.json()["error"]), r.text
    assert client.post("/v1/jobs", **form([("thin.png", png(4000, 1))])).status_code == 422


def test_forgotten_job_takes_no_history_slot(served, monkeypatch):
    """A job forgotten while it runs (its POST /v1/edit client gone) is not kept among the finished."""
    client, worker, _ = served
    with patched_edit(monkeypatch, hold=11) as (gate, reached):
        job_id = client.post("/v1/jobs", **form(seed=11)).json()["id"]
        assert reached.wait(30)
        job, _ = worker.get(job_id)
        worker.forget(job_id)
        gate.set()
        deadline = time.monotonic() + 30
        while not job.finished and time.monotonic() < deadline:
            time.sleep(0.01)
    assert job.state == "done" and job_id not in worker._finished and worker.get(job_id) == (None, None)


def test_vram_plan_streams_text_encoder_once(served, text_snapshot, monkeypatch):
    """serve --vram: the text encoder is streamed once at load and kept; two requests (and the warm-up)
    stream nothing more and give the same bytes as the server without a plan."""
    from starlette.testclient import TestClient
    import engine.pipelines.text as text_mod
    from engine.server.plan import serve_plan
    calls = {"worker": 0, "text": 0}

    def counting(where, real):
        def stream(blocks, *a, **k):
            calls[where] += 1
            return real(blocks, *a, **k)
        return stream
    monkeypatch.setattr(worker_mod, "stream_blocks", counting("worker", worker_mod.stream_blocks))
    monkeypatch.setattr(text_mod, "stream_blocks", counting("text", text_mod.stream_blocks))
    removed = []
    plan, _ = serve_plan(text_snapshot, 8 * 2 ** 30, "float32", 4096 * 4096)
    assert plan.te_resident == 0
    want = served[0].post("/v1/edit", **form()).content
    worker = worker_mod.Worker(text_snapshot, "cpu", "float32", plan=plan).start()
    try:
        assert worker.wait_ready(60), worker.startup_error
        assert calls == {"worker": 2, "text": 0}                     # layers and vision blocks, at load
        for h in worker._te_handles:
            monkeypatch.setattr(h, "remove", lambda h=h, real=h.remove: removed.append(h) or real())
        _, limits = served[1:]
        with TestClient(create_app(worker, limits), base_url=LOCAL) as client:
            got = [client.post("/v1/edit", **form()) for _ in range(2)]
        assert [g.status_code for g in got] == [200, 200]
        assert got[0].content == got[1].content == want
        assert calls == {"worker": 2, "text": 0} and not removed
    finally:
        worker.close()
    assert len(removed) == 2 and worker._te_handles == []            # released when the worker stops


def test_decode_image_from_many_threads():
    """decode_image on several threads at once: PIL's process-wide pixel limit ends as it began, and the
    100 MP refusal keeps its one line."""
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image as PILImage
    from engine.server.form import ApiError, decode_image
    before, data = PILImage.MAX_IMAGE_PIXELS, png(64, 48)
    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(lambda i: decode_image(data, f"{i}.png").size, range(64)))
    assert sizes == [(64, 48)] * 64 and PILImage.MAX_IMAGE_PIXELS == before
    buf = io.BytesIO()
    PILImage.new("1", (12000, 9000)).save(buf, format="PNG")       # 108 MP, a small file
    with pytest.raises(ApiError) as e:
        decode_image(buf.getvalue(), "huge.png")
    assert e.value.status == 422 and str(e.value) == ("huge.png is 12000x9000 (108 MP), over the 100 MP limit; "
                                                      "downscale it first")
    assert PILImage.MAX_IMAGE_PIXELS == before


def test_full_size_warm_up_runs_the_default_request(served, monkeypatch):
    """On CUDA without a plan the worker also runs the default request's path at full size after its tiny
    warm-up edit: 1024x1024 images, one step with CFG (two rows) and one without; here on the CPU, called
    directly. It logs each warm-up's stages and step times; a failure inside becomes one note instead of
    stopping the server; afterwards requests give the bytes they gave before; a job's log names its steps."""
    client, worker, _ = served
    before = client.post("/v1/edit", **form()).content
    seen, real = [], worker._edit

    def spy(request, progress, job=None):
        sizes = [Image.open(io.BytesIO(b)).size for b in request.images]
        seen.append((sizes, request.opts.steps, request.opts.cfg, request.opts.width))
        return real(request, progress, job)
    monkeypatch.setattr(worker, "_edit", spy)
    log, worker.log = worker.log, io.StringIO()
    try:
        worker._warm_up_full_size()
        assert seen == [([(1024, 1024)], 1, 4.0, None), ([(1024, 1024)], 1, 1.0, None)]
        text = worker.log.getvalue()
        assert re.search(r"warm-up at 1024x1024, cfg 4: text_encode [0-9.]+s .*denoise [0-9.]+s .*; steps [0-9.]+ s",
                         text) and "warm-up at 1024x1024, cfg 1:" in text and "warm-up at full size" in text
        monkeypatch.setattr(worker, "_edit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no memory")))
        worker._warm_up_full_size()
        assert "note: full-size warm-up skipped: RuntimeError: no memory" in worker.log.getvalue()
        monkeypatch.setattr(worker, "_edit", real)
        assert client.post("/v1/edit", **form()).content == before
        assert re.search(r"job \S+ denoise: modulation table [0-9.]+s, steps [0-9.]+ [0-9.]+ s", worker.log.getvalue())
    finally:
        worker.log = log
