"""The device registry and what devices say, believed only once verified.

    gate         `ReportGate`: topic, signature (the registered key) and payload checks
    ordering     each device's own order of reports: stale, replayed, reset
    keyring      registered report keys, unknown publishers, ignore counters
    registry     `FleetDB`: devices as their states, telemetry and events say
    watcher      `FleetWatcher`: the broker's messages into the registry, in batches
    status       the status table and how far a root reached

See docs/architecture.md, "The fleet".
"""
