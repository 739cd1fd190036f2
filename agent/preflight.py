"""Every check `edge-agent run` makes of its configuration before it serves, in one place.

`run` calls `preflight` first and refuses to start on any problem; `check-config` calls the
same function and prints what it found, so the two never disagree. All problems are
collected, not just the first: an operator fixing a device config sees the whole list.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from agent.config import AgentConfig
from agent.durable import check_private
from agent.errors import AgentError, ConfigError

MIN_TOKEN_CHARS = 16


def _readable(path: Path, what: str) -> str | None:
    if not path.is_file():
        return f"{what} {path} does not exist"
    if not os.access(path, os.R_OK):
        return f"{what} {path} is not readable by this user"
    return None


def _check(problems: list[str], fn: Callable[[], object]) -> None:
    try:
        fn()
    except (AgentError, OSError, ValueError) as exc:
        problems.append(str(exc))


def preflight(config: AgentConfig) -> list[str]:
    """What was checked, one line each.

    Raises:
        ConfigError: one or more problems, every one named (one per line).
    """
    problems: list[str] = []
    checked: list[str] = []
    _check(problems, lambda: _profile(config, checked))
    _check(problems, lambda: _root(config, checked))
    if config.paths.device_key is not None:
        _check(problems, lambda: _device_key(config, checked))
    elif config.mqtt is not None:
        problems.append("mqtt is configured but paths.device_key is not: the fleet link "
                        "signs every report with the device key")
    if config.api.tcp_port is not None:
        _check(problems, lambda: read_token(config.api.token_file))
        checked.append(f"API token {config.api.token_file}")
    if config.mqtt is not None:
        _mqtt(config, problems, checked)
    if problems:
        raise ConfigError("\n".join(problems))
    return checked


def _profile(config: AgentConfig, checked: list[str]) -> None:
    from agent.profiles import load_profile  # noqa: PLC0415  # each check loads what it needs

    load_profile(config.device.profile)
    checked.append(f"firmware profile {config.device.profile}")


def _root(config: AgentConfig, checked: list[str]) -> None:
    from agent.trust.root import load_pinned_root  # noqa: PLC0415

    path = config.paths.root_file
    if (why := _readable(path, "the trusted root (paths.root_file)")) is not None:
        raise ConfigError(why)
    root = load_pinned_root(path.read_bytes())
    if root.fleet != config.device.fleet:
        raise ConfigError(f"device.fleet is {config.device.fleet!r} but the trusted root "
                          f"{path} is fleet {root.fleet!r}'s: every command and release "
                          "would be refused")
    checked.append(f"trusted root {path} (fleet {root.fleet}, v{root.version})")


def _device_key(config: AgentConfig, checked: list[str]) -> None:
    from agent.trust.identity import (  # noqa: PLC0415
        load_device_key,
        load_report_signer,
    )

    path = config.paths.device_key
    assert path is not None
    if (why := _readable(path, "the device key (paths.device_key)")) is not None:
        raise ConfigError(why)
    check_private(path, "the device key")
    device, _ = load_device_key(path)
    if config.mqtt is not None:
        device = load_report_signer(path).device
    if device != config.device.id:
        raise ConfigError(f"device key {path} is device {device}'s, not "
                          f"{config.device.id}'s (device.id)")
    checked.append(f"device key {path}")


def read_token(path: Path) -> str:
    """The local API's bearer token.

    Raises:
        AgentError: unreadable, readable by others, or shorter than 16 characters.
    """
    try:
        check_private(path, "the API token file")
        token = path.read_text().strip()
    except OSError as exc:
        raise AgentError(f"api.tcp_port is set but the token file {path} (api.token_file) is "
                         f"unreadable: {exc.strerror}") from exc
    if len(token) < MIN_TOKEN_CHARS:
        raise AgentError(f"the API token in {path} is shorter than {MIN_TOKEN_CHARS} "
                         "characters")
    return token


def _mqtt(config: AgentConfig, problems: list[str], checked: list[str]) -> None:
    from agent.link.mqtt import Broker  # noqa: PLC0415  # paho only with a fleet link

    m = config.mqtt
    assert m is not None
    for url in m.brokers:
        _check(problems, lambda url=url: Broker.parse(url))  # type: ignore[misc]
    for path, what in ((m.ca_file, "mqtt.ca_file"), (m.cert_file, "mqtt.cert_file"),
                       (m.key_file, "mqtt.key_file"), (m.password_file, "mqtt.password_file")):
        if path is not None and (why := _readable(path, what)) is not None:
            problems.append(why)
    if (m.cert_file is None) != (m.key_file is None):
        problems.append("mqtt.cert_file and mqtt.key_file go together (mutual TLS)")
    if m.key_file is not None and m.key_file.is_file():
        _check(problems, lambda: check_private(m.key_file, "mqtt.key_file"))  # type: ignore[arg-type]
    if m.password_file is not None and m.username is None:
        problems.append("mqtt.password_file is set without mqtt.username")
    checked.append(f"MQTT brokers {', '.join(m.brokers)}")
