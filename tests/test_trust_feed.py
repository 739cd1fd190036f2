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

from fleet.artifacts import serve_in_thread as serve
from fleet.commands import build_command, deploy_fields, sign_command
from fleet.keys import KeyDir, init_keys, rotate_keys
from fleet.publish import copy_roots, heartbeat, publish_retained, publish_root
from fleet.release import pack_bundle, sign_bundle

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
    return report(sub.on("/state")[-1])


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
        from fleet.keys import rotate_keys as renew  # `edge-fleet keys renew` is this

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
    from fleet.simulate import SimSettings, SimulatedFleet

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
