"""`cli.py serve`: the models loaded once and kept warm behind an HTTP API and one web page.

    build(args) checks what can be checked without loading (the serve extra, host and token, snapshot,
    LoRAs, --transformer, --text-encoder, the VRAM plan), binds the socket and returns (uvicorn server, socket, worker);
    serve(args) runs it until interrupted. The models load on the worker's thread while /health answers
    "loading"; a load or warm-up that fails stops the server with its one-line error.
Starlette, uvicorn and python-multipart are the optional extra `serve`, imported only here."""
import importlib.util
import ipaddress
import socket
import sys
import threading

from loaders import LoadError

EXTRA = 'pip install -e ".[serve]"'


def missing_packages():
    wanted = [("starlette", "starlette"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart")]
    found = lambda mod: importlib.util.find_spec(mod) is not None or (mod == "python_multipart" and
                                                                      importlib.util.find_spec("multipart"))
    return [name for mod, name in wanted if not found(mod)]


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host, port):
    """A bound, listening socket (port 0: any free one), or one line saying why not."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise LoadError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def prepare(args):
    """(Worker, Limits) from the serve arguments, every cheap check done; nothing loaded yet."""
    from engine.pipelines import inputs, pipeline_for
    from engine.server.form import Limits
    from engine.server.worker import Worker
    from loaders import Snapshot
    missing = missing_packages()
    if missing:
        raise LoadError(f"`serve` needs {', '.join(missing)}: {EXTRA}")
    if not is_loopback(args.host) and not args.token:
        raise LoadError(f"--host {args.host} is not a loopback address: give --token T (or QIE_SERVE_TOKEN), "
                        "then every request must send Authorization: Bearer T")
    if args.queue < 1:
        raise LoadError(f"--queue must be at least 1, got {args.queue}")
    if args.max_pixels < 256 * 256:
        raise LoadError(f"--max-pixels must be at least {256 * 256}, got {args.max_pixels}")
    spec = pipeline_for(args.model)
    if spec.max_images < 1:     # a text-to-image snapshot (Qwen-Image): not an edit model
        raise LoadError(f"{args.model}: {spec.class_name} makes images from text; `serve` runs the edit pipelines")
    Snapshot(args.model).require("transformer", "vae", "scheduler", "text_encoder")
    loras = inputs.read_loras(args.lora, args.model)
    inputs.check_transformer(args.transformer, args.model)
    inputs.check_text_encoder(getattr(args, "text_encoder", None), args.model)
    plan, max_pixels, why = None, args.max_pixels, "--max-pixels"
    if args.vram:
        if args.device != "cuda":
            raise LoadError("--vram plans GPU memory; use it with --device cuda")
        from engine.pipelines.budget import fp8_blocks, fp8_text, resolve_budget
        from engine.server.plan import serve_plan, summary
        plan, max_pixels = serve_plan(args.model, resolve_budget(args.vram), args.dtype, args.max_pixels,
                                      fp8=fp8_blocks(args), text_fp8=fp8_text(args))
        why = f"what --vram {args.vram} fits"
        print(summary(plan, max_pixels), file=sys.stderr)
    worker = Worker(args.model, args.device, args.dtype, loras, args.transformer, plan, args.queue,
                    weights=getattr(args, "weights", None), text_weights=getattr(args, "text_weights", None),
                    text_encoder_file=getattr(args, "text_encoder", None), mod_cache=getattr(args, "mod_cache", None))
    return worker, Limits(spec, max_pixels, why)


def build(args):
    """(uvicorn.Server, listening socket, Worker): run with server.run(sockets=[sock]) after worker.start()."""
    worker, limits = prepare(args)
    import uvicorn

    from engine.server.app import create_app

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # from a signal handler: the worker's lock is taken on another thread; queued jobs are
            # cancelled and the running one stops at its next step, so waiting requests answer at once
            threading.Thread(target=worker.close, daemon=True).start()
            super().handle_exit(sig, frame)

    sock = listen(args.host, args.port)
    config = uvicorn.Config(create_app(worker, limits, args.token, host=args.host), log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=10)
    server = Server(config)
    worker.on_fatal = lambda: setattr(server, "should_exit", True)
    return server, sock, worker


def serve(args):
    server, sock, worker = build(args)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    worker.start()
    print(f"serving {worker.model} ({worker.spec.class_name}) at {url} (loading; GET /health says when ready)",
          file=sys.stderr)
    try:
        server.run(sockets=[sock])
    finally:
        worker.close()
        sock.close()
    if worker.startup_error:
        raise LoadError(worker.startup_error)
