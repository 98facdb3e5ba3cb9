"""One exception hierarchy for vmpod; every error carries the context a user needs.

Each error renders as a single line (``str(err)``) that says what failed and what
to do; ``details`` keeps machine-readable context (argv, exit code, log tail).
"""

from __future__ import annotations

from typing import Any


class VmpodError(Exception):
    """Base of every error vmpod raises on purpose.

    ``hint`` tells the user what to do; ``exit_code`` is what the CLI exits with
    (125 like docker/podman for errors of the runtime itself).
    """

    exit_code = 125

    def __init__(self, message: str, *, hint: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(VmpodError):
    """Bad user input: flags, config files, unknown names."""


class ImageError(VmpodError):
    """An image reference that cannot be found, read or safely unpacked."""


class UnsafeLayerError(ImageError):
    """A layer entry that would escape the root filesystem or is not allowed."""


class AssetError(VmpodError):
    """Guest assets (kernel, initramfs, rootfs image) cannot be built or found."""


class CommandError(VmpodError):
    """An external tool failed; carries argv, exit code and output tail."""

    def __init__(
        self, message: str, *, argv: list[str], returncode: int | None, output_tail: str = "", hint: str = ""
    ) -> None:
        super().__init__(message, hint=hint, argv=argv, returncode=returncode, output_tail=output_tail)
        self.argv = argv
        self.returncode = returncode
        self.output_tail = output_tail


class MountError(VmpodError):
    """A host mount or unmount failed (carries the errno)."""


class HypervisorError(VmpodError):
    """The VMM failed to start, died, or refused a request."""

    def __init__(self, message: str, *, console_tail: str = "", hint: str = "", **details: Any) -> None:
        super().__init__(message, hint=hint, console_tail=console_tail, **details)
        self.console_tail = console_tail


class AgentError(VmpodError):
    """The guest agent misbehaved, timed out or reported a failure."""


class AgentTimeout(AgentError):
    """The guest agent did not answer in time."""


class ProtocolError(AgentError):
    """The guest sent something that breaks the protocol (size, schema, framing)."""


class SandboxError(VmpodError):
    """Sandbox lifecycle failures (state, locking, teardown)."""


class StateError(VmpodError):
    """An operation that the object's current state does not allow (state named)."""


class NetworkError(VmpodError):
    """A pod network namespace that cannot be inspected, wired to a tap or torn down."""


class ForensicsError(VmpodError):
    """Capture, verification or restore of an evidence archive failed."""
