"""Boot-time details of a sandbox: the kernel command line, the agent channel, and
the per-sandbox state directory (locked while its owner lives)."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from vmpod.agent.protocol import PORT_NAME
from vmpod.errors import SandboxError
from vmpod.fsutil import is_locked, lock_file
from vmpod.hypervisor.base import HostChannel
from vmpod.paths import Paths
from vmpod.sandbox.config import SandboxConfig
from vmpod.sandbox.share import collect_stale_shares


def choose_channel(requested: str = "auto") -> str:
    """vsock where the host has a usable vhost-vsock, virtio-serial otherwise."""
    if requested != "auto":
        return requested
    dev = "/dev/vhost-vsock"
    return "vsock" if os.path.exists(dev) and os.access(dev, os.R_OK | os.W_OK) else "serial"


def agent_channel(requested: str) -> HostChannel:
    """The host channel the guest agent listens on (a fresh vsock CID per VM)."""
    kind = choose_channel(requested)
    cid = secrets.randbelow(2**31) + 3 if kind == "vsock" else 0
    return HostChannel(kind, PORT_NAME, cid)


def host_tsc_khz() -> int | None:
    """Host TSC rate: passing it avoids a random early-boot hang (field notes)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def kernel_cmdline(cfg: SandboxConfig, channel: str = "serial") -> str:
    args = [
        f"vmpod.channel={channel}",
        "console=ttyS0",
        "panic=-1",
        "reboot=t",
        "8250.nr_uarts=1",
        "cryptomgr.notests",
        "no_timer_check",
        "random.trust_cpu=on",
    ]
    if not cfg.verbose_console:
        args.append("quiet")
    khz = host_tsc_khz()
    if khz:
        args.append(f"tsc_early_khz={khz}")
    if not cfg.assets.kernel.pvh:
        # a bzImage's decompressor reports a corrupt image only on an early console
        args.append("earlyprintk=serial,ttyS0,115200")
    return " ".join([*args, *cfg.kernel_args])


def collect_stale(paths: Paths) -> list[str]:
    """Remove state dirs of sandboxes whose owner died (e.g. vmpod killed with -9).

    A live owner holds the flock on ``lock``; its QEMU died with it (PDEATHSIG).
    """

    def alive(name: str) -> bool:
        try:
            return is_locked(paths.sandboxes / name / "lock")
        except OSError:
            return False  # no lock file: half-created, the owner is gone too

    # shared directories first: unmounted, never deleted through a mount; one is
    # made only after its sandbox holds the lock, so a live one reads alive
    collect_stale_shares(paths.shared, alive)
    removed: list[str] = []
    for d in paths.sandboxes.iterdir() if paths.sandboxes.is_dir() else ():
        if not alive(d.name):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


# Tests (and debugging) set this to a directory that receives the console and
# hypervisor logs of every sandbox as it goes away.
KEEP_LOGS_ENV = "VMPOD_KEEP_LOGS"
KEPT_LOGS = ("console.log", "qemu.log")


class StateDir:
    """``<run>/sandboxes/<id>``: sockets, logs and the owner's lock of one sandbox."""

    def __init__(self, paths: Paths, sandbox_id: str) -> None:
        self.paths = paths
        self.path = paths.sandboxes / sandbox_id
        self._lock = -1

    def make(self) -> None:
        collect_stale(self.paths)
        try:
            self.path.mkdir(parents=True, exist_ok=False)
        except FileExistsError as err:
            raise SandboxError(f"sandbox {self.path.name} already exists") from err
        self._lock = lock_file(self.path / "lock")
        (self.path / "pid").write_text(str(os.getpid()))

    def remove(self) -> None:
        """Delete the directory; its logs are kept first where VMPOD_KEEP_LOGS says."""
        keep = os.environ.get(KEEP_LOGS_ENV)
        if keep:
            self._keep_logs(Path(keep) / self.path.name)
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1
        shutil.rmtree(self.path, ignore_errors=True)

    def _keep_logs(self, dest: Path) -> None:
        for name in KEPT_LOGS:
            src = self.path / name
            if src.is_file():
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest / name)


def console_line(tail: str) -> str:
    """The most telling console line: our init's complaint, a panic, else the last."""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    for marker in ("Kernel panic", "vmpod-init:", "vmpod-agent:"):
        found = [ln for ln in lines if marker in ln]
        if found:
            return found[-1]
    return lines[-1] if lines else "no console output"
