"""A simulated fleet on the agent's own protocol code.

    settings     `SimSettings`, fault plans, device names, scratch directories
    standin      the stand-in runtime (synthetic load, faults)
    devices      `Simulator`: the devices of one process on one hub and one ticker
    processes    `SimulatedFleet`: worker processes, started and removed

See docs/architecture.md, "The fleet".
"""
