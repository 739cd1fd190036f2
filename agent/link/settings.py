"""The fleet link's live settings: telemetry interval, health window and detector
thresholds, from agent.toml (`[mqtt]`, `[detectors]`) with the changes `config` commands
made on top.

A `config` command's changes are validated by the same pydantic models as the file (a bad
value is refused whole, naming the field), then kept in `STATE/settings.json` (durable
write), so they survive a restart and a `reload`; sending the setting again with another
value changes it. A damaged settings file is reported at start and ignored: the file's
values apply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.config import MqttSection, Thresholds, problems
from agent.durable import write_atomic
from agent.errors import CommandError

#: The `[mqtt]` fields a `config` command may change; every `Thresholds` field may change.
LINK_FIELDS = ("telemetry_interval_s", "health_window_s")
MAX_SETTINGS_BYTES = 64 * 1024


@dataclass(frozen=True)
class LinkSettings:
    mqtt: MqttSection
    thresholds: Thresholds

    @property
    def interval_s(self) -> float:
        return self.mqtt.telemetry_interval_s

    @property
    def health_window_s(self) -> float:
        return self.mqtt.health_window_s

    def changed(self, changes: Mapping[str, Any]) -> LinkSettings:
        """These settings with `changes` applied.

        Raises:
            CommandError: check "settings": an unknown setting or a value the models
                refuse; the message names each.
        """
        if not changes:
            return self  # nothing stored (frozen: shared, not copied)
        known = set(LINK_FIELDS) | set(Thresholds.model_fields)
        if unknown := sorted(set(changes) - known):
            raise CommandError(f"unknown settings: {', '.join(unknown)}", check="settings",
                               unknown=unknown)
        link = {k: v for k, v in changes.items() if k in LINK_FIELDS}
        thresholds = {k: v for k, v in changes.items() if k not in LINK_FIELDS}
        try:
            return LinkSettings(
                MqttSection.model_validate({**self.mqtt.model_dump(), **link}),
                Thresholds.model_validate({**self.thresholds.model_dump(), **thresholds}))
        except ValidationError as exc:
            raise CommandError("bad value: " + "; ".join(problems(exc)),
                               check="settings") from exc


class SettingsStore:
    """The accumulated `config` command changes, in one JSON file (or in memory)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def load(self) -> tuple[dict[str, Any], str | None]:
        """The stored changes, and a problem to report when the file is unusable."""
        if self.path is None or not self.path.exists():
            return {}, None
        try:
            raw = self.path.read_bytes()[:MAX_SETTINGS_BYTES + 1]
            if len(raw) > MAX_SETTINGS_BYTES:
                raise ValueError(f"larger than {MAX_SETTINGS_BYTES} bytes")
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            return {}, f"{self.path}: ignored ({exc}); the configuration file's values apply"
        return data, None

    def add(self, changes: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        data, _ = self.load()
        data.update(changes)
        write_atomic(self.path, json.dumps(data, sort_keys=True).encode())


def initial_settings(mqtt: MqttSection, thresholds: Thresholds, store: SettingsStore
                     ) -> tuple[LinkSettings, list[str]]:
    """The file's settings with the stored command changes on top; problems to report."""
    base = LinkSettings(mqtt, thresholds)
    changes, problem = store.load()
    notes = [problem] if problem else []
    try:
        return base.changed(changes), notes
    except CommandError as exc:
        notes.append(f"{store.path}: stored settings ignored ({exc})")
        return base, notes
