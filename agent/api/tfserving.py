"""TensorFlow Serving's REST routes: model status and metadata, `:predict`, `:classify`,
`:regress` (the request and response formats are `agent.serving.tfs`), and a clear 404 for
version labels."""

from __future__ import annotations

from agent.api.base import Route, Serving
from agent.errors import ApiError
from agent.serving import tfs
from agent.serving.http import Request, Response, json_response


class TfServing:
    def __init__(self, serving: Serving) -> None:
        self.s = serving

    def routes(self) -> list[Route]:
        return [
            ("POST", "/v1/models/{name}:predict", self.predict),
            ("POST", "/v1/models/{name}/versions/{version}:predict", self.predict),
            ("POST", "/v1/models/{name}:classify", self.classify),
            ("POST", "/v1/models/{name}/versions/{version}:classify", self.classify),
            ("POST", "/v1/models/{name}:regress", self.regress),
            ("POST", "/v1/models/{name}/versions/{version}:regress", self.regress),
            ("GET", "/v1/models/{name}", self.model_status),
            ("GET", "/v1/models/{name}/versions/{version}", self.model_status),
            ("GET", "/v1/models/{name}/metadata", self.metadata),
            ("GET", "/v1/models/{name}/versions/{version}/metadata", self.metadata),
            ("GET", "/v1/models/{name}/labels/{label}", self.version_label),
            ("GET", "/v1/models/{name}/labels/{label}/metadata", self.version_label),
            ("POST", "/v1/models/{name}/labels/{label}:predict", self.version_label),
            ("POST", "/v1/models/{name}/labels/{label}:classify", self.version_label),
            ("POST", "/v1/models/{name}/labels/{label}:regress", self.version_label),
        ]

    async def model_status(self, request: Request) -> Response:
        """TensorFlow Serving's model status (`GET /v1/models/{name}[/versions/{v}]`)."""
        entry = await self.s.model(request)
        return json_response({"model_version_status": [{
            "version": str(entry.manifest.version), "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}]})

    async def metadata(self, request: Request) -> Response:
        """TF Serving's model metadata (`GET /v1/models/{name}[/versions/{v}]/metadata`)."""
        entry = await self.s.model(request)
        return json_response(tfs.model_metadata(entry.manifest))

    async def predict(self, request: Request) -> Response:
        s = self.s
        entry = await s.model(request)
        s.json_cap(len(request.body))
        x, rows = await s.work(len(request.body), len(request.body), tfs.parse_predict,
                               request.body, entry.manifest)
        y = await s.run(entry.name, x, "normal", None)
        return Response(200, await s.work(y.nbytes, y.nbytes, tfs.predict_response, y, rows))

    async def classify(self, request: Request) -> Response:
        """TF Serving's `:classify`: every class's label and score per example."""
        return await self._examples(request, "classify")

    async def regress(self, request: Request) -> Response:
        """TF Serving's `:regress`: one value per example."""
        return await self._examples(request, "regress")

    async def _examples(self, request: Request, verb: str) -> Response:
        s = self.s
        entry = await s.model(request)
        s.json_cap(len(request.body))
        x = await s.work(len(request.body), len(request.body), tfs.parse_examples,
                         request.body, entry.manifest, verb)
        y = await s.run(entry.name, x, "normal", None)
        return Response(200, tfs.classify_response(entry.manifest, y) if verb == "classify"
                        else tfs.regress_response(y))

    async def version_label(self, request: Request) -> Response:
        """TF Serving's version labels: the agent serves one version per model, so there
        are none; the answer says what to use."""
        name = request.params["name"][:64]
        raise ApiError(404, f"version labels are not supported (label "
                       f"{request.params['label'][:64]!r}): the agent serves one version per "
                       f"model; use /v1/models/{name} or /v1/models/{name}/versions/N")
