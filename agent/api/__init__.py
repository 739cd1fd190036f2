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

Modules: `server` (the router, the token, the admin-socket rule, counting and logging
answers), `base` (the served-model lookup, running a model, work off the loop), and the
routes of each protocol: `kserve` (Open Inference Protocol with its extensions),
`tfserving` (TensorFlow Serving's REST) and `admin`.
"""

from agent.api.server import METRICS_MAX_CONNECTIONS, Api, route_kind

__all__ = ["METRICS_MAX_CONNECTIONS", "Api", "route_kind"]
