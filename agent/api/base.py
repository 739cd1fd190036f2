"""What every group of routes shares: the served-model lookup, running a model (inline on
the event loop when nothing else waits, else through the scheduler's workers), parsing and
encoding off the loop when large, and the protocol's error body."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from agent.daemon import Agent
from agent.errors import ApiError, UnknownModel
from agent.serving.admission import PRIORITY
from agent.serving.heavy import HeavyGate, in_thread
from agent.serving.http import HttpServer, Request, Response, json_response
from agent.serving.scheduler import Resident
from agent.serving.shm import SharedMemory
from agent.trust.signatures import NAME_PATTERN

MODEL_NAME = re.compile(NAME_PATTERN)
#: Above this many bytes, parsing a request or encoding a response runs in a worker thread
#: (decoding 16 MB of JSON on the event loop stalled every other client for seconds), and
#: when that many bytes are JSON, through the heavy gate too (`agent.serving.heavy`).
OFF_LOOP_BYTES = 64 * 1024
T = TypeVar("T")
#: (method, path pattern, handler): what a group of routes adds to the router.
Route = tuple[str, str, Callable[[Request], Any]]


def error(status: int, message: str, **extra: Any) -> Response:
    """The protocol's error body, `{"error": ..., **extra}`."""
    return json_response({"error": message, **extra}, status)


def json_body(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object, or 400."""
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body


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


class Serving:
    """The agent's models as the routes reach them."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        api = agent.config.api
        self.shm = (SharedMemory(max_regions=api.shared_memory_max_regions,
                                 max_region_bytes=api.shared_memory_max_region_bytes)
                    if api.shared_memory else None)
        self.heavy = HeavyGate(api.heavy_json_share, on_wait=functools.partial(
            agent.metrics.inc, "edge_agent_http_heavy_wait_seconds_total"))
        # Models a client unloaded through the repository API: not served (nor loaded
        # again by a request) until it loads them. In memory: a restart serves them again.
        self.unloaded: set[str] = set()
        self.http: HttpServer | None = None  # set when the server is made
        self._completions: Completions | None = None
        # by model name (names that passed MODEL_NAME and found a resident model: few)
        self._prechecks: dict[str, Callable[[list[int]], None]] = {}

    def loaded(self, request: Request) -> Resident | None:
        """The model `request` names (and the version, when it names one) when it is
        loaded; None when it must be loaded first (`model`).

        Raises:
            UnknownModel, ApiError: no such model or version served.
        """
        name = request.params["name"]
        if not MODEL_NAME.match(name):  # never a file name nor a label from raw input
            raise UnknownModel(name[:64] + ("…" if len(name) > 64 else ""))
        if name in self.unloaded:
            raise ApiError(404, f"model {name} was unloaded through the repository API: "
                           f"POST /v2/repository/models/{name}/load serves it again")
        entry = self.agent.scheduler.resident(name)
        if entry is None:
            return None
        version = request.params.get("version")
        if version is not None and version != str(entry.manifest.version):
            raise ApiError(404, f"model {name} serves version {entry.manifest.version}, not "
                           f"{version}")
        return entry

    async def model(self, request: Request) -> Resident:
        """The model `request` names (and the version, when it names one), loaded: one
        installed but unloaded to make room is loaded again."""
        entry = self.loaded(request)
        if entry is not None:
            return entry
        loop = asyncio.get_running_loop()
        name = request.params["name"]
        if await loop.run_in_executor(None, self.agent.ensure_loaded, name):
            entry = self.loaded(request)
        if entry is None:
            raise UnknownModel(name)
        return entry

    def precheck(self, name: str) -> Callable[[list[int]], None]:
        """The scheduler's admission precheck for model `name` (made once per name)."""
        check = self._prechecks.get(name)
        if check is None:
            check = self._prechecks[name] = functools.partial(
                self.agent.scheduler.precheck, name)
        return check

    async def run(self, name: str, x: Any, priority: str, timeout_ms: float | None) -> Any:
        """Model `name` on `x`: its outputs."""
        timeout = (timeout_ms or self.agent.config.scheduler.default_deadline_ms) / 1000
        # Inline only when no other request is in progress or waiting: running the model on
        # the event loop would keep it unread (no batching, no overlap). Idle keep-alive
        # connections with nothing pending (a client's pool) do not count.
        lone = self.http is None or not self.http.others_active()
        scheduler = self.agent.scheduler
        try:
            fut = scheduler.submit(name, x, priority=PRIORITY[priority], timeout_s=timeout,
                                   inline=lone)
        except UnknownModel:  # unloaded to make room since `model` found it: load, retry
            loop = asyncio.get_running_loop()
            if not await loop.run_in_executor(None, self.agent.ensure_loaded, name):
                raise
            fut = scheduler.submit(name, x, priority=PRIORITY[priority], timeout_s=timeout,
                                   inline=lone)
        if not isinstance(fut, Future) or fut.done():  # ran inline (or already done): no
            return fut.result()  # need for the loop's thread-safe wake-up
        if self._completions is None:
            self._completions = Completions(asyncio.get_running_loop())
        return await self._completions.watch(fut)

    async def work(self, json_bytes: int, size: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, parsing or encoding `size` bytes of which `json_bytes` are JSON:
        on the loop when small, in a worker thread when large, and through the heavy gate
        when the JSON is large (it holds the GIL throughout, wherever it runs)."""
        if size <= OFF_LOOP_BYTES:  # the common small request: no thread hand-off
            return fn(*args)
        if json_bytes <= OFF_LOOP_BYTES:  # binary tensors: numpy, which is quick
            return await in_thread(fn, *args)
        return await self.heavy.run(functools.partial(in_thread, fn, *args))

    def json_cap(self, size: int) -> None:
        """413 above `api.max_json_bytes` of JSON."""
        cap = self.agent.config.api.max_json_bytes
        if size > cap:
            raise ApiError(413, f"{size} bytes of JSON (at most {cap}); send large "
                           "tensors in the binary tensor extension")
