"""Serving: models in memory and requests through them, inside memory and thermal budgets.

    runtime      ONNX Runtime and TFLite behind one `LoadedModel` interface
    selftest     a loaded model against the bundle's golden inputs and outputs
    admission    the pure admission decision: memory budget, thermal state, queue
    scheduler    resident models (LRU), a bounded priority queue, micro-batching, hot swap
    metrics      counters and histograms, Prometheus text and windowed quantiles
    oip          the Open Inference Protocol (KServe v2) and TF Serving bodies, pure
    sensors      the temperature and available-memory edge the admission decision reads
    http         a small HTTP/1.1 server (asyncio + h11): limits, routing, keep-alive;
                 the routes of the local API are `agent.api`

See docs/architecture.md, "Local API" and "Serving".
"""
