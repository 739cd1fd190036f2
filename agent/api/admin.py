"""The admin routes, answered on the admin socket only: install (the bundle archive is the
body, streamed to staging), rollback and status."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from pathlib import Path

from agent.api.base import Route, Serving, error, json_body
from agent.errors import AgentError, ApiError, Busy, RejectedError, StoreError
from agent.serving.http import BodyStream, Request, Response, json_response
from agent.trust.archive import GZIP_MAGIC, ZSTD_MAGIC
from agent.trust.signatures import HEX64_PATTERN

UPLOAD_TYPES = frozenset({"application/octet-stream", "application/gzip", "application/zstd",
                          "application/x-tar"})
HEX64 = re.compile(HEX64_PATTERN)  # X-Bundle-Sha256, lower-cased first


async def receive(stream: BodyStream, target: Path) -> str:
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


class Admin:
    def __init__(self, serving: Serving) -> None:
        self.agent = serving.agent

    def routes(self) -> list[Route]:
        return [("POST", "/v1/admin/rollback", self.rollback),
                ("GET", "/v1/admin/status", self.status)]

    async def install(self, request: Request) -> Response:
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
            digest = await receive(request.stream, target)
            if declared is not None and digest != declared:
                return error(422, "the upload does not match X-Bundle-Sha256 (damaged in "
                             "transit)", reason="rejected", check="sha256")
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(None, self.agent.install, target)
        except ApiError:
            raise
        except Busy as exc:
            return error(409, str(exc), reason="busy")
        except StoreError as exc:  # the device's storage, not the bundle: try again later
            return error(503, str(exc), reason="store")
        except RejectedError as exc:
            return error(422, str(exc), reason="rejected", check=exc.check)
        except AgentError as exc:
            return error(422, str(exc), reason="failed")
        finally:
            target.unlink(missing_ok=True)
        return json_response({"model": result.model, "version": result.version,
                              "previous": result.previous, "selftest": result.selftest})

    async def rollback(self, request: Request) -> Response:
        body = json_body(request)
        name = body.get("model")
        if not isinstance(name, str):
            raise ApiError(400, "body needs 'model'")
        loop = asyncio.get_running_loop()
        try:
            note = await loop.run_in_executor(None, self.agent.roll_back, name,
                                              str(body.get("reason", "local request")))
        except AgentError as exc:
            return error(409, str(exc))
        return json_response({"result": note})

    async def status(self, request: Request) -> Response:
        return json_response(self.agent.status())
