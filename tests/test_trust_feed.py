"""Roots and the heartbeat reach running agents over MQTT: a rotation revokes a release key
on the device (over MQTT and the local API), an agent that missed rotations catches up
through the chain, an older root is ignored, an expired root is renewed remotely, and a
withheld heartbeat shows as stale. Real mosquitto, real `edge-agent run`, real keys."""

from __future__ import annotations

import json
import shutil
import tarfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from fixture_agent import ONE_OF_ONE, AgentProcess, write_config
from fixture_mqtt import Broker, Subscriber, report
from polling import wait_until

from fleet.trust.artifacts import serve_in_thread as serve
from fleet.trust.commands import build_command, deploy_fields, sign_command
from fleet.trust.keys import KeyDir, init_keys, rotate_keys
from fleet.trust.publish import copy_roots, heartbeat, publish_retained, publish_root
from fleet.trust.release import pack_bundle, sign_bundle

X86 = "x86_64-generic"
BASE = "edge/v1/acme/dev-1"


def cosigned(archive: Path, keys: KeyDir, key_name: str, out: Path) -> Path:
    """The same release with one more release signature (a key the root adds later)."""
    from agent.trust.archive import decompressed

    bundle = out / "bundle"
    with archive.open("rb") as fh, tarfile.open(fileobj=decompressed(fh, archive),
                                                mode="r|") as tar:
        tar.extractall(bundle, filter="data")
    sign_bundle(bundle, keys.load_keys([key_name], None))
    return pack_bundle(bundle, out / archive.name)


def events(sub: Subscriber, kind: str) -> list[dict[str, Any]]:
    return [e for e in (report(p) for p in sub.on("/event")) if e["kind"] == kind]


def state(sub: Subscriber) -> dict[str, Any]:
    """The device's latest state; {} before its first one arrived."""
    got = sub.on("/state")
    return report(got[-1]) if got else {}


def serving(agent: AgentProcess) -> int:
    return int(agent.call("GET", "/v1/admin/status")[1]["models"]["digits"]["version"])


def command(kd: KeyDir, kind: str, **fields: Any) -> bytes:
    cmd = build_command(kind, fleet="acme", device="dev-1", ttl=timedelta(minutes=5),
                        **fields)
    return sign_command(cmd, kd.keys_of(kd.root(), "command", None))


def test_a_rotation_reaches_a_running_agent_that_then_refuses_the_revoked_key(
        tmp_path: Path, broker: Broker, releases: dict[str, Path]) -> None:
    kd = KeyDir(Path(shutil.copytree(releases["keys"], tmp_path / "keys")))
    pinned = tmp_path / "root-v1.json"
    shutil.copyfile(kd.root_file, pinned)  # what the device was provisioned with
    rotate_keys(kd.path, add={"release": 1})  # v2: release-2 joins release-1
    v1 = cosigned(releases["onnx1"], kd, "release-2", tmp_path)  # signed by both
    v2 = releases["onnx2"]  # signed by release-1 only
    where = tmp_path / "dev"
    where.mkdir()
    cfg = write_config(where, kd.path, profile=X86, mqtt={
        "brokers": [broker.url], "telemetry_interval_s": 0.2, "health_window_s": 0.2})
    text = cfg.read_text().replace(str(kd.root_file), str(pinned))
    cfg.write_text(text)
    agent = AgentProcess(cfg).start()
    sub = Subscriber(broker, [f"{BASE}/#"])
    server, url = serve(tmp_path / "artifacts")
    try:
        assert agent.install(v1)[0] == 200 and agent.install(v2)[0] == 200
        assert serving(agent) == 2
        rotate_keys(kd.path, revoke=["release-1"])  # v3: release-1 revoked
        copy_roots(kd, tmp_path / "artifacts")
        # The device is two versions behind: it fetches v2 from the chain, then takes v3.
        publish_root(broker.url, kd, [url])
        wait_until(lambda: (state(sub).get("trust") or {}).get("root_version") == 3,
                   what="the agent on root v3")
        assert events(sub, "trust.root_updated")[0]["evidence"] == {
            "from": 1, "to": 3, "expires": kd.root().expires.isoformat()}
        # v2 (release-1 only) is no longer valid: v1, co-signed by release-2, serves again.
        wait_until(lambda: events(sub, "trust.revoked"), what="trust.revoked")
        assert serving(agent) == 1
        # The revoked key's bundle is refused through the local API ...
        status, body = agent.install(v2)
        assert status != 200 and "threshold" in json.dumps(body), body
        # ... and over MQTT.
        shutil.copyfile(v2, tmp_path / "artifacts" / v2.name)
        sub.publish(f"{BASE}/cmd", command(kd, "deploy", **deploy_fields(
            v2, [f"{url}/{v2.name}"])))
        wait_until(lambda: [r for p in sub.on("/cmd/result")
                            if (r := report(p))["kind"] == "deploy"], what="a deploy result")
        result = next(r for p in sub.on("/cmd/result") if (r := report(p))["kind"] == "deploy")
        assert (result["ok"], result["check"]) == (False, "threshold"), result
        assert serving(agent) == 1
        # A replayed older root changes nothing.
        older = KeyDir(tmp_path / "older")
        (older.path / "roots").mkdir(parents=True)
        shutil.copyfile(kd.path / "roots" / "2.root.json", older.root_file)
        publish_root(broker.url, older, [url])
        # The root survives a restart (persisted in the state directory).
        agent.stop()
        agent.start()
        assert agent.call("GET", "/v1/admin/status")[1]["root_version"] == 3
        assert serving(agent) == 1
        assert not events(sub, "trust.root_refused")  # v2 was older: ignored, not an error
    finally:
        server.shutdown()
        sub.close()
        agent.stop()


def test_an_expired_root_is_renewed_remotely(tmp_path: Path, broker: Broker) -> None:
    kd = KeyDir(tmp_path / "keys")
    init_keys(kd.path, fleet="acme", counts=ONE_OF_ONE, expires_days=0)  # expired at once
    where = tmp_path / "dev"
    where.mkdir()
    cfg = write_config(where, kd.path, profile=X86, mqtt={
        "brokers": [broker.url], "telemetry_interval_s": 0.2})
    agent = AgentProcess(cfg).start()
    sub = Subscriber(broker, [f"{BASE}/#"])
    try:
        wait_until(lambda: [e for e in events(sub, "trust.root_expiring")
                            if e["severity"] == "error"], what="the expired root reported")
        sub.publish(f"{BASE}/cmd", command(kd, "restart"))
        wait_until(lambda: sub.on("/cmd/result"), what="a result")
        assert report(sub.on("/cmd/result")[0])["check"] == "expired"
        old = shutil.copy(kd.root_file, tmp_path / "expired.json")
        assert old
        from fleet.trust.keys import rotate_keys as renew  # `edge-fleet keys renew` is this

        renew(kd.path, expires_days=365)
        publish_root(broker.url, kd, [])  # v2 follows v1 directly: no chain needed
        wait_until(lambda: (state(sub).get("trust") or {}).get("root_version") == 2,
                   what="the renewed root")
        sub.publish(f"{BASE}/cmd", command(kd, "restart"))
        wait_until(lambda: any(report(p)["ok"] for p in sub.on("/cmd/result")),
                   what="a command carried out under the renewed root")
    finally:
        sub.close()
        agent.stop()


def test_a_withheld_heartbeat_makes_the_device_stale_and_a_fresh_one_clears_it(
        tmp_path: Path, broker: Broker, releases: dict[str, Path]) -> None:
    kd = KeyDir(releases["keys"])
    keys = kd.keys_of(kd.root(), "command", None)
    where = tmp_path / "dev"
    where.mkdir()
    agent = AgentProcess(write_config(where, kd.path, profile=X86, mqtt={
        "brokers": [broker.url], "telemetry_interval_s": 0.2})).start()
    sub = Subscriber(broker, [f"{BASE}/#"])
    topic = "edge/v1/acme/heartbeat"
    try:
        agent.install(releases["onnx1"])
        first = heartbeat("acme", keys, ttl=timedelta(seconds=2))
        publish_retained(broker.url, topic, first)
        wait_until(lambda: (state(sub).get("trust") or {}).get("heartbeat_counter"),
                   what="the heartbeat taken")
        wait_until(lambda: events(sub, "trust.stale"), what="trust.stale")
        wait_until(lambda: (state(sub).get("trust") or {}).get("stale") is True,
                   what="stale in the state")
        publish_retained(broker.url, topic, first)  # the same one again: still stale
        assert agent.call("POST", "/v2/models/digits/infer", {"inputs": [{
            "name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
            "data": [0.0] * 64}]})[0] == 200  # serving goes on
        publish_retained(broker.url, topic, heartbeat("acme", keys, ttl=timedelta(minutes=5)))
        wait_until(lambda: events(sub, "trust.fresh"), what="trust.fresh")
        assert state(sub)["trust"]["stale"] is False
        # A heartbeat the command keys did not sign is ignored.
        forged = json.loads(heartbeat("acme", keys, ttl=timedelta(hours=1)))
        forged["signed"]["counter"] += 10**9
        publish_retained(broker.url, topic, json.dumps(forged).encode())
        agent.stop()
        agent.start()  # the counter survives: the forged one was never taken
        persisted = json.loads((where / "state" / "heartbeat.json").read_text())
        assert persisted["counter"] < forged["signed"]["counter"]
    finally:
        sub.close()
        agent.stop()


def test_simulated_devices_follow_a_renewed_root(tmp_path: Path, broker: Broker,
                                                 releases: dict[str, Path]) -> None:
    from fleet.sim.processes import SimulatedFleet
    from fleet.sim.settings import SimSettings

    kd = KeyDir(Path(shutil.copytree(releases["keys"], tmp_path / "keys")))
    pinned = Path(shutil.copyfile(kd.root_file, tmp_path / "root-v1.json"))
    sub = Subscriber(broker, ["edge/v1/acme/+/state"])
    with SimulatedFleet(SimSettings(broker=broker.url, root_file=pinned, groups=("lab",),
                                    profile=X86, telemetry_interval_s=0.5), 3) as sims:
        assert sims.start() == 3
        rotate_keys(kd.path, expires_days=400)  # `keys renew`
        publish_root(broker.url, kd, [])

        def on_v2() -> set[str]:
            latest = {}
            for p in sub.on("/state"):
                s = report(p)
                latest[s["device"]] = (s.get("trust") or {}).get("root_version")
            return {d for d, v in latest.items() if v == 2}
        wait_until(lambda: on_v2() == set(sims.names), what="every simulated device on v2")
    sub.close()


class SlowChain:
    """A chain server that answers `N.root.json` one byte every 2 s, for ever (as a
    hostile URL in the unsigned announcement would): it counts the requests it got."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/roots/"
        self.requests = 0
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.requests += 1
            threading.Thread(target=self._dribble, args=(conn,), daemon=True).start()

    def _dribble(self, conn: Any) -> None:
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            while not self.done.wait(2.0):
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

    def close(self) -> None:
        self.done.set()
        self.sock.close()


def test_a_slow_chain_url_holds_neither_the_heartbeat_nor_a_newer_root(
        tmp_path: Path, broker: Broker, releases: dict[str, Path]) -> None:
    """An announcement whose chain server sends a byte every 2 s: heartbeats are taken
    meanwhile (they have their own thread), the fetch gives up at its total deadline
    (`FETCH_DEADLINE_S`, not a per-read timeout the dribble never trips) with a
    trust.root_refused event, and a good announcement published while another slow walk is
    under way is adopted at once (it supersedes the walk). Before, one thread did both and
    a read timeout never fired: the device stayed on its old root for as long as the
    server dribbled."""
    import time

    from agent.link.trustfeed import FETCH_DEADLINE_S, announcement

    kd = KeyDir(Path(shutil.copytree(releases["keys"], tmp_path / "keys")))
    pinned = Path(shutil.copyfile(kd.root_file, tmp_path / "root-v1.json"))
    rotate_keys(kd.path, expires_days=400)
    rotate_keys(kd.path, expires_days=400)  # v3: the device must fetch v2
    copy_roots(kd, tmp_path / "artifacts")
    where = tmp_path / "dev"
    where.mkdir()
    cfg = write_config(where, kd.path, profile=X86, mqtt={
        "brokers": [broker.url], "telemetry_interval_s": 0.2})
    cfg.write_text(cfg.read_text().replace(str(kd.root_file), str(pinned)))
    agent = AgentProcess(cfg).start()
    sub = Subscriber(broker, [f"{BASE}/#"])
    slow = SlowChain()
    server, url = serve(tmp_path / "artifacts")
    hb_keys = kd.keys_of(kd.root(), "command", None)  # renewals keep the keys v1 trusts
    root_topic, hb_topic = "edge/v1/acme/root", "edge/v1/acme/heartbeat"
    try:
        wait_until(lambda: sub.on("/state"), what="the agent online")
        t0 = time.monotonic()
        publish_retained(broker.url, root_topic, announcement(kd.root_file.read_bytes(),
                                                              [slow.url]))
        wait_until(lambda: slow.requests == 1, what="the slow fetch under way")
        publish_retained(broker.url, hb_topic, heartbeat("acme", hb_keys))
        wait_until(lambda: (state(sub).get("trust") or {}).get("heartbeat_counter"),
                   what="the heartbeat taken during the slow fetch")
        wait_until(lambda: events(sub, "trust.root_refused"), timeout_s=FETCH_DEADLINE_S + 15,
                   what="the fetch given up at its deadline")
        refused = events(sub, "trust.root_refused")[0]
        assert f"not fetched within {FETCH_DEADLINE_S:g} s" in refused["message"], refused
        assert time.monotonic() - t0 < FETCH_DEADLINE_S + 10
        assert state(sub)["trust"]["root_version"] == 1
        # Another slow walk, then the good announcement: it wins at once.
        publish_retained(broker.url, root_topic, announcement(kd.root_file.read_bytes(),
                                                              [slow.url]))
        wait_until(lambda: slow.requests == 2, what="the second slow fetch under way")
        publish_retained(broker.url, root_topic, announcement(kd.root_file.read_bytes(),
                                                              [f"{url}/roots/"]))
        wait_until(lambda: (state(sub).get("trust") or {}).get("root_version") == 3,
                   timeout_s=FETCH_DEADLINE_S / 2, what="root v3 from the good chain")
    finally:
        slow.close()
        server.shutdown()
        sub.close()
        agent.stop()


def redirector(to: str) -> Any:
    """An HTTP server answering every GET with 302 to the same path under `to`."""
    import http.server
    import threading

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name
            self.send_response(302)
            self.send_header("Location", to + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_pinned_root_urls_are_used_whatever_the_announcement_names(
        tmp_path: Path, broker: Broker, releases: dict[str, Path]) -> None:
    """With `mqtt.root_urls`, the chain comes from the device's own bases: an announcement
    naming a slow server is fetched from the pinned one (which redirects, as a static host
    may), the slow one never asked."""
    from agent.link.trustfeed import announcement

    kd = KeyDir(Path(shutil.copytree(releases["keys"], tmp_path / "keys")))
    pinned = Path(shutil.copyfile(kd.root_file, tmp_path / "root-v1.json"))
    rotate_keys(kd.path, expires_days=400)
    rotate_keys(kd.path, expires_days=400)
    copy_roots(kd, tmp_path / "artifacts")
    server, target = serve(tmp_path / "artifacts")
    hop, url = redirector(target)
    slow = SlowChain()
    where = tmp_path / "dev"
    where.mkdir()
    cfg = write_config(where, kd.path, profile=X86, mqtt={
        "brokers": [broker.url], "telemetry_interval_s": 0.2,
        "root_urls": [f"{url}/roots/"]})
    cfg.write_text(cfg.read_text().replace(str(kd.root_file), str(pinned)))
    agent = AgentProcess(cfg).start()
    sub = Subscriber(broker, [f"{BASE}/#"])
    try:
        publish_retained(broker.url, "edge/v1/acme/root",
                         announcement(kd.root_file.read_bytes(), [slow.url]))
        wait_until(lambda: (state(sub).get("trust") or {}).get("root_version") == 3,
                   what="root v3 through the pinned chain")
        assert slow.requests == 0
    finally:
        slow.close()
        hop.shutdown()
        server.shutdown()
        sub.close()
        agent.stop()


def test_root_publish_wait_shows_each_device_on_its_root(
        tmp_path: Path, broker: Broker, releases: dict[str, Path]) -> None:
    """`edge-fleet root publish --wait`: the operator sees when a rotation has reached
    the fleet (every online device's signed state names the new root: exit 0, the table
    says who runs what) and when it has not (a root the device cannot reach, its chain
    unserved: exit 1, the device listed "not yet"); a registered device that never
    reported is listed as such."""
    import os
    import subprocess
    import sys

    from fixture_agent import register

    from fleet.devices.registry import FleetDB

    kd = KeyDir(Path(shutil.copytree(releases["keys"], tmp_path / "keys")))
    pinned = Path(shutil.copyfile(kd.root_file, tmp_path / "root-v1.json"))
    where = tmp_path / "dev"
    where.mkdir()
    cfg = write_config(where, kd.path, profile=X86, mqtt={
        "brokers": [broker.url], "telemetry_interval_s": 0.2})
    cfg.write_text(cfg.read_text().replace(str(kd.root_file), str(pinned)))
    db = FleetDB(tmp_path / "fleet.sqlite")
    register(db, where)
    db.register("ghost", next(iter(db.registered().values())))
    agent = AgentProcess(cfg).start()

    def publish(wait: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fleet.cli", "root", "publish", "--dir", str(kd.path),
             "--broker", broker.url, "--wait", str(wait), "--db", str(tmp_path / "fleet.sqlite")],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "EDGE_FLEET_CERT_FILE": "", "EDGE_FLEET_KEY_FILE": ""})
    try:
        rotate_keys(kd.path, expires_days=400)  # v2 follows v1: no chain needed
        done = publish(30)
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert any(line.split()[:3] == ["dev-1", "yes", "v2+"] for line in lines), lines
        assert any(line.startswith("ghost") and "never reported" in line for line in lines)
        assert "root v2: 1 device(s) run it, 0 online not yet, 0 offline, 1 never reported" \
            in done.stdout
        rotate_keys(kd.path, expires_days=400)
        rotate_keys(kd.path, expires_days=400)  # v4: v3 must come from a chain nobody serves
        late = publish(3)
        assert late.returncode == 1, late.stdout + late.stderr
        assert any(line.split()[:4] == ["dev-1", "yes", "v2", "not"]
                   for line in late.stdout.splitlines()), late.stdout
        assert "1 online device(s) still on an older root" in late.stdout
    finally:
        agent.stop()
