"""The local API's server: the routes of every protocol on one router, the token on TCP,
admin routes on the admin socket only, error bodies, and answers counted and logged."""

from __future__ import annotations

import functools
import hmac
import json
import logging
from importlib import resources

from agent.api.admin import Admin
from agent.api.base import Serving, error
from agent.api.kserve import KServe
from agent.api.tfserving import TfServing
from agent.daemon import Agent
from agent.errors import AgentError, ApiError, Refused, UnknownModel
from agent.logs import RateLimited
from agent.serving.http import MEMO_PATH_MAX, Handler, HttpServer, Request, Response, Router
from agent.serving.memo import remember
from agent.serving.metrics import Labels, labels_key

log = logging.getLogger("edge_agent.api")
#: Connections of the metrics listener (a scraper or two, health probes).
METRICS_MAX_CONNECTIONS = 8
INFERENCE_SUFFIXES = ("/infer", ":predict", ":classify", ":regress")
ANSWER_KEYS_MAX = 256


@functools.cache
def _openapi_document() -> bytes:
    return (resources.files("agent.serving") / "openapi.json").read_bytes()


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


class Api:
    """The routes, bound to one agent."""

    def __init__(self, agent: Agent, token: str | None) -> None:
        self.agent = agent
        self.token = token
        self._errors = RateLimited(log, interval_s=60.0)
        self._answer_keys: dict[tuple[int, str], Labels] = {}  # by (status, path)
        self.serving = Serving(agent)
        self.kserve = KServe(self.serving)
        admin = Admin(self.serving)
        self.router = Router()
        for method, path, handler in (
                *self.kserve.routes(), *TfServing(self.serving).routes(), *admin.routes(),
                ("GET", "/metrics", self.metrics), ("GET", "/openapi.json", self.openapi)):
            self.router.add(method, path, handler)
        self.router.add("POST", "/v1/admin/install", admin.install,
                        stream_max_bytes=agent.config.api.max_upload_bytes)

    def server(self) -> HttpServer:
        api = self.agent.config.api
        http = HttpServer(self.router, max_body_bytes=api.max_body_bytes,
                          middleware=self.guard, authorize=self.authorize,
                          max_connections=api.max_connections,
                          caps={"admin": api.admin_max_connections},
                          head_timeout_s=api.head_timeout_s,
                          body_timeout_s=api.body_timeout_s,
                          idle_timeout_s=api.idle_timeout_s,
                          on_response=self.answered, parser=api.http_parser)
        self.serving.http = http  # the inline fast path asks it who else is waiting
        self.agent.metrics.add_collector(http.samples)
        return http

    def metrics_server(self) -> HttpServer:
        """The metrics listener (`api.metrics_port`): /metrics and health, no token, no
        inference, no admin."""
        router = Router()
        for path, handler in (("/metrics", self.metrics), ("/v2/health/live", self.kserve.live),
                              ("/v2/health/ready", self.kserve.ready)):
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
        key = self._answer_keys.get((status, path))
        if key is None:  # a client asks the same few paths: their series' keys made once
            key = labels_key(code=str(status), kind=route_kind(path))
            if len(path) <= MEMO_PATH_MAX:  # at most ANSWER_KEYS_MAX short paths kept
                remember(self._answer_keys, (status, path), key, ANSWER_KEYS_MAX)
        self.agent.metrics.add((("edge_agent_http_responses_total", key, 1.0),))
        if status < 400:
            return
        route = path.split("?", maxsplit=1)[0][:80]
        try:
            detail = json.loads(body)
            reason = detail.get("reason", "") if isinstance(detail, dict) else ""
            message = str(detail.get("error", ""))[:200] if isinstance(detail, dict) else ""
        except (ValueError, UnicodeDecodeError):
            reason, message = "", ""
        level = logging.ERROR if status >= 500 and status != 503 else logging.WARNING
        self._errors.log(level, f"{status} {reason}",
                         "http.error status=%d method=%s path=%s reason=%s error=%s", status,
                         method, route, reason or "-", json.dumps(message))

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
            return error(403 if request.unix else 404, "admin routes are served on the "
                         f"admin socket ({self.agent.config.api.admin_socket}) only")
        try:
            return await handler(request)
        except ApiError as exc:
            return error(exc.status, str(exc))
        except Refused as exc:
            return error(exc.status, str(exc), reason=exc.reason)
        except UnknownModel as exc:
            return error(404, str(exc))
        except AgentError as exc:  # e.g. an unloaded model that no longer verifies
            return error(503, str(exc), reason="unavailable")

    async def openapi(self, request: Request) -> Response:
        """This API described in OpenAPI 3 (docs/openapi.json, shipped in the package)."""
        return Response(200, _openapi_document())

    async def metrics(self, request: Request) -> Response:
        return Response(200, self.agent.metrics.render().encode(),
                        "text/plain; version=0.0.4; charset=utf-8")
