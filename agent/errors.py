"""Every error the agent package raises on purpose, in one tree, split by what the caller
does next.

    AgentError                    root of everything this package raises on purpose
    ├── ConfigError               bad configuration or profile: fail at start, fix the file
    │   ├── ProfileError          unknown or invalid firmware profile
    │   └── StateLocked           another edge-agent process holds the state directory
    ├── RejectedError             untrusted input refused: never retry the same bytes
    │   ├── BundleError           a bundle: manifest, files, version, expiry, compatibility
    │   ├── SignatureError        signatures below a role's threshold (unsigned, wrong key...)
    │   ├── RootError             a new root.json that does not chain from the trusted one
    │   ├── CommandError          a command: malformed, expired, replayed, misaddressed
    │   └── ReportError           a device's report: malformed, or not signed by its key
    ├── DownloadError             transport failure (refused, timed out, too slow): retry later
    ├── RuntimeLoadError          a model file its runtime cannot load: the update fails
    ├── StoreError                the update journal cannot be written or advanced (the
    │                             device's storage): the update fails, try again later
    ├── Busy                      another update is in progress: send it again later
    ├── Refused                   the scheduler refused a request (budget, thermal, queue,
    │                             deadline): back off; carries `reason` and an HTTP `status`
    ├── UnknownModel              a request for a model that is not installed
    └── ApiError                  a local API request refused, with its HTTP `status`

Every `RejectedError` carries `check` (a short stable name of the check that failed, e.g.
"sha256", "threshold", "replay") and `details` (the values involved), so callers report and
count rejections without parsing messages.

Programmer misuse (wrong argument types, calling out of order) raises builtins instead.
"""

from __future__ import annotations

from typing import Any


class AgentError(Exception):
    """Root of the agent's errors."""


class ConfigError(AgentError):
    """A configuration problem; raised at start, with the file and field involved."""


class StateLocked(ConfigError):
    """Another edge-agent process holds the state directory."""


class ProfileError(ConfigError):
    """A firmware profile is unknown or does not validate.

    Attributes:
        profile: the profile name or path asked for.
    """

    def __init__(self, message: str, *, profile: str) -> None:
        super().__init__(message)
        self.profile = profile


class RejectedError(AgentError):
    """Input from outside was refused; retrying the same bytes cannot succeed.

    Attributes:
        check: short stable name of the check that failed.
        details: the values involved (versions, key ids, sizes...), JSON-serialisable.
    """

    def __init__(self, message: str, *, check: str, **details: Any) -> None:
        super().__init__(message)
        self.check = check
        self.details = details


class BundleError(RejectedError):
    """A bundle is malformed, its files do not match the manifest, or it is not for us.

    Attributes:
        path: the file inside the bundle, when one is involved.
    """

    def __init__(self, message: str, *, check: str, path: str | None = None,
                 **details: Any) -> None:
        super().__init__(message, check=check, **details)
        self.path = path


class SignatureError(RejectedError):
    """Signed bytes whose valid signatures from the role's keys fall below its threshold."""


class RootError(RejectedError):
    """A root.json that is malformed, expired, or not signed by both old and new roots."""


class CommandError(RejectedError):
    """A command that is malformed, expired, replayed or addressed to someone else."""


class ReportError(RejectedError):
    """A device report (state, telemetry, event, result) that is malformed, claims another
    device, or is not signed by the key registered for its device."""


class DownloadError(AgentError):
    """A transport failure (refused, timed out, too slow, cut off): retry later."""


class RuntimeLoadError(AgentError):
    """A model file could not be loaded by its runtime."""


class StoreError(AgentError):
    """The model store cannot record an update: its journal cannot be written (the
    device's storage) or does not allow the step (a journal changed under the agent).
    Nothing about the bundle; the model that served before keeps serving."""


class Busy(AgentError):
    """Another update is in progress; this one was refused, not queued."""


class Refused(AgentError):
    """The scheduler refused a request: `reason` (stable), `status` (HTTP), message."""

    def __init__(self, reason: str, status: int, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.status = status


class UnknownModel(AgentError):
    """A request named a model that is not installed."""

    def __init__(self, name: str) -> None:
        super().__init__(f"model {name!r} is not installed")
        self.name = name


class ApiError(AgentError):
    """A request the API refuses: HTTP `status` and a message for the error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
