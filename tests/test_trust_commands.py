"""Signed operator commands: forged, expired, replayed (also across a restart) and
misaddressed commands are refused with the check named; good ones verify."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fixture_trust import FLEET, KEYS, NOW, root

from agent.errors import CommandError, RejectedError, RootError, SignatureError
from agent.trust.command import Addressee, DeployCommand, ReplayPolicy, verify_command
from agent.trust.nonces import MemoryNonces, NonceStore, accept_command
from fleet.trust.commands import build_command, sign_command
from fleet.trust.keys import sign_envelope

ME = Addressee(fleet=FLEET, device="pi-0007", groups=frozenset({"lab", "eu-west"}))


def command(kind: str = "restart", *, signers: tuple[str, ...] = ("command-1",),
            issued: Any = NOW, ttl: timedelta = timedelta(hours=1), **kw: Any) -> bytes:
    kw.setdefault("device", None if "group" in kw else "pi-0007")
    cmd = build_command(kind, fleet=kw.pop("fleet", FLEET), ttl=ttl, now=issued, **kw)
    return sign_command(cmd, [KEYS[s] for s in signers])


def check_of(raw: bytes, exc: type[RejectedError] = CommandError, **kw: Any) -> str:
    kw.setdefault("now", NOW + timedelta(seconds=5))
    with pytest.raises(exc) as err:
        verify_command(root(), raw, me=ME, seen=kw.pop("seen", set()), **kw)
    return err.value.check


def test_a_good_command_verifies_for_the_device_and_for_its_group() -> None:
    for raw in (command(), command(group="lab")):
        cmd = verify_command(root(), raw, me=ME, now=NOW, seen=set())
        assert cmd.kind == "restart"


def test_deploy_command_carries_what_pins_the_bundle() -> None:
    fields = {"model": "digits", "version": 4, "manifest_sha256": "a" * 64,
              "archive": {"urls": ["https://artifacts/digits-v4.tar.zst"], "size_bytes": 9,
                          "sha256": "b" * 64}}
    cmd = verify_command(root(), command("deploy", **fields), me=ME, now=NOW, seen=set())
    assert isinstance(cmd, DeployCommand)
    assert (cmd.version, cmd.archive.size_bytes) == (4, 9)


def test_forged_command_unsigned() -> None:
    cmd = build_command("restart", fleet=FLEET, device="pi-0007", now=NOW)
    raw = sign_envelope(cmd.model_dump(mode="json", by_alias=True), [])
    assert check_of(raw, SignatureError) == "unsigned"


def test_forged_command_signed_by_a_release_key() -> None:
    cmd = build_command("restart", fleet=FLEET, device="pi-0007", now=NOW)
    raw = sign_envelope(cmd.model_dump(mode="json", by_alias=True), [KEYS["release-1"]])
    assert check_of(raw, SignatureError) == "threshold"


def test_forged_command_with_an_altered_field() -> None:
    data = json.loads(command())
    data["signed"]["target"]["device"] = "pi-0008"
    assert check_of(json.dumps(data).encode(), SignatureError) == "threshold"


def test_freeze_expired_command() -> None:
    raw = command(ttl=timedelta(minutes=1))
    assert check_of(raw, now=NOW + timedelta(minutes=2)) == "expired"


def test_command_issued_in_the_future_beyond_clock_skew() -> None:
    assert check_of(command(issued=NOW + timedelta(hours=2), ttl=timedelta(hours=3)),
                    now=NOW) == "future"


def test_command_older_than_the_replay_window_is_stale() -> None:
    raw = command(ttl=timedelta(days=3))
    assert check_of(raw, now=NOW + timedelta(days=2),
                    policy=ReplayPolicy(window=timedelta(days=1))) == "stale"


def test_command_under_an_expired_root_is_refused() -> None:
    with pytest.raises(RootError):
        verify_command(root(expires=NOW), command(), me=ME, now=NOW, seen=set())


@pytest.fixture(params=["sqlite", "memory"])
def nonces(request: Any, tmp_path: Path) -> NonceStore | MemoryNonces:
    """Either nonce store: the device's, or the simulator's (no durability)."""
    return NonceStore(tmp_path / "nonces.sqlite") if request.param == "sqlite" else MemoryNonces()


def test_replayed_command_is_refused(nonces: NonceStore | MemoryNonces) -> None:
    store = nonces
    raw = command()
    accept_command(root(), raw, me=ME, now=NOW, store=store)
    with pytest.raises(CommandError) as err:
        accept_command(root(), raw, me=ME, now=NOW + timedelta(seconds=1), store=store)
    assert err.value.check == "replay"


def test_replayed_command_is_refused_after_an_agent_restart(tmp_path: Path) -> None:
    raw = command()
    first = NonceStore(tmp_path / "nonces.sqlite")
    accept_command(root(), raw, me=ME, now=NOW, store=first)
    first.close()
    again = NonceStore(tmp_path / "nonces.sqlite")
    with pytest.raises(CommandError, match="already received"):
        accept_command(root(), raw, me=ME, now=NOW, store=again)


def test_a_forged_command_does_not_burn_the_nonce_of_a_real_one(
        nonces: NonceStore | MemoryNonces) -> None:
    store = nonces
    raw = command()
    forged = json.loads(raw)
    forged["signatures"] = []
    with pytest.raises(SignatureError):
        accept_command(root(), json.dumps(forged).encode(), me=ME, now=NOW, store=store)
    accept_command(root(), raw, me=ME, now=NOW, store=store)


def test_nonces_older_than_the_window_are_pruned(nonces: NonceStore | MemoryNonces) -> None:
    store = nonces
    accept_command(root(), command(), me=ME, now=NOW, store=store)
    accept_command(root(), command(issued=NOW + timedelta(days=2)), me=ME,
                   now=NOW + timedelta(days=2), store=store)
    assert len(store) == 1


def test_command_for_another_device() -> None:
    assert check_of(command(device="pi-0008")) == "addressee"


def test_command_for_a_group_this_device_is_not_in() -> None:
    assert check_of(command(group="us-east")) == "addressee"


def test_command_for_another_fleet() -> None:
    assert check_of(command(fleet="other-fleet")) == "addressee"


@pytest.mark.parametrize("target", [{}, {"device": "a", "group": "b"}])
def test_a_command_names_exactly_one_addressee(target: dict[str, str]) -> None:
    cmd = json.loads(command())
    cmd["signed"]["target"] = target
    raw = sign_envelope(cmd["signed"], [KEYS["command-1"]])
    assert check_of(raw) == "format"


def test_config_settings_are_typed_and_survive_signing() -> None:
    from fleet.trust.commands import parse_settings

    settings = parse_settings(["telemetry_interval_s=15", "latency_z=3.5", "drift=true",
                               "log_level=debug"])
    raw = command("config", group="lab", settings=settings)
    cmd = verify_command(root(), raw, me=ME, now=NOW, seen=set())
    assert cmd.kind == "config"
    assert cmd.settings == {"telemetry_interval_s": 15, "latency_z": 3.5, "drift": True,
                            "log_level": "debug"}
