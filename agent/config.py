"""The agent's configuration: `/etc/edge-agent/agent.toml`, environment overrides, one
frozen model.

Sources, strongest first: command-line arguments (`overrides`), the environment
(`EDGE_AGENT__SECTION__FIELD=value`, the value in TOML syntax or a bare string), the file.
Every section forbids unknown keys, limits carry their unit in the name, and a problem is
reported with the file, the dotted field and the reason; `edge-agent check-config` lists
them all, and the daemon refuses to start on any.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.errors import ConfigError

DEFAULT_PATH = Path("/etc/edge-agent/agent.toml")
ENV_PREFIX = "EDGE_AGENT__"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeviceSection(_Section):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    fleet: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    groups: list[str] = Field(default_factory=list)
    profile: str


class PathsSection(_Section):
    state_dir: Path = Path("/var/lib/edge-agent")
    # The fleet's root.json, pinned at provisioning; accepted rotations are kept in state_dir.
    root_file: Path = Path("/etc/edge-agent/root.json")
    # X25519 key for sealed models; None when this device takes no sealed bundles.
    device_key: Path | None = None


class ApiSection(_Section):
    socket: Path = Path("/run/edge-agent/api.sock")
    socket_mode: int = Field(default=0o660, ge=0, le=0o777)
    # Install, rollback and status: a role of its own (the agent's user, and root).
    admin_socket: Path = Path("/run/edge-agent/admin.sock")
    admin_socket_mode: int = Field(default=0o600, ge=0, le=0o777)
    # TCP stays off unless a port is set; it always requires the bearer token.
    tcp_host: str = "127.0.0.1"
    tcp_port: int | None = Field(default=None, ge=1, le=65535)
    # A listener for Prometheus and health checks only (/metrics, /v2/health/live and
    # /ready), without a token, like Triton's metrics port; None: off. Keep it on loopback
    # (or a management network): metrics say which models a device runs.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    token_file: Path = Path("/etc/edge-agent/api.token")
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # JSON a request may carry (the whole body, or the head before binary tensors): one
    # `json.loads` holds the GIL and so stalls every client, 77 ms for 6 MB. Larger
    # tensors travel in the binary tensor extension.
    max_json_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Large JSON (over 64 KiB) is parsed and encoded one request at a time and at most this
    # share of the wall time (agent.serving.heavy): small requests keep their latency
    # while others send megabytes of JSON; those are slowed, not refused.
    heavy_json_share: float = Field(default=0.25, gt=0, le=1)
    # A bundle archive uploaded to the admin socket (`edge-agent install`), streamed to
    # staging as it arrives, never held in memory.
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    # Connections open at once on each listener: the inference socket, and TCP (each its
    # own cap, so neither starves the other); the admin socket has its own few, and the
    # metrics listener 8. At a cap a newcomer takes the place of the longest-idle
    # keep-alive connection, or gets 503 when none is idle. All of them together are kept
    # under the process's descriptor limit, which the agent raises to the unit's at start.
    max_connections: int = Field(default=64, ge=1, le=10_000)
    admin_max_connections: int = Field(default=8, ge=1, le=1_000)
    head_timeout_s: float = Field(default=10.0, gt=0)  # from the head's first byte
    body_timeout_s: float = Field(default=30.0, gt=0)  # from the end of the head
    idle_timeout_s: float = Field(default=60.0, gt=0)  # a keep-alive connection, waiting
    # The request parser: auto is httptools (llhttp, C) where installed, else h11 (pure
    # Python, the only one on armv7l); h11 forces the pure-Python one everywhere.
    http_parser: Literal["auto", "h11"] = "auto"
    # Triton's system shared-memory extension: a local process registers a shared-memory
    # object (/dev/shm) as a region and passes tensors through it. Off by default, as in
    # Triton (--allow-client-shm): a client can make the agent read and write any object
    # under /dev/shm that the agent's user may open.
    shared_memory: bool = False
    shared_memory_max_regions: int = Field(default=16, ge=1, le=1024)  # per client
    shared_memory_max_region_bytes: int = Field(default=64 * 1024 * 1024, ge=1)

    @model_validator(mode="after")
    def _tcp_needs_token(self) -> ApiSection:
        if self.tcp_port is not None and not str(self.token_file):
            raise ValueError("tcp_port needs token_file")
        return self


class SchedulerSection(_Section):
    queue_max: int = Field(default=64, ge=1, le=100_000)
    max_batch: int = Field(default=8, ge=1, le=1024)
    max_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    # Requests without a deadline get this one; it bounds how stale an answer may be.
    default_deadline_ms: float = Field(default=1000.0, gt=0)
    # None: from the firmware profile's memory section.
    memory_budget_bytes: int | None = Field(default=None, ge=1)
    arena_budget_bytes: int | None = Field(default=None, ge=1)
    # Refuse new work when the system has less than this available (psutil).
    min_available_bytes: int = Field(default=32 * 1024 * 1024, ge=0)


class ThermalSection(_Section):
    # None: the profile's sensor; a file with millidegrees (sysfs) or degrees.
    sensor: Path | None = None
    poll_s: float = Field(default=1.0, gt=0)
    throttle_c: float | None = None
    critical_c: float | None = None
    hysteresis_c: float | None = Field(default=None, ge=0)
    # While the sensor gives no reading (missing, unreadable, garbage): serve as if
    # normal, throttled or critical. The state then shows as "unknown".
    on_unknown: Literal["normal", "throttled", "critical"] = "normal"


class SystemdSection(_Section):
    watchdog: bool = True
    # Rendered into the unit by `edge-agent unit`; the daemon pings at half this interval.
    watchdog_s: int = Field(default=30, ge=2, le=3600)
    # None: the profile's model + arena budgets plus the runtimes' overhead.
    memory_max_bytes: int | None = Field(default=None, ge=64 * 1024 * 1024)


class MqttSection(_Section):
    """The fleet link (absent: the agent serves locally only)."""

    brokers: list[str] = Field(min_length=1)  # mqtt://host:port or mqtts://host:port
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None  # client certificate for mutual TLS
    key_file: Path | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    # A persistent MQTT session: commands sent while the device is away wait this long at
    # the broker (each also expires on its own). 0: a clean session every connect.
    session_expiry_s: int = Field(default=7 * 86_400, ge=0, le=0xFFFFFFFE)
    telemetry_interval_s: float = Field(default=10.0, gt=0)
    outbox_cap: int = Field(default=10_000, ge=10)
    # After a deploy activates, anomalies of the new model within this window roll it back.
    health_window_s: float = Field(default=30.0, ge=0)
    replay_window_s: float = Field(default=86_400.0, gt=0)
    download_timeout_s: float = Field(default=30.0, gt=0)
    download_min_rate_bytes_per_s: float = Field(default=16 * 1024, ge=0)
    # A `trust.root_expiring` event (daily) once the trusted root expires within this.
    root_expiry_warning_s: float = Field(default=30 * 86_400.0, ge=0)
    # Where missing roots are fetched from (`{url}{N}.root.json`). Empty: the URLs the
    # announcement names (unsigned; each root is verified, and a fetch has a deadline).
    # Set: only these, whatever an announcement says.
    root_urls: list[Annotated[str, Field(pattern=r"^https?://\S+/$", max_length=1024)]] = \
        Field(default_factory=list, max_length=8)


class Thresholds(_Section):
    """`[detectors]`: when an anomaly detector fires (`agent.link.detectors`). A `config`
    command changes them at run time and the change is kept in the state directory
    (`agent.link.settings`), so it survives a restart."""

    latency_z: float = Field(default=4.0, gt=0)
    latency_warmup: int = Field(default=5, ge=0)
    latency_alpha: float = Field(default=0.2, gt=0, le=1)
    # A latency change smaller than this fraction of the baseline never fires, however
    # steady the baseline was (a near-zero variance would make any jitter "anomalous").
    latency_min_relative: float = Field(default=0.25, ge=0)
    error_rate: float = Field(default=0.05, ge=0, le=1)
    refusal_rate: float = Field(default=0.25, ge=0, le=1)
    min_requests: int = Field(default=20, ge=1)
    input_psi: float = Field(default=0.25, gt=0)
    output_psi: float = Field(default=0.25, gt=0)
    confidence_drop: float = Field(default=0.15, ge=0, le=1)
    # An autoencoder's window fires when more than this share of its samples score above
    # the manifest's threshold (about 1 % of normal samples do, by construction).
    anomaly_rate: float = Field(default=0.05, gt=0, le=1)
    memory_growth_bytes_per_hour: float = Field(default=64 * 1024 * 1024, gt=0)
    memory_min_readings: int = Field(default=10, ge=2)
    # A slope over a short span extrapolates noise (a model load, a GC) to "per hour".
    memory_min_span_s: float = Field(default=120.0, ge=0)


class AgentConfig(_Section):
    device: DeviceSection
    paths: PathsSection = PathsSection()
    api: ApiSection = ApiSection()
    scheduler: SchedulerSection = SchedulerSection()
    thermal: ThermalSection = ThermalSection()
    systemd: SystemdSection = SystemdSection()
    mqtt: MqttSection | None = None
    detectors: Thresholds = Thresholds()

    @model_validator(mode="after")
    def _reports_are_signed(self) -> AgentConfig:
        if self.mqtt is not None and self.paths.device_key is None:
            raise ValueError("mqtt needs paths.device_key: the device signs what it reports "
                             "(make it with `edge-agent device-key`)")
        return self


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(data: dict[str, Any], dotted: list[str], value: Any) -> None:
    for key in dotted[:-1]:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise ConfigError(f"{'.'.join(dotted)}: {key} is not a section")
    data[dotted[-1]] = value


def environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`EDGE_AGENT__API__TCP_PORT=8080` -> {"api": {"tcp_port": 8080}}."""
    out: dict[str, Any] = {}
    for key, text in environ.items():
        if key.startswith(ENV_PREFIX):
            _set_dotted(out, key[len(ENV_PREFIX):].lower().split("__"), _env_value(text))
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def problems(exc: ValidationError) -> list[str]:
    """One line per problem: dotted field and reason."""
    return [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
            for e in exc.errors()]


def load_config(path: Path = DEFAULT_PATH, *, environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> AgentConfig:
    """Read, merge and validate the configuration.

    Raises:
        ConfigError: unreadable file, TOML syntax, or fields that do not validate (all of
            them listed in the message).
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    data = _merge(data, environment_overrides(os.environ if environ is None else environ))
    data = _merge(data, overrides or {})
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: " + "; ".join(problems(exc))) from exc
