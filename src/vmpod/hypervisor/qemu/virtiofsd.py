"""virtiofsd: the host-side file server of a VM's virtio-fs device (one per VM).

It serves one directory to QEMU over a vhost-user socket and exits when QEMU
disconnects. It runs in its own mount, pid and network namespaces, pivoted into
the shared directory (``sandbox=namespace``), so the guest reaches nothing
outside that tree. Extended attributes stay off: with them a guest root could set
``security.capability`` on a host file. QEMU 7.2's virtiofsd has no read-only
mode; read-only shares are read-only bind mounts on the host side.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

from vmpod.errors import HypervisorError
from vmpod.proc import spawn_vm_helper

DEFAULT_BINARY = "/usr/lib/qemu/virtiofsd"  # Debian 12: shipped with qemu-system-common
BINARY_ENV = "VMPOD_VIRTIOFSD"


def find_virtiofsd() -> str | None:
    """``$VMPOD_VIRTIOFSD``, QEMU's own virtiofsd, else one on PATH."""
    for cand in (os.environ.get(BINARY_ENV, ""), DEFAULT_BINARY, shutil.which("virtiofsd") or ""):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


class Virtiofsd:
    """One virtiofsd process serving ``source`` on ``socket``."""

    def __init__(self, source: Path, socket: Path, log: Path, binary: str | None = None) -> None:
        self.source, self.socket, self.log = source, socket, log
        self.binary = binary or find_virtiofsd()
        self._proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        assert self.binary is not None
        return [
            self.binary,
            f"--socket-path={self.socket}",
            "-o",
            f"source={self.source}",
            # auto: metadata cached for a second, data kept while the file is
            # open — the field notes' best mix of big and small file I/O
            "-o",
            "cache=auto",
            # each host mount below the source (volumes, the rootfs) is its own
            # file system in the guest: st_dev and inode numbers stay unique
            "-o",
            "announce_submounts",
            "-o",
            "no_xattr",
            "-o",
            "log_level=err",
        ]

    def start(self) -> None:
        if self.binary is None:
            raise HypervisorError(
                "virtiofsd not found (needed for volumes and shared root filesystems)",
                hint=f"install qemu-system-common, or set {BINARY_ENV}",
            )
        self.socket.unlink(missing_ok=True)
        with self.log.open("ab") as errlog:
            try:
                self._proc = spawn_vm_helper(self.argv(), errlog)
            except OSError as err:
                raise HypervisorError(f"cannot start virtiofsd: {err}", argv=self.argv()) from err

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Until the vhost-user socket exists (QEMU connects to it at start)."""
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.exit_status() is not None:
                raise HypervisorError(f"virtiofsd exited during start-up: {self.error()}", argv=self.argv())
            if time.monotonic() > deadline:
                self.kill()
                raise HypervisorError("virtiofsd did not open its socket", argv=self.argv())
            await asyncio.sleep(0.005)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def exit_status(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def error(self) -> str:
        try:
            with self.log.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 2048))
                lines = fh.read().decode("utf-8", "replace").strip().splitlines()
        except OSError:
            return "no error output"
        return lines[-1] if lines else "no error output"

    def kill(self) -> None:
        """Idempotent; reaps the process and removes the socket it leaves behind."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass
            self._proc.wait()
        self.socket.unlink(missing_ok=True)
