"""Remote inference over MQTT 5 request/response: a KServe v2 JSON body plus "model" on
`edge/v1/{fleet}/{device}/infer`, the answer on the request's ResponseTopic with its
CorrelationData. The same scheduler, admission and refusals as the local API; a request
that cannot parse gets a 400, never a dead thread.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from typing import Any

from agent.errors import ApiError, Refused
from agent.serving.admission import PRIORITY
from agent.serving.oip import infer_response, parse_infer
from agent.serving.scheduler import Scheduler

#: Requests waiting for the inference thread; past this, a 429 answer at once.
QUEUE_MAX = 256
Reply = Callable[[str, bytes, bytes | None], Any]


class RemoteInference:
    def __init__(self, scheduler: Scheduler, reply: Reply) -> None:
        self.scheduler, self._reply = scheduler, reply
        self._requests: queue.Queue[tuple[bytes, Any]] = queue.Queue(maxsize=QUEUE_MAX)

    def received(self, payload: bytes, properties: Any) -> None:
        """From the MQTT thread: queue the request, or refuse it when the queue is full."""
        try:
            self._requests.put_nowait((payload, properties))
        except queue.Full:
            self.answer(properties, 429, {"error": "inference queue full",
                                          "reason": "queue_full"})

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                payload, props = self._requests.get(timeout=0.2)
            except queue.Empty:
                continue
            status, body = self.infer(payload)
            self.answer(props, status, body)

    def infer(self, payload: bytes) -> tuple[int, dict[str, Any]]:
        """One request; returns (status, response body)."""
        try:
            head = json.loads(payload)
            name = head.pop("model") if isinstance(head, dict) else None
            resident = self.scheduler.models().get(name) if isinstance(name, str) else None
            if resident is None:
                return 404, {"error": f"no model {name!r} here"}
            req = parse_infer(json.dumps(head).encode(), resident.manifest, None)
            timeout_s = (req.timeout_ms or 1000) / 1000
            fut = self.scheduler.submit(resident.name, req.x, priority=PRIORITY[req.priority],
                                        timeout_s=timeout_s)
            y = fut.result(timeout=timeout_s + 5)
        except (ValueError, RecursionError):
            return 400, {"error": "payload is not a JSON infer request"}
        except ApiError as exc:
            return exc.status, {"error": str(exc)}
        except Refused as exc:
            return exc.status, {"error": str(exc), "reason": exc.reason}
        body, _ = infer_response(resident.manifest, y, request_id=req.id, binary=False)
        return 200, json.loads(body)

    def answer(self, props: Any, status: int, body: dict[str, Any]) -> None:
        topic = getattr(props, "ResponseTopic", None)
        if not topic:
            return  # nobody asked for an answer
        self._reply(topic, json.dumps({"status": status, **body}).encode(),
                    getattr(props, "CorrelationData", None))
