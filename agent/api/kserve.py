"""The Open Inference Protocol (KServe v2 REST) routes: health, metadata, inference with
the binary tensor extension, the model repository extension (index, load, unload) and
Triton's system shared memory extension."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from agent import __version__
from agent.api.base import MODEL_NAME, OFF_LOOP_BYTES, Route, Serving, json_body
from agent.errors import AgentError, ApiError, UnknownModel
from agent.serving.http import Request, Response, json_response
from agent.serving.oip import infer_response, model_metadata, parse_infer
from agent.serving.shm import SharedMemory
from agent.trust.bundle import read_manifest


class KServe:
    def __init__(self, serving: Serving) -> None:
        self.s = serving

    def routes(self) -> list[Route]:
        return [
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
            ("GET", "/v2/systemsharedmemory/status", self.shm_status),
            ("GET", "/v2/systemsharedmemory/region/{region}/status", self.shm_status),
            ("POST", "/v2/systemsharedmemory/region/{region}/register", self.shm_register),
            ("POST", "/v2/systemsharedmemory/unregister", self.shm_unregister),
            ("POST", "/v2/systemsharedmemory/region/{region}/unregister", self.shm_unregister),
        ]

    # -- health and metadata --------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request) -> Response:
        models = self.s.agent.scheduler.models()
        return json_response({"ready": bool(models)}, 200 if models else 503)

    async def server_metadata(self, request: Request) -> Response:
        extensions = ["binary_tensor_data", "model_repository"]
        if self.s.shm is not None:
            extensions.append("system_shared_memory")
        return json_response({"name": "edge-agent", "version": __version__,
                              "extensions": extensions})

    async def metadata(self, request: Request) -> Response:
        return json_response(model_metadata((await self.s.model(request)).manifest))

    async def model_ready(self, request: Request) -> Response:
        await self.s.model(request)
        return json_response({"ready": True})

    # -- inference --------------------------------------------------------------------------
    async def infer(self, request: Request) -> Response:
        s = self.s
        entry = s.loaded(request) or await s.model(request)
        header = request.headers.get("inference-header-content-length")
        try:
            header_length = int(header) if header is not None else None
        except ValueError as exc:
            raise ApiError(400, "Inference-Header-Content-Length must be an integer") from exc
        json_bytes = (len(request.body) if header_length is None else
                      min(max(0, header_length), len(request.body)))
        s.json_cap(json_bytes)
        body, manifest = request.body, entry.manifest
        precheck = s.precheck(entry.name)
        shm = None if s.shm is None else s.shm.of(request.peer)
        if len(body) <= OFF_LOOP_BYTES:  # the common small request: no thread hand-off
            req = parse_infer(body, manifest, header_length, precheck, shm)
        else:
            req = await s.work(json_bytes, len(body), parse_infer, body, manifest,
                               header_length, precheck, shm)
        y = await s.run(entry.name, req.x, req.priority, req.timeout_ms)
        if y.nbytes <= OFF_LOOP_BYTES:
            body, head_len = infer_response(manifest, y, request_id=req.id,
                                            binary=req.binary_output, output_shm=req.output_shm)
        else:
            body, head_len = await s.work(
                0 if req.binary_output or req.output_shm else y.nbytes, y.nbytes,
                functools.partial(infer_response, request_id=req.id, binary=req.binary_output,
                                  output_shm=req.output_shm), manifest, y)
        if head_len is None:
            return Response(200, body)
        return Response(200, body, "application/octet-stream",
                        {"inference-header-content-length": str(head_len)})

    # -- the model repository extension -----------------------------------------------------
    async def repository_index(self, request: Request) -> Response:
        """The model repository extension's index (KServe v2 / Triton): every installed
        model with the version it serves; READY when loaded, else UNAVAILABLE with the
        reason (an unloaded model loads again on its next request). Body: optional
        `{"ready": true}` to list only the loaded ones."""
        ready_only = False
        if request.body:  # white space alone is not JSON: 400, as the schema says
            body = json_body(request)
            ready = body.get("ready", False)
            if not isinstance(ready, bool) or set(body) - {"ready"}:
                raise ApiError(400, 'the index request takes only {"ready": true|false}')
            ready_only = ready
        loop = asyncio.get_running_loop()
        return json_response(await loop.run_in_executor(None, self._index, ready_only))

    def _index(self, ready_only: bool) -> list[dict[str, Any]]:
        agent = self.s.agent
        resident = agent.scheduler.models()
        out = []
        for name in agent.store.models():
            entry = resident.get(name)
            if name in self.s.unloaded:
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
            where = agent.store.active_dir(name)
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
        self.s.unloaded.discard(name)
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self.s.agent.ensure_loaded, name):
            raise UnknownModel(f"{name} (only installed models load: install a signed "
                               "bundle first)")
        return json_response({})

    async def repository_unload(self, request: Request) -> Response:
        """Stop serving an installed model and free its memory until it is loaded again;
        it stays installed (an update or a rollback still reaches it)."""
        name = self._repository_name(request)
        if name not in self.s.agent.store.models():
            raise UnknownModel(name)
        self.s.unloaded.add(name)
        self.s.agent.scheduler.unload(name)
        return json_response({})

    @staticmethod
    def _repository_name(request: Request) -> str:
        name = request.params["name"]
        if not MODEL_NAME.match(name):
            raise UnknownModel(name[:64])
        if request.body:  # white space alone is not JSON: 400, as the schema says
            body = json_body(request)
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

    # -- system shared memory (Triton's extension; agent.serving.shm) -----------------------
    def _shared_memory(self) -> SharedMemory:
        if self.s.shm is None:
            raise ApiError(400, "shared memory is not enabled on this agent "
                           "(api.shared_memory)")
        return self.s.shm

    async def shm_status(self, request: Request) -> Response:
        return json_response(self._shared_memory().status(request.peer,
                                                          request.params.get("region")))

    async def shm_register(self, request: Request) -> Response:
        shm = self._shared_memory()
        shm.register(request.peer, request.params["region"], json_body(request))
        return json_response({})

    async def shm_unregister(self, request: Request) -> Response:
        if request.body:  # white space alone is not JSON: 400, as the schema says
            raise ApiError(400, "unregister takes an empty body")
        self._shared_memory().unregister(request.peer, request.params.get("region"))
        return json_response({})
