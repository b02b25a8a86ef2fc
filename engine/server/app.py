"""The HTTP face, a thin skin over the worker: each route reads the request, checks it into the pipeline's
options (engine/server/form.py), hands it to the worker and answers. Errors are {"error": "<one line>"}.
No route touches torch; the worker's thread owns it."""
import asyncio
import contextlib
import hmac
import sys
import traceback
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.server.form import FIELDS, MAX_IMAGES, MAX_UPLOAD, ApiError, parse_edit
from engine.server.worker import KEEP_FINISHED, NotReady, QueueFull

PAGE = Path(__file__).with_name("page.html")
# the page is self-contained: its inline script and style, the API on this origin, result images as blobs
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob: data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DECODES = 2             # uploads decoded at once (a 100 MP image decodes to 300 MB)


def error(status, message, headers=None):
    return JSONResponse({"error": message}, status, headers=headers)


class BearerToken:
    """Every request must carry `Authorization: Bearer <token>` (compared in constant time), else 401."""

    def __init__(self, app, token):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error(401, "this server needs its token: send the header Authorization: Bearer <token>",
                                 {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")


def _split_host(netloc):
    """'Host' header or URL netloc -> (host lowercased without brackets, port str or '')."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    host, _, port = netloc.rpartition(":") if netloc.count(":") == 1 else (netloc, "", "")
    return host, port


class SameOrigin:
    """Against other web pages (no token on loopback: any page can POST a multipart form, which needs no
    CORS preflight, and DNS rebinding lets it read the answers): a request whose Host header does not name
    this server (127.0.0.1, localhost, [::1] or the --host address, any port) is 403, and a POST/DELETE
    whose Origin header is not this server's own origin (scheme://Host) is 403. Clients that are not
    browsers send no Origin; the page (same origin) sends its own. --host 0.0.0.0/:: (which needs a
    token) takes any Host."""

    def __init__(self, app, host):
        host = host.strip("[]").lower()
        self.app, self.any_host = app, host in ("0.0.0.0", "::", "")
        self.names = set(LOOPBACK_NAMES) | {host}

    def refusal(self, scope):
        headers = dict(scope["headers"])
        given = headers.get(b"host", b"").decode("latin-1")
        name, _ = _split_host(given)
        if not self.any_host and name not in self.names:
            return f"this server answers requests for {' / '.join(sorted(self.names))} only, not Host {given[:80]!r}"
        origin = headers.get(b"origin")
        if origin is not None and scope["method"] in UNSAFE:
            origin = origin.decode("latin-1").strip()
            scheme, _, netloc = origin.partition("://")
            default = {"http": "80", "https": "443"}.get(scheme.lower())
            same = lambda a, b: (a[0], a[1] or default) == (b[0], b[1] or default)
            if default is None or "/" in netloc or not given or not same(_split_host(netloc), _split_host(given)):
                return (f"cross-origin {scope['method']} from {origin[:80]!r} refused: use this server's own page "
                        "or a client that is not a browser")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            why = self.refusal(scope)
            if why:
                return await error(403, why)(scope, receive, send)
        await self.app(scope, receive, send)


async def read_form(request):
    """The multipart body, at most MAX_UPLOAD bytes -> {field: [str or (bytes, filename), ...]}."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_UPLOAD:
        raise ApiError(413, f"the upload is {int(length) / 2 ** 20:.1f} MiB, over the {MAX_UPLOAD // 2 ** 20} MiB limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_UPLOAD:
            raise ApiError(413, f"the upload is over the {MAX_UPLOAD // 2 ** 20} MiB limit")
    if not request.headers.get("content-type", "").startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError(400, f"send the edit as multipart/form-data with the fields {', '.join(FIELDS)}")

    async def replay():
        return {"type": "http.request", "body": bytes(body), "more_body": False}
    try:
        form = await Request(request.scope, replay).form(max_files=MAX_IMAGES, max_fields=4 * len(FIELDS))
    except HTTPException as e:
        detail = f"at most {MAX_IMAGES} images per request" if "Too many files" in e.detail else e.detail
        raise ApiError(400, f"malformed form: {detail}") from None
    try:
        fields = {}
        for key, value in form.multi_items():
            item = (await value.read(), value.filename) if isinstance(value, UploadFile) else value
            fields.setdefault(key, []).append(item)
        return fields
    finally:
        await form.close()


def create_app(worker, limits, token=None, log=sys.stderr, host="127.0.0.1"):
    """The Starlette app over a Worker (started by the caller); limits: engine.server.form.Limits; host: the
    address it is served on (--host), for the Host/Origin check (SameOrigin)."""
    page = PAGE.read_bytes()

    async def submit(request):
        if worker.refusal():                    # before reading a body that cannot be run
            raise ApiError(503, worker.refusal())
        fields = await read_form(request)
        edit = await anyio.to_thread.run_sync(parse_edit, fields, limits, limiter=request.app.state.decodes)
        return worker.submit(edit)

    async def finished(request, job):
        """Wait for the job; True if it finished, False if the client went away first (job then cancelled)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        worker.when_finished(job, lambda: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None)))

        async def gone():
            while (await request.receive())["type"] != "http.disconnect":
                pass
        watch = asyncio.ensure_future(gone())
        await asyncio.wait({done, watch}, return_when=asyncio.FIRST_COMPLETED)
        watch.cancel()
        if not done.done():
            worker.cancel(job.id)
            return False
        return True

    async def edit_now(request):
        job = await submit(request)
        try:
            if not await finished(request, job):
                return Response(status_code=499)     # nobody is listening
        finally:
            worker.forget(job.id)
        if job.state == "done":
            return Response(job.png, media_type="image/png", headers={"Cache-Control": "no-store"})
        if job.state == "cancelled":
            return error(503, job.error)
        return error(422 if job.input_error else 500, job.error)

    async def new_job(request):
        job = await submit(request)
        return JSONResponse(job.view(worker.get(job.id)[1]), 202)

    def find(request):
        job, position = worker.get(request.path_params["id"])
        if job is None:
            raise ApiError(404, f"no job {request.path_params['id'][:40]!r} (finished jobs are kept for the last "
                                f"{KEEP_FINISHED})")
        return job, position

    async def job_state(request):
        job, position = find(request)
        if request.method == "DELETE":
            if job.state in ("done", "failed"):
                raise ApiError(409, f"job {job.id} has already {'finished' if job.state == 'done' else 'failed'}")
            worker.cancel(job.id)
        return JSONResponse(job.view(position))

    async def job_image(request):
        job, _ = find(request)
        if job.state != "done":
            why = f": {job.error}" if job.error else "; its image is not ready yet"
            raise ApiError(409, f"job {job.id} is {job.state}{why}")
        return Response(job.png, media_type="image/png", headers={
            "Content-Disposition": f'inline; filename="edit-{job.id}.png"', "Cache-Control": "no-store"})

    async def health(request):
        return JSONResponse({**worker.health(), "max_images": limits.spec.max_images,
                             "max_pixels": limits.max_pixels, "max_pixels_from": limits.why})

    async def home(request):
        return Response(page, media_type="text/html; charset=utf-8", headers={
            "Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.decodes = anyio.CapacityLimiter(DECODES)
        yield

    def api_error(request, e):
        return error(e.status, str(e))

    def internal(request, e):
        print(f"error in {request.method} {request.url.path}: {type(e).__name__}: {e}", file=log)
        traceback.print_exception(e, file=log)
        return error(500, f"internal error: {type(e).__name__}")

    routes = [Route("/", home), Route("/health", health), Route("/v1/edit", edit_now, methods=["POST"]),
              Route("/v1/jobs", new_job, methods=["POST"]),
              Route("/v1/jobs/{id}", job_state, methods=["GET", "DELETE"]), Route("/v1/jobs/{id}/image", job_image)]
    handlers = {ApiError: api_error, HTTPException: lambda r, e: error(e.status_code, str(e.detail)),
                QueueFull: lambda r, e: error(429, str(e)), NotReady: lambda r, e: error(503, str(e)),
                Exception: internal}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    return SameOrigin(BearerToken(app, token) if token else app, host)
