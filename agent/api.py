"""The local API: Open Inference Protocol (KServe v2 REST, with the binary tensor
extension), TensorFlow Serving's `:predict`, `/metrics`, and admin routes.

Served by `agent.serving.http` (asyncio + h11) on a Unix socket (mode from config, the agent's
group) and, when configured, a TCP port. On TCP every route needs
`Authorization: Bearer <token>` (compared in constant time), the token read from a file
only the agent's user can read. Two roles: the inference socket (mode `socket_mode`, the
agent's group) and TCP serve inference, health and metrics; the admin routes (install,
rollback, status) answer only on the admin socket (`admin_socket`, mode 0600 by default:
the agent's user, and root). Errors use the protocol's body `{"error": "..."}`; refusals add
`"reason"` (queue_full, deadline, memory, thermal) with HTTP 429 or 503. Bodies above
`max_body_bytes` get 413 before they are read. An install uploads the archive itself
(`max_upload_bytes`, streamed to staging): the daemon never opens a path a client names.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from agent import __version__
from agent.daemon import Agent
from agent.errors import (
    AgentError,
    ApiError,
    Busy,
    Refused,
    RejectedError,
    StoreError,
    UnknownModel,
)
from agent.logs import RateLimited
from agent.serving import tfs
from agent.serving.admission import PRIORITY
from agent.serving.heavy import HeavyGate, in_thread
from agent.serving.http import (
    BodyStream,
    Handler,
    HttpServer,
    Request,
    Response,
    Router,
    json_response,
)
from agent.serving.oip import infer_response, model_metadata, parse_infer
from agent.serving.scheduler import Resident
from agent.serving.shm import SharedMemory
from agent.trust.archive import GZIP_MAGIC, ZSTD_MAGIC
from agent.trust.bundle import read_manifest
from agent.trust.signatures import HEX64_PATTERN, NAME_PATTERN

log = logging.getLogger("edge_agent.api")
MODEL_NAME = re.compile(NAME_PATTERN)


#: Above this many bytes, parsing a request or encoding a response runs in a worker thread
#: (decoding 16 MB of JSON on the event loop stalled every other client for seconds), and
#: when that many bytes are JSON, through the heavy gate too (`agent.serving.heavy`).
OFF_LOOP_BYTES = 64 * 1024
#: Connections of the metrics listener (a scraper or two, health probes).
METRICS_MAX_CONNECTIONS = 8
T = TypeVar("T")


@functools.cache
def _openapi_document() -> bytes:
    return (resources.files("agent.serving") / "openapi.json").read_bytes()


UPLOAD_TYPES = frozenset({"application/octet-stream", "application/gzip", "application/zstd",
                          "application/x-tar"})
HEX64 = re.compile(HEX64_PATTERN)  # X-Bundle-Sha256, lower-cased first


async def _receive(stream: BodyStream, target: Path) -> str:
    """Write an uploaded archive to `target` (0600) as it arrives; its sha256.

    Raises:
        ApiError: empty, or its first bytes are neither gzip nor zstd (415).
        agent.serving.http._HttpError: from the stream (413 past the cap, 408 stalled,
            400 cut short), answered by the server.
    """
    digest, head = hashlib.sha256(), b""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        async for chunk in stream:
            if len(head) < 4:
                head += chunk[:4]
                if len(head) >= 4 and not head.startswith((GZIP_MAGIC, ZSTD_MAGIC)):
                    raise ApiError(415, "the body is neither a gzip nor a zstd archive "
                                   f"(starts {head[:4].hex()})")
            digest.update(chunk)
            out.write(chunk)  # page cache: the install verifies and fsyncs what it keeps
    if len(head) < 4:
        raise ApiError(400, f"the body holds {stream.size} bytes, not a bundle archive")
    return digest.hexdigest()


class Completions:
    """Results of worker threads handed to the event loop, one wake-up per burst.

    `asyncio.wrap_future` wakes the loop once per future (a self-pipe write and a loop
    turn each); a micro-batch completes eight futures at once. Here completions collect
    under a lock and the first of a burst schedules one callback that resolves them all."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._done: list[tuple[asyncio.Future[Any], Future[Any]]] = []

    def watch(self, fut: Future[T]) -> asyncio.Future[T]:
        """An asyncio future with `fut`'s outcome."""
        out: asyncio.Future[T] = self.loop.create_future()

        def done(f: Future[T]) -> None:
            with self._lock:
                self._done.append((out, f))
                first = len(self._done) == 1
            if first:
                self.loop.call_soon_threadsafe(self._resolve)

        fut.add_done_callback(done)
        return out

    def _resolve(self) -> None:
        with self._lock:
            done, self._done = self._done, []
        for out, f in done:
            if out.cancelled():  # the request went away (a drain, a closed connection)
                continue
            exc = f.exception()
            if exc is not None:
                out.set_exception(exc)
            else:
                out.set_result(f.result())


INFERENCE_SUFFIXES = ("/infer", ":predict", ":classify", ":regress")


def route_kind(path: str) -> str:
    """What an answer was for, so that traffic is counted apart from a scraper's and a
    health checker's: `inference`, `health`, `metrics` or `api` (metadata, repository,
    admin, unknown routes)."""
    route = path.split("?", maxsplit=1)[0]
    if route.startswith("/v2/health/"):
        return "health"
    if route == "/metrics":
        return "metrics"
    return "inference" if route.endswith(INFERENCE_SUFFIXES) else "api"


def _error(status: int, message: str, **extra: Any) -> Response:
    return json_response({"error": message, **extra}, status)


class Api:
    """The routes, bound to one agent."""

    def __init__(self, agent: Agent, token: str | None) -> None:
        self.agent = agent
        self.token = token
        self._errors = RateLimited(log, interval_s=60.0)
        self._http: HttpServer | None = None
        self._completions: Completions | None = None
        # Models a client unloaded through the repository API: not served (nor loaded
        # again by a request) until it loads them. In memory: a restart serves them again.
        self.unloaded: set[str] = set()
        api = agent.config.api
        self.shm = (SharedMemory(max_regions=api.shared_memory_max_regions,
                                 max_region_bytes=api.shared_memory_max_region_bytes)
                    if api.shared_memory else None)
        self.heavy = HeavyGate(api.heavy_json_share, on_wait=functools.partial(
            agent.metrics.inc, "edge_agent_http_heavy_wait_seconds_total"))
        self.router = Router()
        for method, path, handler in (
                ("GET", "/v2/health/live", self.live),
                ("GET", "/v2/health/ready", self.ready),
                ("GET", "/v2", self.server_metadata),
                ("GET", "/v2/models/{name}", self.metadata),
                ("GET", "/v2/models/{name}/versions/{version}", self.metadata),
                ("GET", "/v2/models/{name}/ready", self.model_ready),
                ("GET", "/v2/models/{name}/versions/{version}/ready", self.model_ready),
                ("POST", "/v2/models/{name}/infer", self.infer),
                ("POST", "/v2/models/{name}/versions/{version}/infer", self.infer),
                ("POST", "/v2/repository/index", self.repository_index),
                ("POST", "/v2/repository/models/{name}/load", self.repository_load),
                ("POST", "/v2/repository/models/{name}/unload", self.repository_unload),
                ("POST", "/v1/models/{name}:predict", self.predict),
                ("POST", "/v1/models/{name}/versions/{version}:predict", self.predict),
                ("POST", "/v1/models/{name}:classify", self.classify),
                ("POST", "/v1/models/{name}/versions/{version}:classify", self.classify),
                ("POST", "/v1/models/{name}:regress", self.regress),
                ("POST", "/v1/models/{name}/versions/{version}:regress", self.regress),
                ("GET", "/v1/models/{name}", self.model_status),
                ("GET", "/v1/models/{name}/versions/{version}", self.model_status),
                ("GET", "/v1/models/{name}/metadata", self.tfs_metadata),
                ("GET", "/v1/models/{name}/versions/{version}/metadata", self.tfs_metadata),
                ("GET", "/v1/models/{name}/labels/{label}", self.version_label),
                ("GET", "/v1/models/{name}/labels/{label}/metadata", self.version_label),
                ("POST", "/v1/models/{name}/labels/{label}:predict", self.version_label),
                ("POST", "/v1/models/{name}/labels/{label}:classify", self.version_label),
                ("POST", "/v1/models/{name}/labels/{label}:regress", self.version_label),
                ("GET", "/metrics", self.metrics),
                ("GET", "/openapi.json", self.openapi),
                ("POST", "/v1/admin/rollback", self.admin_rollback),
                ("GET", "/v1/admin/status", self.admin_status),
                ("GET", "/v2/systemsharedmemory/status", self.shm_status),
                ("GET", "/v2/systemsharedmemory/region/{region}/status", self.shm_status),
                ("POST", "/v2/systemsharedmemory/region/{region}/register", self.shm_register),
                ("POST", "/v2/systemsharedmemory/unregister", self.shm_unregister),
                ("POST", "/v2/systemsharedmemory/region/{region}/unregister",
                 self.shm_unregister)):
            self.router.add(method, path, handler)
        self.router.add("POST", "/v1/admin/install", self.admin_install,
                        stream_max_bytes=agent.config.api.max_upload_bytes)

    def server(self) -> HttpServer:
        api = self.agent.config.api
        self._http = HttpServer(self.router, max_body_bytes=api.max_body_bytes,
                                middleware=self.guard, authorize=self.authorize,
                                max_connections=api.max_connections,
                                caps={"admin": api.admin_max_connections},
                                head_timeout_s=api.head_timeout_s,
                                body_timeout_s=api.body_timeout_s,
                                idle_timeout_s=api.idle_timeout_s,
                                on_response=self.answered, parser=api.http_parser)
        self.agent.metrics.add_collector(self._http.samples)
        return self._http

    def metrics_server(self) -> HttpServer:
        """The metrics listener (`api.metrics_port`): /metrics and health, no token, no
        inference, no admin."""
        router = Router()
        for path, handler in (("/metrics", self.metrics), ("/v2/health/live", self.live),
                              ("/v2/health/ready", self.ready)):
            router.add("GET", path, handler)
        return HttpServer(router, max_body_bytes=1024, middleware=self.guard,
                          max_connections=METRICS_MAX_CONNECTIONS, head_timeout_s=5.0,
                          body_timeout_s=5.0,
                          idle_timeout_s=60.0, on_response=self.answered)

    def answered(self, method: str, path: str, status: int, body: bytes) -> None:
        """Count every answer by status; log errors, rate-limited per status and reason (a
        client looping on a bad request, or cycling through random paths, must not flood
        the journal): 5xx but 503 as errors, refusals (429, 503) and other 4xx as
        warnings."""
        self.agent.metrics.inc("edge_agent_http_responses_total", code=str(status),
                               kind=route_kind(path))
        if status < 400:
            return
        route = path.split("?", maxsplit=1)[0][:80]
        try:
            detail = json.loads(body)
            reason = detail.get("reason", "") if isinstance(detail, dict) else ""
            error = str(detail.get("error", ""))[:200] if isinstance(detail, dict) else ""
        except (ValueError, UnicodeDecodeError):
            reason, error = "", ""
        level = logging.ERROR if status >= 500 and status != 503 else logging.WARNING
        self._errors.log(level, f"{status} {reason}",
                         "http.error status=%d method=%s path=%s reason=%s error=%s", status,
                         method, route, reason or "-", json.dumps(error))

    def authorize(self, headers: dict[str, str], unix: bool) -> str | None:
        """On TCP, the bearer token, checked on the request head before anything else."""
        if unix:
            return None
        sent = headers.get("authorization", "")
        if self.token is None or not hmac.compare_digest(sent.encode(),
                                                         f"Bearer {self.token}".encode()):
            return "a bearer token is required on TCP"
        return None

    async def guard(self, request: Request, handler: Handler) -> Response:
        """Admin routes on the admin socket only (inference clients, on the inference socket
        or TCP, get inference, health and metrics); every error a protocol body."""
        if request.path.startswith("/v1/admin/") and not request.admin:
            return _error(403 if request.unix else 404, "admin routes are served on the "
                          f"admin socket ({self.agent.config.api.admin_socket}) only")
        try:
            return await handler(request)
        except ApiError as exc:
            return _error(exc.status, str(exc))
        except Refused as exc:
            return _error(exc.status, str(exc), reason=exc.reason)
        except UnknownModel as exc:
            return _error(404, str(exc))
        except AgentError as exc:  # e.g. an unloaded model that no longer verifies
            return _error(503, str(exc), reason="unavailable")

    async def _model(self, request: Request) -> Resident:
        name = request.params["name"]
        if not MODEL_NAME.match(name):  # never a file name nor a label from raw input
            raise UnknownModel(name[:64] + ("…" if len(name) > 64 else ""))
        if name in self.unloaded:
            raise ApiError(404, f"model {name} was unloaded through the repository API: "
                           f"POST /v2/repository/models/{name}/load serves it again")
        entry = self.agent.scheduler.resident(name)
        if entry is None:  # installed but unloaded to make room: load it again
            loop = asyncio.get_running_loop()
            if await loop.run_in_executor(None, self.agent.ensure_loaded, name):
                entry = self.agent.scheduler.resident(name)
        if entry is None:
            raise UnknownModel(name)
        version = request.params.get("version")
        if version is not None and version != str(entry.manifest.version):
            raise ApiError(404, f"model {name} serves version {entry.manifest.version}, not "
                           f"{version}")
        return entry

    async def _run(self, name: str, x: Any, priority: str, timeout_ms: float | None) -> Any:
        timeout = (timeout_ms or self.agent.config.scheduler.default_deadline_ms) / 1000
        # Inline only when no other request is in progress or waiting: running the model on
        # the event loop would keep it unread (no batching, no overlap). Idle keep-alive
        # connections with nothing pending (a client's pool) do not count.
        lone = self._http is None or not self._http.others_active()
        submit = functools.partial(self.agent.scheduler.submit, name, x,
                                   priority=PRIORITY[priority], timeout_s=timeout, inline=lone)
        try:
            fut = submit()
        except UnknownModel:  # unloaded to make room since `_model` found it: load, retry
            loop = asyncio.get_running_loop()
            if not await loop.run_in_executor(None, self.agent.ensure_loaded, name):
                raise
            fut = submit()
        if fut.done():  # ran inline: no need for the loop's thread-safe wake-up
            return fut.result()
        if self._completions is None:
            self._completions = Completions(asyncio.get_running_loop())
        return await self._completions.watch(fut)

    # -- Open Inference Protocol ----------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        models = self.agent.scheduler.models()
        return json_response({"ready": bool(models)}, 200 if models else 503)

    async def server_metadata(self, request: Request) -> Response:
        extensions = ["binary_tensor_data", "model_repository"]
        if self.shm is not None:
            extensions.append("system_shared_memory")
        return json_response({"name": "edge-agent", "version": __version__,
                              "extensions": extensions})

    # -- system shared memory (Triton's extension; agent.serving.shm) ------------------
    def _shared_memory(self) -> SharedMemory:
        if self.shm is None:
            raise ApiError(400, "shared memory is not enabled on this agent "
                           "(api.shared_memory)")
        return self.shm

    async def shm_status(self, request: Request) -> Response:
        return json_response(self._shared_memory().status(request.peer,
                                                          request.params.get("region")))

    async def shm_register(self, request: Request) -> Response:
        shm = self._shared_memory()
        shm.register(request.peer, request.params["region"], self._json_body(request))
        return json_response({})

    async def shm_unregister(self, request: Request) -> Response:
        if request.body.strip():
            raise ApiError(400, "unregister takes an empty body")
        self._shared_memory().unregister(request.peer, request.params.get("region"))
        return json_response({})

    async def metadata(self, request: Request) -> Response:
        return json_response(model_metadata((await self._model(request)).manifest))

    async def model_ready(self, request: Request) -> Response:
        await self._model(request)
        return json_response({"ready": True})

    async def infer(self, request: Request) -> Response:
        entry = await self._model(request)
        header = request.headers.get("inference-header-content-length")
        try:
            header_length = int(header) if header is not None else None
        except ValueError as exc:
            raise ApiError(400, "Inference-Header-Content-Length must be an integer") from exc
        json_bytes = (len(request.body) if header_length is None else
                      min(max(0, header_length), len(request.body)))
        self._json_cap(json_bytes)
        req = await self._work(json_bytes, len(request.body), parse_infer, request.body,
                               entry.manifest, header_length,
                               lambda shape: self.agent.scheduler.precheck(entry.name, shape),
                               None if self.shm is None else self.shm.of(request.peer))
        y = await self._run(entry.name, req.x, req.priority, req.timeout_ms)
        body, head_len = await self._work(
            0 if req.binary_output or req.output_shm else y.nbytes, y.nbytes,
            functools.partial(infer_response, request_id=req.id, binary=req.binary_output,
                              output_shm=req.output_shm), entry.manifest, y)
        if head_len is None:
            return Response(200, body)
        return Response(200, body, "application/octet-stream",
                        {"inference-header-content-length": str(head_len)})

    async def repository_index(self, request: Request) -> Response:
        """The model repository extension's index (KServe v2 / Triton): every installed
        model with the version it serves; READY when loaded, else UNAVAILABLE with the
        reason (an unloaded model loads again on its next request). Body: optional
        `{"ready": true}` to list only the loaded ones."""
        ready_only = False
        if request.body.strip():
            body = self._json_body(request)
            ready = body.get("ready", False)
            if not isinstance(ready, bool) or set(body) - {"ready"}:
                raise ApiError(400, 'the index request takes only {"ready": true|false}')
            ready_only = ready
        loop = asyncio.get_running_loop()
        return json_response(await loop.run_in_executor(None, self._index, ready_only))

    def _index(self, ready_only: bool) -> list[dict[str, Any]]:
        resident = self.agent.scheduler.models()
        out = []
        for name in self.agent.store.models():
            entry = resident.get(name)
            if name in self.unloaded:
                if not ready_only:
                    out.append({"name": name, "version": "", "state": "UNAVAILABLE",
                                "reason": "unloaded through the repository API"})
                continue
            if entry is not None:
                out.append({"name": name, "version": str(entry.manifest.version),
                            "state": "READY", "reason": ""})
                continue
            if ready_only:
                continue
            where = self.agent.store.active_dir(name)
            try:
                version = str(read_manifest(where).version) if where else ""
            except AgentError:
                version = ""
            out.append({"name": name, "version": version, "state": "UNAVAILABLE",
                        "reason": "not loaded (memory budget or a failed load); a request "
                                  "loads it"})
        return out

    async def repository_load(self, request: Request) -> Response:
        """Load an installed model (the model repository extension): serve it again after
        an unload, or load one the memory budget had unloaded. Models come only from the
        signed store: no configuration or files in the body."""
        name = self._repository_name(request)
        self.unloaded.discard(name)
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self.agent.ensure_loaded, name):
            raise UnknownModel(f"{name} (only installed models load: install a signed "
                               "bundle first)")
        return json_response({})

    async def repository_unload(self, request: Request) -> Response:
        """Stop serving an installed model and free its memory until it is loaded again;
        it stays installed (an update or a rollback still reaches it)."""
        name = self._repository_name(request)
        if name not in self.agent.store.models():
            raise UnknownModel(name)
        self.unloaded.add(name)
        self.agent.scheduler.unload(name)
        return json_response({})

    def _repository_name(self, request: Request) -> str:
        name = request.params["name"]
        if not MODEL_NAME.match(name):
            raise UnknownModel(name[:64])
        if request.body.strip():
            body = self._json_body(request)
            params = body.get("parameters", {})
            # unload_dependents (tritonclient sends it on every unload): no model here has
            # dependents. Anything else would configure a model outside its signed bundle.
            if set(body) - {"parameters"} or not isinstance(params, dict) \
                    or set(params) - {"unload_dependents"} \
                    or not isinstance(params.get("unload_dependents", False), bool):
                raise ApiError(400, "load and unload take no parameters (but "
                               "unload_dependents, a boolean): a model's configuration is its "
                               "signed bundle")
        return name

    async def model_status(self, request: Request) -> Response:
        """TensorFlow Serving's model status (`GET /v1/models/{name}[/versions/{v}]`)."""
        entry = await self._model(request)
        return json_response({"model_version_status": [{
            "version": str(entry.manifest.version), "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}]})

    async def _work(self, json_bytes: int, size: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, parsing or encoding `size` bytes of which `json_bytes` are JSON:
        on the loop when small, in a worker thread when large, and through the heavy gate
        when the JSON is large (it holds the GIL throughout, wherever it runs)."""
        if size <= OFF_LOOP_BYTES:  # the common small request: no thread hand-off
            return fn(*args)
        if json_bytes <= OFF_LOOP_BYTES:  # binary tensors: numpy, which is quick
            return await in_thread(fn, *args)
        return await self.heavy.run(functools.partial(in_thread, fn, *args))

    def _json_cap(self, size: int) -> None:
        cap = self.agent.config.api.max_json_bytes
        if size > cap:
            raise ApiError(413, f"{size} bytes of JSON (at most {cap}); send large "
                           "tensors in the binary tensor extension")

    # -- TensorFlow Serving ---------------------------------------------------------------
    async def predict(self, request: Request) -> Response:
        entry = await self._model(request)
        self._json_cap(len(request.body))
        x, rows = await self._work(len(request.body), len(request.body), tfs.parse_predict,
                                   request.body, entry.manifest)
        y = await self._run(entry.name, x, "normal", None)
        return Response(200, await self._work(y.nbytes, y.nbytes, tfs.predict_response, y,
                                              rows))

    async def classify(self, request: Request) -> Response:
        """TF Serving's `:classify`: every class's label and score per example."""
        return await self._examples(request, "classify")

    async def regress(self, request: Request) -> Response:
        """TF Serving's `:regress`: one value per example."""
        return await self._examples(request, "regress")

    async def _examples(self, request: Request, verb: str) -> Response:
        entry = await self._model(request)
        self._json_cap(len(request.body))
        x = await self._work(len(request.body), len(request.body), tfs.parse_examples,
                             request.body, entry.manifest, verb)
        y = await self._run(entry.name, x, "normal", None)
        return Response(200, tfs.classify_response(entry.manifest, y) if verb == "classify"
                        else tfs.regress_response(y))

    async def tfs_metadata(self, request: Request) -> Response:
        """TF Serving's model metadata (`GET /v1/models/{name}[/versions/{v}]/metadata`)."""
        entry = await self._model(request)
        return json_response(tfs.model_metadata(entry.manifest))

    async def version_label(self, request: Request) -> Response:
        """TF Serving's version labels: the agent serves one version per model, so there
        are none; the answer says what to use."""
        name = request.params["name"][:64]
        raise ApiError(404, f"version labels are not supported (label "
                       f"{request.params['label'][:64]!r}): the agent serves one version per "
                       f"model; use /v1/models/{name} or /v1/models/{name}/versions/N")

    async def openapi(self, request: Request) -> Response:
        """This API described in OpenAPI 3 (docs/openapi.json, shipped in the package)."""
        return Response(200, _openapi_document())

    async def metrics(self, request: Request) -> Response:
        return Response(200, self.agent.metrics.render().encode(),
                        "text/plain; version=0.0.4; charset=utf-8")

    # -- admin (Unix socket only) ---------------------------------------------------------
    @staticmethod
    def _json_body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(request.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "body must be a JSON object") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        return body

    async def admin_install(self, request: Request) -> Response:
        """The bundle archive is the body: streamed into staging as it arrives (capped at
        `api.max_upload_bytes`; its magic checked on the first bytes, its sha256 against
        `X-Bundle-Sha256` when sent), then verified and installed off the event loop."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in UPLOAD_TYPES:
            raise ApiError(415, "send the bundle archive itself as the body (Content-Type "
                           "application/octet-stream); the daemon does not open paths "
                           "clients name")
        declared = request.headers.get("x-bundle-sha256")
        if declared is not None:
            declared = declared.lower()
            if not HEX64.fullmatch(declared):
                raise ApiError(400, "X-Bundle-Sha256 must be 64 hex digits")
        assert request.stream is not None  # a streamed route
        target = self.agent.store.upload_path()
        try:
            digest = await _receive(request.stream, target)
            if declared is not None and digest != declared:
                return _error(422, "the upload does not match X-Bundle-Sha256 (damaged in "
                              "transit)", reason="rejected", check="sha256")
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(None, self.agent.install, target)
        except ApiError:
            raise
        except Busy as exc:
            return _error(409, str(exc), reason="busy")
        except StoreError as exc:  # the device's storage, not the bundle: try again later
            return _error(503, str(exc), reason="store")
        except RejectedError as exc:
            return _error(422, str(exc), reason="rejected", check=exc.check)
        except AgentError as exc:
            return _error(422, str(exc), reason="failed")
        finally:
            target.unlink(missing_ok=True)
        return json_response({"model": result.model, "version": result.version,
                              "previous": result.previous, "selftest": result.selftest})

    async def admin_rollback(self, request: Request) -> Response:
        body = self._json_body(request)
        name = body.get("model")
        if not isinstance(name, str):
            raise ApiError(400, "body needs 'model'")
        loop = asyncio.get_running_loop()
        try:
            note = await loop.run_in_executor(None, self.agent.roll_back, name,
                                              str(body.get("reason", "local request")))
        except AgentError as exc:
            return _error(409, str(exc))
        return json_response({"result": note})

    async def admin_status(self, request: Request) -> Response:
        return json_response(self.agent.status())
