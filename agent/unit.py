"""The systemd unit, rendered from the configuration so `MemoryMax` follows the budgets.

`systemd/edge-agent.service` in the repository is this template rendered with defaults (a
test keeps them identical); `edge-agent unit --config PATH` renders it for a device:
MemoryMax is the firmware profile's model + arena budgets plus `RUNTIME_OVERHEAD_BYTES`
(interpreter, runtimes, HTTP server), unless the config sets `systemd.memory_max_bytes`.
"""

from __future__ import annotations

from pathlib import Path

from agent.config import DEFAULT_PATH, AgentConfig
from agent.profiles import load_profile

RUNTIME_OVERHEAD_BYTES = 192 * 1024 * 1024
# What the Debian package provides (a link into its virtual environment under
# /opt/venvs/edgekeeper); `edge-agent unit` renders the running installation's own path.
DEFAULT_EXEC = "/usr/bin/edge-agent"
DEFAULT_MEMORY_MAX = 512 * 1024 * 1024

TEMPLATE = """# edge-agent: verified on-device inference. Install with the sysusers.d and
# tmpfiles.d files beside this one; `edge-agent unit --config /etc/edge-agent/agent.toml`
# prints this unit with MemoryMax computed from the configuration and firmware profile.
[Unit]
Description=edge-agent: verified on-device inference
Documentation=file:/usr/share/doc/edgekeeper/README.md
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=300
StartLimitBurst=10

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start} run --config {config}
User=edge-agent
Group=edge-agent
Restart=on-failure
RestartSec=2s
# Start verifies every installed bundle and runs its self-test before READY=1.
TimeoutStartSec=180s
TimeoutStopSec=30s
# The daemon pings from its event loop every WatchdogSec/2; a wedged loop gets restarted.
WatchdogSec={watchdog}
# No core dumps: the watchdog kills with SIGABRT, and a core would hold decrypted models
# and the device's keys.
LimitCORE=0
# Memory: the profile's model + arena budgets plus the runtime's own overhead. Above it the
# kernel kills the agent inside its cgroup only; the scheduler refuses work well before.
MemoryMax={memory_max}
MemoryHigh={memory_high}
StateDirectory=edge-agent
StateDirectoryMode=0750
RuntimeDirectory=edge-agent
RuntimeDirectoryMode=0750
ConfigurationDirectory=edge-agent
ConfigurationDirectoryMode=0750
UMask=0027

# Hardening (systemd.exec(5)); `systemd-analyze security edge-agent.service` rates it.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateMounts=yes
PrivateTmp=yes
PrivateDevices=yes
# NPU/TPU delegates need their device node: add it in a drop-in, e.g.
#   [Service]
#   PrivateDevices=no
#   DeviceAllow=/dev/apex_0 rw
DevicePolicy=closed
PrivateUsers=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
KeyringMode=private
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources @mount @swap @reboot
SystemCallFilter=~@raw-io @module @debug @cpu-emulation @obsolete
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


def _mib(n: int) -> str:
    return f"{max(1, n // (1024 * 1024))}M"


def memory_max_bytes(config: AgentConfig | None) -> int:
    if config is None:
        return DEFAULT_MEMORY_MAX
    if config.systemd.memory_max_bytes is not None:
        return config.systemd.memory_max_bytes
    mem = load_profile(config.device.profile).memory
    budget = config.scheduler.memory_budget_bytes or (mem.model_budget_bytes
                                                      + mem.arena_budget_bytes)
    return budget + RUNTIME_OVERHEAD_BYTES


def render_unit(config: AgentConfig | None = None, *, config_path: Path = DEFAULT_PATH,
                exec_start: str = DEFAULT_EXEC) -> str:
    """The unit text for `config` (None: the repository's defaults)."""
    limit = memory_max_bytes(config)
    watchdog = config.systemd.watchdog_s if config is not None else 30
    return TEMPLATE.format(exec_start=exec_start, config=config_path,
                           memory_max=_mib(limit), memory_high=_mib(limit * 7 // 8),
                           watchdog=f"{watchdog}s")
