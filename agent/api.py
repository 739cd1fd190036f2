"""The local API over aiohttp: Open Inference Protocol (KServe v2 REST, with the binary
tensor extension), TensorFlow Serving's `:predict`, `/metrics`, and admin routes.

One application serves a Unix socket (mode from config, the agent's group) and, when
configured, a TCP port. On TCP every route needs `Authorization: Bearer <token>`, the token
read from a file only the agent's group can read; the admin routes (install, rollback,
status) exist only on the Unix socket. Errors use the protocol's body `{"error": "..."}`;
refusals add `"reason"` (queue_full, deadline, memory, thermal) with HTTP 429 or 503.
aiohttp's own limit refuses bodies above `max_body_bytes` with 413.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from agent import __version__
from agent.admission import Priority
from agent.daemon import Agent, Busy
from agent.errors import AgentError, RejectedError
from agent.oip import (
    ApiError,
    infer_response,
    model_metadata,
    parse_infer,
    parse_predict,
    predict_response,
)
from agent.scheduler import Refused, UnknownModel

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AGENT: web.AppKey[Agent] = web.AppKey("agent", Agent)
TOKEN: web.AppKey[str | None] = web.AppKey("token", str)
PRIORITY = {"high": Priority.HIGH, "normal": Priority.NORMAL, "low": Priority.LOW}


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _on_unix(request: web.Request) -> bool:
    return isinstance(request.transport and request.transport.get_extra_info("sockname"), str)


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer token on TCP (compared in constant time); the Unix socket relies on its mode."""
    if not _on_unix(request):
        token = request.app[TOKEN]
        sent = request.headers.get("Authorization", "")
        if token is None or not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            return _error(401, "a bearer token is required on TCP")
    return await handler(request)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors of every kind become protocol error bodies; the daemon goes on."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, str(exc))
    except Refused as exc:
        request.app[AGENT].metrics.inc("edge_agent_http_refusals_total", reason=exc.reason)
        return _error(exc.status, str(exc), reason=exc.reason)
    except UnknownModel as exc:
        return _error(404, str(exc))
    except AgentError as exc:  # e.g. an unloaded model that no longer verifies
        return _error(503, str(exc), reason="unavailable")
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error(exc.status, exc.reason)
        raise


async def _model(request: web.Request, name: str | None = None) -> Any:
    agent = request.app[AGENT]
    name = name or request.match_info["name"]
    entry = agent.scheduler.models().get(name)
    if entry is None:  # installed but unloaded to make room: load it again
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(None, agent.ensure_loaded, name):
            entry = agent.scheduler.models().get(name)
    if entry is None:
        raise UnknownModel(name)
    version = request.match_info.get("version")
    if version is not None and version != str(entry.manifest.version):
        raise ApiError(404, f"model {name} serves version {entry.manifest.version}, not "
                       f"{version}")
    return entry


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    models = request.app[AGENT].scheduler.models()
    return web.json_response({"ready": bool(models)}, status=200 if models else 503)


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response({"name": "edge-agent", "version": __version__,
                              "extensions": ["binary_tensor_data", "model_repository"]})


async def metadata(request: web.Request) -> web.Response:
    return web.json_response(model_metadata((await _model(request)).manifest))


async def model_ready(request: web.Request) -> web.Response:
    await _model(request)
    return web.json_response({"ready": True})


async def _run(request: web.Request, name: str, x: Any, priority: str,
               timeout_ms: float | None) -> Any:
    agent = request.app[AGENT]
    timeout = (timeout_ms or agent.config.scheduler.default_deadline_ms) / 1000
    fut = agent.scheduler.submit(name, x, priority=PRIORITY[priority], timeout_s=timeout)
    if fut.done():  # ran inline: no need to go through the loop's thread-safe wake-up
        return fut.result()
    return await asyncio.wrap_future(fut)


async def infer(request: web.Request) -> web.Response:
    entry = await _model(request)
    header = request.headers.get("Inference-Header-Content-Length")
    try:
        header_length = int(header) if header is not None else None
    except ValueError as exc:
        raise ApiError(400, "Inference-Header-Content-Length must be an integer") from exc
    req = parse_infer(await request.read(), entry.manifest, header_length)
    y = await _run(request, entry.name, req.x, req.priority, req.timeout_ms)
    body, head_len = infer_response(entry.manifest, y, request_id=req.id,
                                    binary=req.binary_output)
    if head_len is None:
        return web.Response(body=body, content_type="application/json")
    return web.Response(body=body, content_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(head_len)})


async def predict(request: web.Request) -> web.Response:
    name, _, verb = request.match_info["name_verb"].partition(":")
    if verb != "predict":
        raise ApiError(404, "only :predict is supported")
    entry = await _model(request, name)
    x, rows = parse_predict(await request.read(), entry.manifest)
    y = await _run(request, entry.name, x, "normal", None)
    return web.Response(body=predict_response(y, rows), content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[AGENT].metrics.render(),
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def _admin(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        if not _on_unix(request):
            return _error(404, "admin routes are served on the Unix socket only")
        return await handler(request)
    return wrapped


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body


async def admin_install(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    path = (await _json_body(request)).get("path")
    if not isinstance(path, str) or not Path(path).exists():
        raise ApiError(400, "body needs 'path': an existing bundle archive or directory")
    try:
        result = await asyncio.get_running_loop().run_in_executor(None, agent.install,
                                                                  Path(path))
    except Busy as exc:
        return _error(409, str(exc), reason="busy")
    except RejectedError as exc:
        return _error(422, str(exc), reason="rejected", check=exc.check)
    except AgentError as exc:
        return _error(422, str(exc), reason="failed")
    return web.json_response({"model": result.model, "version": result.version,
                              "previous": result.previous, "selftest": result.selftest})


async def admin_rollback(request: web.Request) -> web.Response:
    body = await _json_body(request)
    name = body.get("model")
    if not isinstance(name, str):
        raise ApiError(400, "body needs 'model'")
    try:
        note = await asyncio.get_running_loop().run_in_executor(
            None, request.app[AGENT].roll_back, name, str(body.get("reason", "local request")))
    except AgentError as exc:
        return _error(409, str(exc))
    return web.json_response({"result": note})


async def admin_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT].status())


def make_app(agent: Agent, token: str | None) -> web.Application:
    app = web.Application(middlewares=[auth, errors],
                          client_max_size=agent.config.api.max_body_bytes)
    app[AGENT] = agent
    app[TOKEN] = token
    app.add_routes([
        web.get("/v2/health/live", live),
        web.get("/v2/health/ready", ready),
        web.get("/v2", server_metadata),
        web.get("/v2/models/{name}", metadata),
        web.get("/v2/models/{name}/versions/{version}", metadata),
        web.get("/v2/models/{name}/ready", model_ready),
        web.get("/v2/models/{name}/versions/{version}/ready", model_ready),
        web.post("/v2/models/{name}/infer", infer),
        web.post("/v2/models/{name}/versions/{version}/infer", infer),
        web.post("/v1/models/{name_verb}", predict),
        web.get("/metrics", metrics),
        web.post("/v1/admin/install", _admin(admin_install)),
        web.post("/v1/admin/rollback", _admin(admin_rollback)),
        web.get("/v1/admin/status", _admin(admin_status)),
    ])
    return app
