"""Everything environment-specific about the agent, with the real guest's defaults.

A plain class, not a dataclass: importing dataclasses costs start-up time under TCG.
"""

from __future__ import annotations

from vmpod.agent.guest.errors import AgentFailure
from vmpod.agent.protocol import CRIU_MODULES_DIR, MODULES_DIR, SHARED_DIR


class AgentConfig:
    """Where the agent finds its tools and keeps its state, and what it may do.

    Tests run the agent in-process: they point the paths at temporary
    directories and fakes, allow plain-directory root filesystems
    (``CreateContainer.rootfs_fstype == "dir"``, ``rootfs_serial`` then names the
    directory) and keep the host's clock alone.
    """

    __slots__ = (
        "bundles",
        "runtimes",
        "runc_root",
        "busybox",
        "criu",
        "criu_modules",
        "modules_dir",
        "cgroup_root",
        "allow_dir_rootfs",
        "set_clock",
        "shared_dir",
        "shared_premounted",
        "net_sys",
        "net_sysctl",
    )

    def __init__(
        self,
        *,
        bundles: str = "/run/vmpod/containers",
        runtimes: dict[str, str] | None = None,
        runc_root: str = "/run/runc",
        busybox: str = "/bin/busybox",
        criu: str = "/usr/sbin/criu",
        criu_modules: str = CRIU_MODULES_DIR,
        modules_dir: str = MODULES_DIR,
        cgroup_root: str = "/sys/fs/cgroup",
        allow_dir_rootfs: bool = False,
        set_clock: bool = True,
        shared_dir: str = SHARED_DIR,
        shared_premounted: bool = False,
        net_sys: str = "/sys/class/net",
        net_sysctl: str = "/proc/sys/net",
    ) -> None:
        self.bundles = bundles  # one directory per container
        # OCI runtimes in the guest image; both take runc's command line. crun (C)
        # starts ~0.5 s faster than runc (Go) under TCG.
        self.runtimes = dict(runtimes or {"runc": "/usr/bin/runc", "crun": "/usr/bin/crun"})
        self.runc_root = runc_root  # the runtimes' --root state directory
        self.busybox = busybox  # mount, insmod, rmmod, poweroff, ip, hostname
        self.criu = criu  # checkpoint/restore (runc finds it on PATH)
        self.criu_modules = criu_modules  # its kernel modules, loaded on first use
        self.modules_dir = modules_dir  # load_module only takes paths under it
        self.cgroup_root = cgroup_root  # cgroup v2 mount, for stats
        self.allow_dir_rootfs = allow_dir_rootfs
        self.set_clock = set_clock
        self.shared_dir = shared_dir  # the host's shared directory (virtio-fs) is mounted here
        self.shared_premounted = shared_premounted  # in-process tests: already there
        self.net_sys = net_sys  # network interfaces (NICs found by their MAC here)
        self.net_sysctl = net_sysctl  # per-interface settings (IPv6 duplicate address detection)

    def runtime_binary(self, name: str) -> str:
        """The path of OCI runtime ``name``; AgentFailure("invalid") if unknown."""
        if name not in self.runtimes:
            raise AgentFailure(f"unknown OCI runtime {name!r} (have {', '.join(self.runtimes)})", "invalid")
        return self.runtimes[name]
