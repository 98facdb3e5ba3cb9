"""Taps in the pod namespace, mirrored to the engine's veths with tc, and teardown.

For each interface ``inspect`` found, ``wire`` opens ``tap{n}_vmpod`` *inside* the
pod namespace and adds, on both the veth and the tap, an ingress qdisc with one
u32 match-all filter whose action is ``mirred egress redirect`` to the other: what
arrives on the veth leaves through the tap (to QEMU's virtio-net), what the guest
sends leaves through the veth. The veth keeps its addresses but no longer sees
traffic; it belongs to the engine and is never changed or deleted here.

The tap is not persistent: it exists while a file descriptor holds it, so once
QEMU (which inherits the fd) and this process have closed theirs, the kernel
removes it, with its qdisc.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from vmpod.errors import NetworkError
from vmpod.network.model import Interface, NetworkPlan, TapLink, WiredInterface
from vmpod.network.netns import inspect_fd, netlink_socket, open_netns, run_in_netns
from vmpod.network.rtnl import Rtnl, RtnlError

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000  # no 4-byte packet-info prefix: QEMU expects bare frames
IFF_VNET_HDR = 0x4000  # a virtio_net_hdr per frame: checksum and GSO offloads
TAP_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
IFNAMSIZ = 16


def tap_name(n: int) -> str:
    name = f"tap{n}_vmpod"
    if len(name) >= IFNAMSIZ:
        raise NetworkError(f"tap name {name} is longer than {IFNAMSIZ - 1} characters")
    return name


def open_tap(name: str, flags: int = TAP_FLAGS) -> int:
    """Create (or attach to) tap ``name`` in the calling thread's namespace; the
    fd is close-on-exec (QEMU gets it through ``pass_fds``)."""
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _disable_ipv6(name: str) -> None:
    """No IPv6 on the tap itself: its own link-local address would send router
    solicitations and MLD reports to the guest. /proc/sys/net follows the calling
    thread's namespace, so this must run in the thread that made the tap."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except FileNotFoundError:
        pass  # IPv6 disabled on this host


def _make_tap(name: str) -> int:
    fd = open_tap(name)
    try:
        _disable_ipv6(name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unwire(rtnl: Rtnl, link: TapLink) -> list[str]:
    """Remove the ingress qdiscs of ``link``'s veth and tap (whichever still exist);
    returns the problems instead of stopping at the first."""
    problems = []
    for name in (link.veth, link.tap):
        try:
            dev = rtnl.link(name)
            if dev is not None and rtnl.del_ingress(dev.index):
                log.debug("network: removed ingress qdisc of %s", name)
        except (RtnlError, OSError) as err:
            problems.append(f"{name}: {err}")
    return problems


def _wire_one(netns_fd: int, netns: Path, rtnl: Rtnl, iface: Interface, n: int) -> tuple[str, int]:
    tap = tap_name(n)
    try:
        fd = run_in_netns(netns_fd, lambda: _make_tap(tap))
    except OSError as err:
        hint = (
            "a sandbox using this namespace is still running"
            if err.errno in (errno.EBUSY, errno.EEXIST, errno.EINVAL)
            else "is /dev/net/tun usable? (vmpod doctor)"
        )
        raise NetworkError(f"cannot create {tap} in {netns}: {err.strerror}", hint=hint) from err
    try:
        dev = rtnl.link(tap)
        if dev is None:
            raise NetworkError(f"{tap} vanished from {netns} right after it was created")
        rtnl.set_link(dev.index, mtu=iface.mtu, up=True)
        rtnl.add_ingress_redirect(iface.index, dev.index)
        rtnl.add_ingress_redirect(dev.index, iface.index)
    except BaseException as err:
        _unwire(rtnl, TapLink(iface.name, tap))
        os.close(fd)
        if isinstance(err, RtnlError):
            hint = (
                f"{iface.name} already has an ingress qdisc"
                if err.errno == errno.EEXIST
                else "are sch_ingress, cls_u32 and act_mirred available? (vmpod doctor)"
            )
            raise NetworkError(f"cannot mirror {iface.name} <-> {tap} in {netns}: {err}", hint=hint) from err
        raise
    return tap, fd


class WiredNetwork:
    """The taps of one pod namespace: owns their fds until ``close_fds``/``teardown``.

    Hand ``pass_fds`` to the VMM's process, call ``close_fds()`` once it runs (the
    taps then live as long as the VMM), and ``teardown()`` when the pod goes; a
    process that only has the namespace path and ``links`` uses ``teardown(...)``.
    """

    def __init__(self, plan: NetworkPlan, interfaces: tuple[WiredInterface, ...]) -> None:
        self.plan = plan
        self.interfaces = interfaces
        self._open = {w.fd for w in interfaces}

    @property
    def netns(self) -> Path:
        return self.plan.netns

    @property
    def links(self) -> tuple[TapLink, ...]:
        return tuple(w.link for w in self.interfaces)

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return tuple(w.fd for w in self.interfaces if w.fd in self._open)

    def close_fds(self) -> None:
        """Close this process's tap fds (idempotent: each is closed once)."""
        while self._open:
            os.close(self._open.pop())

    def teardown(self) -> None:
        """Remove the mirroring, then close the fds; idempotent."""
        try:
            teardown(self.netns, self.links)
        finally:
            self.close_fds()

    def __enter__(self) -> WiredNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()


def wire(netns: str | os.PathLike[str]) -> WiredNetwork:
    """Inspect the namespace at ``netns`` and mirror each of its interfaces to a new
    tap there. All or nothing: on failure, what was done is undone."""
    path = Path(netns)
    netns_fd = open_netns(path)
    try:
        plan = inspect_fd(netns_fd, path)
        done: list[WiredInterface] = []
        try:
            with netlink_socket(netns_fd) as rtnl:
                for n, iface in enumerate(plan.interfaces):
                    tap, fd = _wire_one(netns_fd, path, rtnl, iface, n)
                    done.append(WiredInterface(iface, tap, fd, plan.routes_of(iface.name)))
                    log.info("network: %s: %s <-> %s (mtu %d)", path, iface.name, tap, iface.mtu)
        except BaseException:
            WiredNetwork(plan, tuple(done)).teardown()
            raise
    finally:
        os.close(netns_fd)
    return WiredNetwork(plan, tuple(done))


def teardown(netns: str | os.PathLike[str], links: Iterable[TapLink]) -> None:
    """Remove the ingress qdiscs (and so the filters) that ``wire`` added to each
    veth and tap. Idempotent; a namespace that is gone has nothing left to undo."""
    links = tuple(links)
    if not links:
        return
    try:
        netns_fd = open_netns(netns)
    except NetworkError as err:
        log.debug("network: teardown: %s", err)  # the engine deleted it: so are its devices
        return
    problems = []
    try:
        with netlink_socket(netns_fd) as rtnl:
            for link in links:
                problems += _unwire(rtnl, link)
    except (RtnlError, OSError) as err:
        problems.append(str(err))
    finally:
        os.close(netns_fd)
    if problems:
        raise NetworkError(f"network teardown in {netns} incomplete: {'; '.join(problems)}")
