"""Where vmpod keeps things: one place so tests and CLIs agree."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    """Cache (assets, images) and runtime (per-sandbox sockets, logs) roots."""

    home: Path  # persistent cache: kernels, guest images, container images
    run: Path  # volatile state: one directory per sandbox

    @property
    def kernels(self) -> Path:
        return self.home / "kernels"

    @property
    def guest(self) -> Path:
        return self.home / "guest"

    @property
    def images(self) -> Path:
        return self.home / "images"

    @property
    def sandboxes(self) -> Path:
        return self.run / "sandboxes"

    @property
    def shared(self) -> Path:
        """Per-sandbox directories the VMs see over virtio-fs (bind mounts only)."""
        return self.run / "shared"

    @property
    def tmp(self) -> Path:
        """Scratch space on the cache filesystem, so finished work is an atomic rename."""
        return self.home / "tmp"


def default_paths() -> Paths:
    """``VMPOD_HOME`` / ``VMPOD_RUN`` override; root uses system dirs, users XDG ones."""
    if os.geteuid() == 0:
        home, run = Path("/var/lib/vmpod"), Path("/run/vmpod")
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        rt = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/vmpod-{os.getuid()}"
        home, run = Path(xdg) / "vmpod", Path(rt) / "vmpod"
    return Paths(home=Path(os.environ.get("VMPOD_HOME", home)), run=Path(os.environ.get("VMPOD_RUN", run)))
