"""What pod networking needs from the host, as checks for ``vmpod doctor``.

The tc probe builds the real thing (veth pair, tap, ingress qdiscs, u32 filters
with mirred) in an anonymous namespace of a probe thread, which the kernel
removes with everything in it when the probe ends: nothing on the host changes.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from vmpod.network.netns import run_in_netns
from vmpod.network.rtnl import Rtnl, RtnlError
from vmpod.network.tap import TUN_DEVICE, open_tap

CNI_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
CNI_PLUGINS = ("bridge", "host-local", "portmap", "loopback", "firewall", "tuning")
_FIREWALL_TOOLS = ("iptables", "nft")
_SBIN = ("/usr/sbin", "/sbin")  # not on a non-root PATH


@dataclass(frozen=True)
class NetCheck:
    """One line of ``vmpod doctor`` (same fields as ``vmpod.cli.doctor.Check``).
    Not ``required``: containers without a pod network namespace run without them."""

    name: str
    ok: bool
    detail: str
    required: bool = False


def _tun_check() -> NetCheck:
    try:
        os.close(os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as err:
        return NetCheck("tun", False, f"{TUN_DEVICE}: {err.strerror} (modprobe tun; needs root)")
    return NetCheck("tun", True, f"{TUN_DEVICE} usable")


def _probe_mirroring() -> None:
    """veth <-> tap mirroring in a throw-away namespace; raises on the first failure."""

    def body() -> None:
        rtnl = Rtnl(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0).detach())
        with rtnl:
            fd = open_tap("vmpod-probe")
            try:
                tap = rtnl.link("vmpod-probe")
                assert tap is not None
                rtnl.set_link(tap.index, mtu=1500, up=True)
                veth = rtnl.add_veth("vmpod-probe0", "vmpod-probe1")
                rtnl.add_ingress_redirect(veth, tap.index)
                rtnl.add_ingress_redirect(tap.index, veth)
            finally:
                os.close(fd)

    # The thread's new namespace has no name and no other user: the kernel frees it,
    # the devices and the qdiscs once the thread and the socket are gone.
    run_in_netns(None, body)


def _tc_check() -> NetCheck:
    try:
        _probe_mirroring()
    except (RtnlError, OSError) as err:
        return NetCheck(
            "tc mirroring",
            False,
            f"veth <-> tap with tc cannot be set up: {err} "
            "(needs sch_ingress, cls_u32, act_mirred, veth and tun in the kernel)",
        )
    return NetCheck("tc mirroring", True, "ingress qdisc + u32 filter + mirred redirect work (probed)")


def _cni_check() -> NetCheck:
    best: tuple[Path, list[str]] | None = None
    for d in CNI_DIRS:
        if d.is_dir():
            missing = [p for p in CNI_PLUGINS if not os.access(d / p, os.X_OK)]
            if best is None or len(missing) < len(best[1]):
                best = (d, missing)
    if best is None:
        return NetCheck(
            "CNI plugins",
            False,
            f"none in {' or '.join(map(str, CNI_DIRS))} (apt-get install containernetworking-plugins)",
        )
    where, missing = best
    if missing:
        return NetCheck("CNI plugins", False, f"{where} lacks {', '.join(missing)}")
    return NetCheck("CNI plugins", True, f"{where}: {', '.join(CNI_PLUGINS)}")


def _firewall_check() -> NetCheck:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    found = [t for t in (shutil.which(t, path=path) for t in _FIREWALL_TOOLS) if t]
    if not found:
        return NetCheck(
            "firewall tool", False, "neither iptables nor nft found (CNI portmap/firewall need one)"
        )
    return NetCheck("firewall tool", True, ", ".join(found))


def host_checks() -> list[NetCheck]:
    """Pod networking's host requirements; the tc probe needs root (CAP_NET_ADMIN)."""
    return [_tun_check(), _tc_check(), _cni_check(), _firewall_check()]
