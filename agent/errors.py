"""Errors of the agent package, split by what the caller does next.

    AgentError                    root of everything this package raises on purpose
    ├── ConfigError               bad configuration or profile: fail at start, fix the file
    │   └── ProfileError          unknown or invalid firmware profile
    └── RejectedError             untrusted input refused: never retry the same bytes
        ├── BundleError           a bundle: manifest, files, version, expiry, compatibility
        ├── SignatureError        signatures below a role's threshold (unsigned, wrong key...)
        ├── RootError             a new root.json that does not chain from the trusted one
        └── CommandError          a command: malformed, expired, replayed, misaddressed

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
