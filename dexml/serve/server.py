"""`dexml serve`: a bundle behind HTTP (FastAPI on uvicorn), following production. No torch.

    POST /predict  {"texts": [...], "k": 5} -> {"bundle": ID, "release": NAME, "k": k,
                   "predictions": [[{"uid", "title", "score"}, ...] one list per text]}
    GET  /healthz  200 while the process runs
    GET  /readyz   200 once a verified bundle is loaded and warmed (503 before, and while draining)
    GET  /metrics  Prometheus text: requests, errors by kind, latency, batch sizes, the bundle served,
                   reloads refused
    GET  /docs     the OpenAPI page (/openapi.json)

Micro-batching: requests wait in a bounded queue (`serve.queue_size`; full: 503 + Retry-After);
one worker takes the first, gathers more for at most `max_wait_ms` up to `max_batch` texts, and
answers them all with one `Predictor.predict` call (k = the largest asked; each request gets
its own top k of it). A request that waits longer than `timeout_s` in all gets 504.

Following production: a watcher thread checks the bundle path every `watch_interval_s` (where
the symlink points and the manifest's inode, size and mtime). On a change it loads the bundle
the path resolves to, verifies it (checksums, as Predictor does), warms it (index, labels, one
prediction), then swaps it in with one reference assignment: a batch already running finishes
on the bundle it started with; the next one uses the new bundle. A bundle that fails is refused
(logged, counted in /metrics as dexml_bundle_reloads_total{result="refused"}) and the old one
keeps serving; the same refused bundle is not retried until the path changes again or SIGHUP
(which forces a reload). SIGTERM: /readyz turns 503, no new connections are accepted, requests in
flight are answered (up to `drain_s`), then the process exits 0.

Every response to /predict names the bundle it was answered from: `bundle` is the first 12 hex
digits of the sha256 of its manifest.json (what `dexml promote` names releases after), `release`
the directory the path resolved to.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dexml import paths
from dexml.config import ServeParams, check_serve
from dexml.errors import BundleError, DexmlError, require_optional
from dexml.serve.bundle import MANIFEST_FILE, verify_bundle
from dexml.serve.predictor import Predictor, text_problem

fastapi = require_optional("fastapi")
uvicorn = require_optional("uvicorn")
prometheus = require_optional("prometheus_client")
pydantic = require_optional("pydantic")  # installed with fastapi

log = logging.getLogger("dexml.serve")
ID_DIGITS = 12


# --- the bundle being served ---------------------------------------------------------------

@dataclass(frozen=True)
class Loaded:
    """A verified, warmed bundle. Immutable: swapping bundles swaps the whole object."""
    predictor: Predictor
    id: str  # sha256 of manifest.json, first ID_DIGITS hex digits
    release: str  # name of the directory the bundle path resolved to
    directory: Path
    num_labels: int
    key: tuple  # what the watcher compares (bundle_key)


def bundle_key(path: str | Path) -> tuple | None:
    """(resolved directory, manifest inode, size, mtime): changes when promote/rollback moves the
    symlink or a stage rewrites the manifest; None when there is no manifest to read."""
    real = os.path.realpath(path)
    try:
        st = os.stat(os.path.join(real, MANIFEST_FILE))
    except OSError:
        return None
    return real, st.st_ino, st.st_size, st.st_mtime_ns


def load_bundle(path: str | Path, settings: ServeParams) -> Loaded:
    """Resolve `path` once, verify, load and warm that bundle (BundleError when it fails)."""
    key = bundle_key(path)
    if key is None:
        raise BundleError(f"bundle {path}: no {MANIFEST_FILE} (not a complete bundle, or the link points nowhere)")
    real = Path(key[0])

    def digest() -> str:
        try:
            return hashlib.sha256((real / MANIFEST_FILE).read_bytes()).hexdigest()[:ID_DIGITS]
        except OSError as e:
            raise BundleError(f"bundle {real}: cannot read {MANIFEST_FILE} ({e.strerror or e})") from None

    before = digest()
    verify_bundle(real)
    predictor = Predictor(real, verify=False, int8=settings.int8, max_k=settings.max_k,
                          threads=settings.threads or None)
    predictor.predict(["warm up"] * min(settings.max_batch, 8), k=1)  # loads index, labels, memory
    if digest() != before:
        raise BundleError(f"bundle {real}: {MANIFEST_FILE} changed while it was being loaded")
    return Loaded(predictor, before, real.name, real, predictor.index.ntotal, key)


# --- errors answered as JSON ------------------------------------------------------------------

class ApiError(Exception):
    """A request refused with `status`; `kind` labels it in /metrics."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers, self.extra = status, kind, message, headers, extra

    def response(self):
        body = {"error": {"kind": self.kind, "message": self.message, **self.extra}}
        return fastapi.responses.JSONResponse(body, self.status, headers=self.headers)


def limit_error(limit: str, value: int, what: str) -> ApiError:
    return ApiError(413, "limit", f"{what}: the limit serve.{limit} is {value}", limit=f"serve.{limit}", value=value)


def parse_request(body: bytes, settings: ServeParams, num_labels: int) -> tuple[list[str], int]:
    """(texts, k) from a /predict body, or ApiError naming what is wrong."""
    expected = 'expected a JSON object {"texts": ["...", ...], "k": 5}'
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ApiError(400, "bad_json", f"the request body is not valid JSON ({e}); {expected}") from None
    if not isinstance(obj, dict):
        raise ApiError(422, "invalid", f"{expected}, got a JSON {type(obj).__name__}")
    unknown = sorted(set(obj) - {"texts", "k"})
    if unknown:
        raise ApiError(422, "invalid", f"unknown field(s) {', '.join(map(repr, unknown))}; {expected}")
    texts = obj.get("texts")
    if not isinstance(texts, list):
        raise ApiError(422, "invalid", f"`texts`: expected a list of strings, got "
                       f"{'nothing' if texts is None else type(texts).__name__}")
    if not texts:
        raise ApiError(422, "invalid", "`texts`: expected at least one text, got an empty list")
    if len(texts) > settings.max_texts:
        raise limit_error("max_texts", settings.max_texts, f"`texts`: {len(texts)} texts in one request")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ApiError(422, "invalid", f"`texts[{i}]`: expected a string, got {type(text).__name__}")
        if len(text) > settings.max_chars:
            raise limit_error("max_chars", settings.max_chars, f"`texts[{i}]`: {len(text)} characters")
        problem = text_problem(text) or (None if text.strip() else "empty or whitespace-only text: nothing to classify")
        if problem:
            raise ApiError(422, "invalid", f"`texts[{i}]`: {problem}")
    k = obj.get("k", settings.default_k)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ApiError(422, "invalid", f"`k`: expected a positive integer, got {json.dumps(k)}")
    if k > settings.max_k:
        raise ApiError(422, "invalid", f"`k`: at most {settings.max_k} labels per text (serve.max_k), got {k}",
                       limit="serve.max_k", value=settings.max_k)
    if k > num_labels:
        raise ApiError(422, "invalid", f"`k`: the bundle has {num_labels} labels, got k = {k}")
    return texts, k


# --- micro-batching ---------------------------------------------------------------------------

@dataclass
class Job:
    texts: list[str]
    k: int
    future: asyncio.Future


class Metrics:
    """The service's Prometheus metrics, in their own registry (several apps in one process)."""

    def __init__(self):
        r = self.registry = prometheus.CollectorRegistry()
        self.requests = prometheus.Counter("dexml_requests", "POST /predict requests by HTTP status",
                                           ["status"], registry=r)
        self.errors = prometheus.Counter("dexml_request_errors", "refused or failed /predict requests by kind "
                                         "(bad_json, invalid, limit, overloaded, timeout, not_ready, internal)",
                                         ["kind"], registry=r)
        self.latency = prometheus.Histogram("dexml_request_seconds", "POST /predict latency, queueing included",
                                            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                            registry=r)
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
        self.batch_texts = prometheus.Histogram("dexml_batch_texts", "texts per encoder call", buckets=sizes,
                                                registry=r)
        self.batch_requests = prometheus.Histogram("dexml_batch_requests", "requests per encoder call",
                                                   buckets=sizes, registry=r)
        self.queued = prometheus.Gauge("dexml_queue_requests", "requests waiting for the encoder", registry=r)
        self.bundle = prometheus.Gauge("dexml_bundle_info", "the bundle being served (value 1)",
                                       ["bundle", "release"], registry=r)
        self.reloads = prometheus.Counter("dexml_bundle_reloads", "bundle loads by result (swapped, refused)",
                                          ["result"], registry=r)
        self.ready = prometheus.Gauge("dexml_ready", "1 when a verified bundle is loaded and warmed", registry=r)
        for result in ("swapped", "refused"):
            self.reloads.labels(result)


class Service:
    """The state behind the app: the current bundle, the queue and its worker, the watcher."""

    def __init__(self, bundle_path: str | Path, settings: ServeParams):
        check_serve(settings)
        self.path = Path(bundle_path)
        self.settings = settings
        self.metrics = Metrics()
        self.current: Loaded | None = None
        self.last_error: str | None = None
        self.draining = False
        self._seen_key = None
        self._reload = threading.Event()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._carry: Job | None = None

    # the watcher (a thread: verification and warm-up must not block the event loop)
    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.settings.queue_size)
        self.metrics.queued.set_function(self._queue.qsize)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dexml-encoder")
        self._worker = asyncio.get_running_loop().create_task(self._run_batches())
        self._watcher = threading.Thread(target=self._watch, name="dexml-bundle-watcher", daemon=True)
        self._watcher.start()

    async def stop(self) -> None:
        self._stop.set()
        self._reload.set()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.join, 10)

    def request_reload(self) -> None:
        """Load the bundle again now, changed or not (SIGHUP). Safe from a signal handler."""
        self._reload.set()

    def _watch(self) -> None:
        forced = True  # the first load
        while not self._stop.is_set():
            key = bundle_key(self.path)
            if forced or key != self._seen_key or self.current is None:  # not ready: keep trying
                self._seen_key = key
                self.reload("start" if self.current is None and forced else "SIGHUP" if forced else "changed")
            forced = self._reload.wait(self.settings.watch_interval_s)
            self._reload.clear()
            if self._stop.is_set():
                return

    def reload(self, reason: str) -> bool:
        """Load, verify and warm the bundle the path resolves to now; swap it in if it passes."""
        start = time.perf_counter()
        try:
            loaded = load_bundle(self.path, self.settings)
        except DexmlError as e:
            self.last_error = str(e)
            self.metrics.reloads.labels("refused").inc()
            log.error("bundle refused (%s): %s; %s", reason, e,
                      f"still serving {self.current.id} ({self.current.release})" if self.current else "not ready")
            return False
        except Exception as e:  # onnxruntime/faiss raise untyped errors on corrupt files
            self.last_error = f"{type(e).__name__}: {e}"
            self.metrics.reloads.labels("refused").inc()
            log.exception("bundle refused (%s); %s", reason,
                          f"still serving {self.current.id}" if self.current else "not ready")
            return False
        self._seen_key = loaded.key
        old, self.current = self.current, loaded  # the swap: one reference assignment
        self.last_error = None
        self.metrics.reloads.labels("swapped").inc()
        self.metrics.bundle.clear()
        self.metrics.bundle.labels(loaded.id, loaded.release).set(1)
        self.metrics.ready.set(1)
        log.info("serving bundle %s (%s, %d labels; %s, loaded and warmed in %.2f s)%s", loaded.id, loaded.release,
                 loaded.num_labels, reason, time.perf_counter() - start,
                 f"; was {old.id} ({old.release})" if old else "")
        return True

    # the queue and its worker
    def submit(self, texts: list[str], k: int) -> asyncio.Future:
        job = Job(texts, k, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise ApiError(503, "overloaded", f"the server is busy: {self.settings.queue_size} requests are "
                           "waiting (serve.queue_size); retry shortly", headers={"Retry-After": "1"},
                           limit="serve.queue_size", value=self.settings.queue_size) from None
        return job.future

    async def _next_batch(self) -> list[Job]:
        """The first waiting job, then more for at most max_wait_ms, up to max_batch texts."""
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, n = [first], len(first.texts)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.max_wait_ms / 1000
        while n < self.settings.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if n + len(job.texts) > self.settings.max_batch:
                self._carry = job  # starts the next batch
                break
            batch.append(job)
            n += len(job.texts)
        return [job for job in batch if not job.future.done()]  # timed out while waiting

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            loaded = self.current  # this batch finishes on this bundle, whatever is swapped in meanwhile
            texts = [t for job in batch for t in job.texts]
            k = max(job.k for job in batch)
            self.metrics.batch_texts.observe(len(texts))
            self.metrics.batch_requests.observe(len(batch))
            try:
                preds = await loop.run_in_executor(self._executor, loaded.predictor.predict, texts, k)
            except Exception as e:  # answered as 500s; the worker keeps going
                log.exception("prediction failed for a batch of %d texts", len(texts))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            start = 0
            for job in batch:
                rows = preds[start:start + len(job.texts)]
                start += len(job.texts)
                if not job.future.done():
                    job.future.set_result((loaded, [row[:job.k] for row in rows]))

    async def predict(self, request) -> object:
        started = time.monotonic()
        loaded = self.current
        if loaded is None:
            raise ApiError(503, "not_ready", "no bundle loaded yet" + (f" ({self.last_error})" if self.last_error
                           else ""), headers={"Retry-After": "1"})
        body = await read_body(request, self.settings.max_body_bytes)
        texts, k = parse_request(body, self.settings, loaded.num_labels)
        future = self.submit(texts, k)
        try:
            remaining = self.settings.timeout_s - (time.monotonic() - started)
            served, rows = await asyncio.wait_for(future, max(remaining, 0.001))
        except TimeoutError:
            raise ApiError(504, "timeout", f"no answer within serve.timeout_s = {self.settings.timeout_s:g} s "
                           "(the server is overloaded)", limit="serve.timeout_s", value=self.settings.timeout_s) from None
        body = {"bundle": served.id, "release": served.release, "k": k,
                "predictions": [[{"uid": u, "title": t, "score": round(s, 6)} for u, t, s in row] for row in rows]}
        return fastapi.responses.Response(json.dumps(body, ensure_ascii=False), media_type="application/json",
                                          headers={"X-Dexml-Bundle": served.id})


async def read_body(request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise limit_error("max_body_bytes", limit, f"a request body of {declared} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise limit_error("max_body_bytes", limit, "the request body")
    return bytes(body)


# --- the app ------------------------------------------------------------------------------------

class Label(pydantic.BaseModel):
    uid: str
    title: str
    score: float


class PredictRequest(pydantic.BaseModel):
    texts: list[str] = pydantic.Field(description="texts to classify (non-empty; serve.max_texts at most, "
                                      "serve.max_chars characters each)", examples=[["vim emacs editor"]])
    k: int = pydantic.Field(5, description="labels per text (1..serve.max_k and at most the bundle's label "
                            "count; default serve.default_k)")


class PredictResponse(pydantic.BaseModel):
    bundle: str = pydantic.Field(description="sha256 of the serving bundle's manifest.json, first 12 hex digits")
    release: str = pydantic.Field(description="the directory the bundle path resolved to")
    k: int
    predictions: list[list[Label]] = pydantic.Field(description="per text, its top k labels, best first")


def create_app(bundle_path: str | Path, settings: ServeParams | None = None):
    """The ASGI app serving `bundle_path` (watched for new bundles while the app runs)."""
    service = Service(bundle_path, settings or ServeParams())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        await service.stop()

    app = fastapi.FastAPI(title="dexml", description="Top labels for texts from a dexml bundle "
                          "(extreme multi-label classification).", lifespan=lifespan)
    app.state.service = service
    errors = {status: {"description": what} for status, what in (
        (400, "malformed JSON"), (413, "a limit exceeded (texts, characters, body bytes)"),
        (422, "wrong types, empty texts, k out of range"), (503, "queue full or no bundle yet (Retry-After)"),
        (504, "no answer within serve.timeout_s"))}

    @app.post("/predict", response_model=PredictResponse, responses=errors,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": PredictRequest.model_json_schema()}}}})
    async def predict(request: fastapi.Request):
        start = time.perf_counter()
        try:
            response = await service.predict(request)
        except ApiError as e:
            response = e.response()
            service.metrics.errors.labels(e.kind).inc()
        except Exception:  # never a bare 500 page; the message stays in the log
            log.exception("POST /predict failed")
            response = ApiError(500, "internal", "internal error (see the server log)").response()
            service.metrics.errors.labels("internal").inc()
        service.metrics.requests.labels(str(response.status_code)).inc()
        service.metrics.latency.observe(time.perf_counter() - start)
        return response

    @app.get("/healthz")
    async def healthz():
        return {"alive": True}

    @app.get("/readyz")
    async def readyz():
        loaded = service.current
        if loaded is None or service.draining:
            reason = "draining" if service.draining else service.last_error or "loading the bundle"
            return fastapi.responses.JSONResponse({"ready": False, "reason": reason}, 503)
        return {"ready": True, "bundle": loaded.id, "release": loaded.release, "labels": loaded.num_labels,
                "last_refused": service.last_error}

    @app.get("/metrics")
    async def metrics():
        return fastapi.responses.Response(prometheus.generate_latest(service.metrics.registry),
                                          media_type=prometheus.CONTENT_TYPE_LATEST)

    return app


class Server(uvicorn.Server):
    """uvicorn's server; a signal to exit first marks the service as draining (/readyz 503)."""

    def __init__(self, app, settings: ServeParams, log_level: str = "info", access_log: bool = False):
        super().__init__(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                                        access_log=access_log, timeout_graceful_shutdown=settings.drain_s,
                                        lifespan="on"))
        self.service: Service = app.state.service

    def handle_exit(self, sig, frame) -> None:
        self.service.draining = True
        super().handle_exit(sig, frame)


# --- `dexml serve` --------------------------------------------------------------------------------

FLAGS = ("host", "port", "max_batch", "max_wait_ms", "threads")


def add_arguments(parser) -> None:
    parser.add_argument("--bundle", default=f"{paths.PRODUCTION_DIR}/current",
                        help="the bundle directory or the symlink to follow (default: %(default)s, what "
                             "`dexml promote` and `dexml rollback` move)")
    parser.add_argument("--host", help="address to listen on (default: serve.host)")
    parser.add_argument("--port", type=int, help="port (default: serve.port; 0 = any free port)")
    parser.add_argument("--max-batch", type=int, help="texts per encoder call (default: serve.max_batch; 1 = "
                        "no micro-batching)")
    parser.add_argument("--max-wait-ms", type=float, help="how long a batch waits for more requests "
                        "(default: serve.max_wait_ms)")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: serve.threads)")
    parser.add_argument("--int8", action="store_true", default=None, help="serve the int8 query encoder")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--access-log", action="store_true", help="log every request (off: only bundle swaps, "
                        "refusals and errors)")


def main(args, params) -> int:
    overrides = {name: getattr(args, name) for name in (*FLAGS, "int8") if getattr(args, name) is not None}
    settings = dataclasses.replace(params.serve, **overrides)
    check_serve(settings)
    verify_bundle(os.path.realpath(args.bundle))  # a bad bundle fails here, before the port opens
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("dexml.serve").setLevel(args.log_level.upper())
    server = Server(create_app(args.bundle, settings), settings, args.log_level, args.access_log)
    # uvicorn re-raises the exit signal after its graceful shutdown; with these handlers in
    # place that ends quietly, so a drained SIGTERM exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    signal.signal(signal.SIGHUP, lambda *_: server.service.request_reload())
    server.run()
    return 0
