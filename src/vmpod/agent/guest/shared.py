"""Guest side: the host's shared directory (virtio-fs) and paths below it.

Standard library only.
"""

from __future__ import annotations

import os

from vmpod.agent.guest.errors import AgentFailure
from vmpod.agent.guest.gproc import run_capture
from vmpod.agent.protocol import SHARED_FS_TAG

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vmpod.agent.guest.config import AgentConfig

_PART_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def _mount(config: AgentConfig, argv: list[str], what: str) -> None:
    code, out, err = run_capture([config.busybox, "mount", *argv], 4096)
    if code != 0:
        raise AgentFailure(f"{what}: {(err or out).strip()}")


def mount_shared(config: AgentConfig) -> None:
    """Mount the host's shared directory (virtio-fs) at ``config.shared_dir``."""
    if not config.shared_premounted:
        os.makedirs(config.shared_dir, exist_ok=True)
        _mount(config, ["-t", "virtiofs", SHARED_FS_TAG, config.shared_dir], "mount the shared directory")


def shared_path(config: AgentConfig, rel: str) -> str:
    """The directory ``rel`` below the shared mount; never outside it."""
    parts = rel.split("/")
    if not rel or not all(p and set(p) <= _PART_OK and p not in (".", "..") for p in parts):
        raise AgentFailure(f"invalid shared path {rel!r}", "invalid")
    base = os.path.realpath(config.shared_dir)
    path = os.path.realpath(os.path.join(base, *parts))
    if not path.startswith(base + "/") or not os.path.isdir(path):
        raise AgentFailure(f"no shared directory {rel!r}", "not_found")
    return path
