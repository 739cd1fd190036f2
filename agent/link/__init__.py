"""The fleet link: the agent's side of MQTT, from command in to telemetry out.

    wire         the versioned MQTT payloads and topics (pydantic), shared with the fleet
    mqtt         one broker connection: birth/LWT, reconnect with backoff, TLS, the outbox
    outbox       telemetry, events and results kept in SQLite until the broker has them
    reporting    events, command results and anomalies as wire messages into the outbox
    detectors    pure anomaly detectors (latency, error rate, drift, memory, temperature)
    port         `AgentPort`: what the link needs of an agent (the daemon or a stand-in)
    fleetlink    `FleetLink`: the threads, and command dispatch
    deploying    a deploy command carried out: the I/O around `agent.updates.deploy`
    telemetry    the periodic telemetry message and the detectors run on its window
    remote       remote inference over MQTT 5 request/response

See docs/architecture.md, "Topics" and "Fleet link".
"""
