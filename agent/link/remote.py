"""Remote inference over MQTT 5 request/response: a KServe v2 JSON body plus "model" on
`edge/v1/{fleet}/{device}/infer`, the answer on the request's ResponseTopic with its
CorrelationData. The same scheduler, admission and refusals as the local API; a request
that cannot parse gets a 400, an unexpected failure a 500, never a dead thread.

Replies go only under `edge/v1/{fleet}/infer-replies/` (the broker's ACL lets a requester
read its own `infer-replies/{client}/#`): any other ResponseTopic is refused and counted,
so a request cannot make the device publish onto its own or another device's topics.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from agent.errors import ApiError, Refused
from agent.serving.admission import PRIORITY
from agent.serving.oip import infer_response, parse_infer
from agent.serving.scheduler import Scheduler

log = logging.getLogger("edge_agent.fleet")
#: Requests waiting for the inference thread; past this, a 429 answer at once.
QUEUE_MAX = 256
Reply = Callable[[str, bytes, bytes | None], Any]


class RemoteInference:
    def __init__(self, scheduler: Scheduler, reply: Reply, *, reply_prefix: str) -> None:
        self.scheduler, self._reply, self.reply_prefix = scheduler, reply, reply_prefix
        self.refused_topics = 0
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
            try:
                status, body = self.infer(payload)
            except Exception as exc:  # one request must never stop the others
                log.exception("infer.failed")
                status, body = 500, {"error": f"internal error: {type(exc).__name__}"}
            self.answer(props, status, body)

    def infer(self, payload: bytes) -> tuple[int, dict[str, Any]]:
        """One request; returns (status, response body)."""
        try:
            head = json.loads(payload)
            if not isinstance(head, dict) or not isinstance(head.get("model"), str):
                return 400, {"error": 'the request must be a JSON object with a "model" '
                                      "string and a KServe v2 infer body"}
            name = head.pop("model")
            resident = self.scheduler.models().get(name)
            if resident is None:
                return 404, {"error": f"no model {name[:100]!r} here"}
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
        if (not isinstance(topic, str) or not topic.startswith(self.reply_prefix)
                or "+" in topic or "#" in topic or len(topic) > 512):
            self.refused_topics += 1
            log.warning("infer.reply_refused topic=%.200r: replies go under %s only", topic,
                        self.reply_prefix)
            return
        self._reply(topic, json.dumps({"status": status, **body}).encode(),
                    getattr(props, "CorrelationData", None))
