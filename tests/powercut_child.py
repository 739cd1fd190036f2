"""What the power-cut harness (tests/powercut.py) runs on the filesystem it cuts.

    python tests/powercut_child.py [--no-sync] agent ARGS...   `edge-agent ARGS...`
    python tests/powercut_child.py [--no-sync] writer STATE     outbox and nonce writes

`--no-sync` sets `agent.durable._UNSAFE_NO_SYNC` in this process only: every fsync of the
agent and both SQLite stores' `synchronous` are off, so the harness can show that its cuts
find the damage a missing fsync does. Nothing else sets it.

`writer` is the agent's own outbox and nonce store under load: it enqueues telemetry and
records command nonces in turn, and prints `o N` / `n N` once each call has returned (the
agent acknowledges a message or a command to the rest of itself at that point).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import agent.durable


def writer(state: Path) -> None:
    from agent.link.outbox import Outbox
    from agent.trust.nonces import NonceStore

    outbox = Outbox(state / "outbox.sqlite", cap=1_000_000)
    nonces = NonceStore(state / "nonces.sqlite")
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        orders = []
        outbox.enqueue("telemetry", "edge/v1/acme/dev-1/telemetry",
                       lambda seq, order, i=i, orders=orders: orders.append(order.seq) or
                       f'{{"i":{i},"seq":{seq}}}'.encode())
        print(f"r {orders[0]}", flush=True)  # the report order the message took
        print(f"o {i}", flush=True)
        nonces.record(f"nonce-{i:08d}", datetime.now(UTC))
        print(f"n {i}", flush=True)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--no-sync":
        agent.durable._UNSAFE_NO_SYNC = True
        argv = argv[1:]
    if argv[:1] == ["agent"]:
        from agent.cli import main as agent_main

        return agent_main(argv[1:])
    if argv[:1] == ["writer"] and len(argv) == 2:
        writer(Path(argv[1]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
