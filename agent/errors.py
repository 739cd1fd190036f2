"""Errors of the agent package, split by what the caller does next.

    AgentError                    root of everything this package raises on purpose
    ├── ConfigError               bad configuration or profile: fail at start, fix the file
    │   └── ProfileError          unknown or invalid firmware profile
    └── RejectedError             untrusted input refused: never retry the same bytes
        └── BundleError           a bundle whose manifest or files do not hold together

Programmer misuse (wrong argument types, calling out of order) raises builtins instead.
"""

from __future__ import annotations


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
    """Input from outside was refused; retrying the same bytes cannot succeed."""


class BundleError(RejectedError):
    """A bundle's manifest or files are malformed or do not match each other.

    Attributes:
        check: short stable name of the check that failed (e.g. "sha256", "size").
        path: the file inside the bundle, when one is involved.
    """

    def __init__(self, message: str, *, check: str, path: str | None = None) -> None:
        super().__init__(message)
        self.check = check
        self.path = path
