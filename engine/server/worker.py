"""The warm models and the one thread that owns torch: it loads the text encoder, transformer and VAE once,
warms up with one tiny edit, then runs queued edits one at a time, first in first out. A job that fails
(an unreadable image, out of memory, any exception) fails alone with a one-line error; the next one runs."""
import gc
import io
import secrets
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from loaders import LoadError, Snapshot, png_bytes, torch_dtype

from engine.config import RunOptions
from engine.pipelines import inputs, pipeline_for
from engine.pipelines.common import edit
from engine.pipelines.load import load_models
from engine.pipelines.metadata import png_text
from engine.pipelines.text import run_text_encoder
from engine.server.form import EditRequest, decode_image
from engine.text.processor import PromptError
from engine.vram.offload import move_except, stream_blocks

KEEP_FINISHED = 32      # finished jobs (and their PNGs) kept for GET /v1/jobs/{id}; older ones are forgotten


class NotReady(Exception):
    """The worker takes no job now (loading, failed to load, shutting down); str() says which."""


class QueueFull(Exception):
    pass


class Cancelled(Exception):
    """Raised from the denoise loop's progress callback to stop a job between steps."""


@dataclass(eq=False)
class Job:
    id: str
    request: EditRequest
    state: str = "queued"       # queued -> running -> done | failed | cancelled
    step: int = 0
    error: str = None
    input_error: bool = False   # the engine refused the job's inputs (a too-long prompt), not a fault
    png: bytes = None
    cancel: bool = False
    _done: list = field(default_factory=list)    # callbacks run once the job has finished

    @property
    def finished(self):
        return self.state in ("done", "failed", "cancelled")

    def view(self, position=None):
        return {"id": self.id, "state": self.state, "step": self.step, "steps": self.request.opts.steps,
                "error": self.error, "position": position}


def one_line(e):
    """The CLI's one-line error for an exception a job (or the load) raised."""
    text = str(e).strip()
    if isinstance(e, (LoadError, PromptError)):
        return text
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        return ("out of GPU memory; ask for a smaller width/height, or restart the server with a smaller "
                "--vram so more of the weights stream")
    if isinstance(e, MemoryError) or "can't allocate memory" in text.lower() or "defaultcpuallocator" in text.lower():
        return "out of host memory; ask for a smaller width/height, or close other programs"
    return f"{type(e).__name__}: {text.splitlines()[0] if text else 'no message'}"


class Worker:
    """One thread, one GPU job at a time. Routes call submit/get/cancel/forget/health (thread-safe, no torch);
    everything torch runs on the worker's thread."""

    def __init__(self, model_dir, device="cpu", dtype="float32", loras=(), transformer_file=None, plan=None,
                 queue_size=16, log=sys.stderr, weights=None, text_weights=None, text_encoder_file=None,
                 mod_cache=None):
        self.model_dir, self.device, self.dtype, self.plan = model_dir, device, dtype, plan
        self.mod_cache = mod_cache      # a folder for modulation tables on disk (engine.pipelines.mod_cache)
        self.loras, self.transformer_file, self.queue_size, self.log = list(loras), transformer_file, queue_size, log
        self.weights = weights          # None | "bf16" | "fp8", as load_models takes it
        self.text_weights, self.text_encoder_file = text_weights, text_encoder_file   # as load_text_model takes them
        self.model = Snapshot(model_dir).root.name
        self.spec = pipeline_for(model_dir)
        self.threads = torch.get_num_threads()     # OpenMP keeps the count per OS thread: the worker adopts ours
        self.startup_error = None
        self.on_fatal = None            # called (from the worker thread) when loading or warm-up fails
        self._cond = threading.Condition()
        self._queue, self._jobs, self._finished = deque(), {}, deque()
        self._running = None
        self._te_handles = []           # the text encoder's stream handles under a plan: made at load, kept
        self._ready, self._closing = False, False
        self._settled = threading.Event()   # set once ready or failed
        self._thread = threading.Thread(target=self._main, name="qie-worker", daemon=True)

    # ---- the routes' side -------------------------------------------------------------------------

    def start(self):
        self._thread.start()
        return self

    def wait_ready(self, timeout=None):
        """True once the models are loaded and warm; False if loading failed or the wait timed out."""
        self._settled.wait(timeout)
        return self._ready

    def refusal(self):
        """Why no job is taken now (loading, failed to start, shutting down), or None."""
        if self._closing:
            return "the server is shutting down"
        if not self._ready:
            return (f"the server failed to start: {self.startup_error}" if self.startup_error
                    else "the models are still loading; try again when /health says ready")
        return None

    def submit(self, request):
        with self._cond:
            if self.refusal():
                raise NotReady(self.refusal())
            if len(self._queue) >= self.queue_size:
                raise QueueFull(f"the queue is full ({len(self._queue)} edits waiting); try again later")
            job = Job(secrets.token_hex(8), request)
            self._jobs[job.id] = job
            self._queue.append(job)
            self._cond.notify_all()
            return job

    def get(self, job_id):
        """(job, its position in the queue (0: next) or None), or (None, None) for an unknown id."""
        with self._cond:
            job = self._jobs.get(job_id)
            position = next((i for i, j in enumerate(self._queue) if j is job), None) if job else None
            return job, position

    def cancel(self, job_id):
        """A queued job is cancelled at once; a running one stops at its next step. Returns the job or None."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.finished:
                return job
            job.cancel = True
            if job in self._queue:
                self._queue.remove(job)
                self._finish(job, "cancelled", error="cancelled")
        return job

    def forget(self, job_id):
        """Drop a finished job the caller has answered with (POST /v1/edit's): it takes no history slot."""
        with self._cond:
            if self._jobs.pop(job_id, None) is not None and job_id in self._finished:
                self._finished.remove(job_id)

    def when_finished(self, job, fn):
        """fn() once the job has finished (at once if it has); from whichever thread finishes it."""
        with self._cond:
            if not job.finished:
                job._done.append(fn)
                return
        fn()

    def health(self):
        with self._cond:
            state = ("shutting down" if self._closing else "ready" if self._ready
                     else "failed" if self.startup_error else "loading")
            return {"model": self.model, "pipeline": self.spec.class_name, "device": self.device,
                    "dtype": self.dtype, "budget": self.plan and f"{self.plan.budget / 2 ** 30:.2f} GiB",
                    "loras": [{"file": Path(str(getattr(lo, "path", lo))).name, "scale": float(s)} for lo, s in self.loras],
                    "transformer": self.transformer_file and Path(self.transformer_file).name,
                    "text_encoder": self.text_encoder_file and Path(self.text_encoder_file).name,
                    "weights": self.weights, "text_weights": self.text_weights,
                    "queue": len(self._queue), "queue_max": self.queue_size,
                    "running": self._running.id if self._running else None,
                    "ready": self._ready and not self._closing, "state": state, "error": self.startup_error}

    def close(self, timeout=30):
        """Refuse new jobs, cancel the queued ones, stop the running one at its next step, join the thread."""
        with self._cond:
            self._closing = True
            while self._queue:
                self._finish(self._queue.popleft(), "cancelled", error="the server is shutting down")
            if self._running is not None:
                self._running.cancel = True
            self._cond.notify_all()
        # a load in progress cannot be stopped: the daemon thread is left to the process's exit
        if self._ready and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- the worker thread ------------------------------------------------------------------------

    def _main(self):
        try:
            self._serve()
        finally:
            self._release()

    def _serve(self):
        torch.set_num_threads(self.threads)
        try:
            self._load()
            self._warm_up()
        except Exception as e:
            self.startup_error = one_line(e)
            if not isinstance(e, (LoadError, PromptError)):
                traceback.print_exc(file=self.log)
            self._settled.set()
            if self.on_fatal is not None:
                self.on_fatal()
            return
        with self._cond:
            self._ready = True
        self._settled.set()
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                job = self._queue.popleft()
                job.state, self._running = "running", job
            self._run(job)

    def _load(self):
        from engine.pipelines.text import load_text_model
        from engine.text.processor import load_processor
        t0 = time.perf_counter()
        snap = Snapshot(self.model_dir)
        snap.require("text_encoder")
        self.processor = load_processor(snap)
        # with a plan the text encoder stays on the host and streams (engine/server/plan.py)
        notes = []
        self.text_encoder = load_text_model(snap, self.dtype, self.device, self.text_weights, self.text_encoder_file,
                                            self.plan, notes=notes)
        for line in notes:
            print(f"note: {line}", file=self.log)
        if self.plan is not None:       # streamed once, as run_text_encoder would per call; kept until close
            self._stream_text_encoder()
        self.models = load_models(self.model_dir, self.device, self.dtype, self.plan, self.loras, self.transformer_file,
                                  weights=self.weights)
        self.models.mod_cache = self.mod_cache
        for line in self.models.source.get("notes", []):
            print(f"note: {line}", file=self.log)
        print(f"loaded {self.model} ({self.spec.class_name}) on {self.device} in {time.perf_counter() - t0:.2f}s",
              file=self.log)

    def _stream_text_encoder(self):
        """The same placement run_text_encoder makes for a plan, made once: its layers and vision blocks
        stream from (pinned) host memory, the rest but the embedding table on the device."""
        te, plan = self.text_encoder, self.plan
        self._te_handles.append(stream_blocks(te.layers, self.device, plan.te_resident, skip=()))
        self._te_handles.append(stream_blocks(te.visual.blocks, self.device, plan.vision_resident, skip=()))
        move_except(te, self.device, te.layers, te.visual.blocks, te.embed_tokens)

    def _release(self):
        """On the worker thread, once it stops: the text encoder's stream hooks and pinned buffers go."""
        handles, self._te_handles = self._te_handles, []
        for h in handles:
            try:
                h.remove()
            except Exception:
                traceback.print_exc(file=self.log)

    def _warm_up(self):
        """One tiny edit through the whole path (text encoder with CFG's two prompts, VAE, MMDiT, PNG); on CUDA
        without a plan, then the default request at full size (_warm_up_full_size)."""
        t0 = time.perf_counter()
        self._edit(self._warm_up_request((64, 48), 4.0, 64), lambda i: None)
        print(f"warm-up edit {time.perf_counter() - t0:.2f}s", file=self.log)
        if self.device == "cuda" and self.plan is None:
            self._warm_up_full_size()

    def _warm_up_request(self, size, cfg, side=None):
        buf = io.BytesIO()
        Image.linear_gradient("L").convert("RGB").resize(size).save(buf, format="PNG")
        n = max(1, self.spec.min_images)
        return EditRequest([buf.getvalue()] * n, [f"warm-up-{i}.png" for i in range(n)], "warm up", " ",
                           RunOptions(steps=1, cfg=cfg, width=side, height=side))

    def _warm_up_full_size(self):
        """The default request's path at full size (~1 MP images, the output size they give), one step each with
        CFG (two rows) and without (one row): the text encoder's vision tower, the VAE and every MMDiT module
        meet their real shapes, so what a process pays at its first edit of that size (kernel choices,
        cuDNN/cuBLASLt plans, lazily loaded kernels, the allocator's growth) is paid at start, not by the first
        request. Only the modulation table of a request's schedule is left to it (once per schedule; the disk
        cache keeps it for later servers). No plan: the memory is there. A failure costs only this warm-up."""
        t0 = time.perf_counter()
        try:
            for cfg in (4.0, 1.0):
                self._edit(self._warm_up_request((1024, 1024), cfg), lambda i: None)
                steps = " ".join(f"{t:.3f}" for t in self.models.step_times.get("steps", []))
                print(f"warm-up at 1024x1024, cfg {cfg:g}: {self._stage_line()}; steps {steps} s", file=self.log)
            print(f"warm-up at full size {time.perf_counter() - t0:.2f}s", file=self.log)
        except Exception as e:      # noqa: BLE001 (the server runs without it)
            print(f"note: full-size warm-up skipped: {one_line(e)}", file=self.log)
            self._free()        # e.g. after an out-of-memory: what its frames held goes back

    def _stage_line(self):
        return " ".join(f"{k} {v:.3f}s" for k, v in self.models.timings.items() if k not in ("load", "warm_up"))

    def _run(self, job):
        def progress(i):
            job.step = i + 1
            if job.cancel:
                raise Cancelled()
        state, png, error, input_error = "failed", None, None, False
        try:
            png = self._edit(job.request, progress, job)
            state = "done"
            # the stage times of this edit (what a request's latency is compared with), then inside denoise
            print(f"job {job.id} done: {self._stage_line()}", file=self.log)
            if self.models.step_times:
                print(f"job {job.id} denoise: modulation table {self.models.step_times['table']:.3f}s, steps "
                      + " ".join(f"{t:.3f}" for t in self.models.step_times["steps"]) + " s", file=self.log)
        except Cancelled:
            state, error = "cancelled", "the server is shutting down" if self._closing else "cancelled"
        except Exception as e:
            error, input_error = one_line(e), isinstance(e, (LoadError, PromptError))
            if not input_error:
                print(f"job {job.id} failed: {error}", file=self.log)
                traceback.print_exc(file=self.log)
        finally:
            job.request.images = None       # the uploads' bytes are not needed any more
        if state != "done":
            self._free()
        with self._cond:
            self._running = None
            self._finish(job, state, png, error, input_error)

    def _edit(self, request, progress, job=None):
        """EditRequest -> PNG bytes with the parameters as text, as `cli.py edit --prompt` writes them."""
        images = [decode_image(data, name) for data, name in zip(request.images, request.names)]
        opts = request.opts
        prompts = [request.prompt] + ([request.negative_prompt] if opts.cfg > 1 else [])
        t0 = time.perf_counter()
        rows = run_text_encoder(self.processor, self.text_encoder, [(images, prompts)], self.device,
                                plan=self.plan, spec=self.spec, streamed=self.plan is not None)[0]
        self.models.timings["text_encode"] = time.perf_counter() - t0   # its rows come back on the host: synced
        tensors = inputs.rows_to_tensors(rows)
        if job is not None and job.cancel:
            raise Cancelled()
        out = edit(self.models, images, tensors["prompt_embeds"], tensors.get("prompt_embeds_mask"),
                   tensors.get("negative_prompt_embeds"), tensors.get("negative_prompt_embeds_mask"), opts,
                   progress=progress)
        cfg_on = "negative_prompt_embeds" in tensors and opts.cfg > 1
        record = SimpleNamespace(prompt=request.prompt, negative_prompt=request.negative_prompt,
                                 images=request.names, seed=opts.seed, steps=opts.steps, cfg=opts.cfg,
                                 sampler=opts.sampler, text_weights=self.text_weights,
                                 text_encoder=self.text_encoder_file)
        return png_bytes(out, png_text(self.models, record, out.size, cfg_on))

    def _free(self):
        """After a failed or cancelled job: what its traceback's frames held is collected, and on CUDA the
        cached blocks go back, so the next job gets the memory an out-of-memory left behind. (Not after
        every job: a full collection of this process costs ~0.3 s.)"""
        gc.collect()
        if str(self.device).startswith("cuda"):
            torch.cuda.empty_cache()

    def _finish(self, job, state, png=None, error=None, input_error=False):
        """Under the lock: the job's final state; the oldest finished jobs beyond KEEP_FINISHED forgotten."""
        job.state, job.png, job.error, job.input_error = state, png, error, input_error
        if self._jobs.get(job.id) is job:      # a forgotten job (its POST /v1/edit client gone) takes no slot
            self._finished.append(job.id)
        while len(self._finished) > KEEP_FINISHED:
            self._jobs.pop(self._finished.popleft(), None)
        callbacks, job._done = job._done, []
        for fn in callbacks:
            fn()
