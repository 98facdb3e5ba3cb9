"""Entering a network namespace from a short-lived thread, and inspecting one.

Which interfaces ``inspect`` offers for wiring: every non-loopback one with an
Ethernet link layer (veth, macvlan, ipvlan in L2 mode, bridge, physical, ...), with
or without an address. Loopback is skipped silently (the guest has its own). One
that cannot be mirrored to a tap (a tun/tap already, or a non-Ethernet device such
as the tunl0/sit0 fallback tunnels the kernel adds to every namespace once their
module is loaded) is skipped with a warning naming it and listed in
``NetworkPlan.skipped``, rather than failing the pod: such devices carry none of
the pod's traffic, and failing on them would break every pod on hosts that load
ipip. Only the main table's unicast routes are kept, minus those the kernel makes
from an address (the guest's kernel makes them too); IPv6 link-local addresses are
dropped (the guest derives its own from the same MAC).

setns(2) with CLONE_NEWNET changes the namespace of the calling *thread* only, so
``run_in_netns`` runs one function in a fresh thread that joins the target
namespace, runs it and joins its old namespace again before it ends. Whatever that
function creates there (a netlink socket, a tap's file descriptor) stays bound to
the target namespace for its whole life, while the rest of the process never
leaves its own. No fork: the runtime has threads, and pyroute2's ``netns=``
forks a helper process for the same job.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path
from typing import TypeVar

from vmpod.errors import NetworkError
from vmpod.network.model import Address, Interface, NetworkPlan, Route, SkippedInterface
from vmpod.network.rtnl import (
    ARPHRD_ETHER,
    ARPHRD_LOOPBACK,
    RT_TABLE_MAIN,
    RTN_UNICAST,
    RTPROT_KERNEL,
    LinkInfo,
    Rtnl,
    RtnlError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), Linux >= 4.11
_NETLINK_ROUTE = 0
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def open_netns(path: str | os.PathLike[str]) -> int:
    """An O_RDONLY descriptor of the network namespace at ``path`` (``/run/netns/X``,
    ``/proc/PID/ns/net``); NetworkError in one line if it is not one."""
    where = os.fspath(path)
    try:
        st = os.stat(where)
    except FileNotFoundError as err:
        raise NetworkError(f"network namespace {where} does not exist") from err
    except OSError as err:
        raise NetworkError(f"network namespace {where}: {err.strerror}") from err
    # nsfs files are regular files; refusing the rest first means we never open a
    # FIFO or a device just to find out what it is.
    if not stat.S_ISREG(st.st_mode):
        raise NetworkError(f"{where} is not a network namespace (not a namespace file)")
    try:
        fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:  # gone since the stat, or not ours to open
        raise NetworkError(f"network namespace {where}: {err.strerror}") from err
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as err:
        os.close(fd)
        if err.errno == errno.ENOTTY:  # an ordinary file (or an empty bind-mount point)
            raise NetworkError(f"{where} is not a network namespace (not a namespace file)") from err
        raise NetworkError(f"{where}: cannot query the namespace type: {err.strerror}") from err
    if nstype != CLONE_NEWNET:
        os.close(fd)
        raise NetworkError(f"{where} is a namespace but not a network namespace (type {nstype:#x})")
    return fd


def run_in_netns(netns_fd: int | None, fn: Callable[[], T]) -> T:
    """``fn()`` in a thread inside ``netns_fd``'s namespace; None: inside a new,
    anonymous namespace that vanishes once nothing made there holds it (probes).
    Exceptions of ``fn`` are re-raised here."""
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if netns_fd is None:
                if _libc.unshare(CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
            else:
                _setns(netns_fd)
            try:
                result.append(fn())
            finally:
                # The thread ends right after, so a failure here harms nobody; going
                # home anyway keeps thread-exit cleanup in the process's namespace.
                try:
                    _setns(home)
                except OSError as err:
                    log.debug("network: netns thread could not go back: %s", err)
        except BaseException as err:
            failure.append(err)
        finally:
            os.close(home)

    thread = threading.Thread(target=body, name="vmpod-netns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def netlink_socket(netns_fd: int | None) -> Rtnl:
    """An rtnetlink connection to ``netns_fd``'s namespace (None: a new one, kept
    alive by this connection alone)."""

    def make() -> int:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE).detach()

    return Rtnl(run_in_netns(netns_fd, make))


def _skip_reason(link: LinkInfo) -> str | None:
    """Why ``link`` cannot be mirrored to a tap, or None if it can."""
    if link.kind == "tun":
        return "a tun/tap device already (something else owns its file descriptor)"
    if link.link_type != ARPHRD_ETHER:
        # ipip/sit/gre fallback devices (tunl0, sit0, ...) appear in every new
        # namespace once their module is loaded; a tap carries Ethernet frames only.
        return f"not an Ethernet device (link type {link.link_type})"
    return None


def _addresses(rtnl: Rtnl) -> dict[int, list[Address]]:
    out: dict[int, list[Address]] = {}
    for a in rtnl.addresses():
        ip = ip_interface(f"{a.address}/{a.prefixlen}")
        if ip.version == 6 and ip.ip.is_link_local:
            continue  # the guest derives its own fe80:: address from the (same) MAC
        out.setdefault(a.index, []).append(Address(ip))
    return out


def _routes(rtnl: Rtnl, names: dict[int, str]) -> list[Route]:
    out = []
    for r in rtnl.routes():
        # Only the main table's unicast routes: the local table and proto-kernel
        # routes are what the guest's kernel makes itself from the addresses.
        if r.table != RT_TABLE_MAIN or r.type != RTN_UNICAST or r.proto == RTPROT_KERNEL:
            continue
        if r.multipath:
            log.warning("network: skipping multipath route to %s/%s (not supported)", r.dst, r.dst_len)
            continue
        if r.oif is None or r.oif not in names:
            continue  # via a skipped device (or none): the guest cannot use it
        any_dst = "0.0.0.0" if r.family == socket.AF_INET else "::"
        dst = ip_network(f"{r.dst or any_dst}/{r.dst_len}", strict=False)
        gw = ip_address(r.gateway) if r.gateway else None
        out.append(Route(dst, gw, names[r.oif], r.priority))
    return out


def inspect_fd(netns_fd: int, netns: Path) -> NetworkPlan:
    """``inspect`` on an already validated namespace descriptor."""
    try:
        with netlink_socket(netns_fd) as rtnl:
            links = rtnl.links()
            addrs = _addresses(rtnl)
            interfaces, skipped = [], []
            for link in links:
                if link.link_type == ARPHRD_LOOPBACK:
                    continue  # the guest has its own lo
                reason = _skip_reason(link)
                if reason is not None:
                    log.warning("network: %s: not wiring %s: %s", netns, link.name, reason)
                    skipped.append(SkippedInterface(link.name, reason))
                    continue
                interfaces.append(
                    Interface(
                        link.name, link.index, link.kind, link.mac, link.mtu, tuple(addrs.get(link.index, ()))
                    )
                )
            routes = _routes(rtnl, {i.index: i.name for i in interfaces})
    except (RtnlError, OSError) as err:
        raise NetworkError(f"cannot inspect network namespace {netns}: {err}") from err
    return NetworkPlan(netns, tuple(interfaces), tuple(routes), tuple(skipped))


def inspect(netns: str | os.PathLike[str]) -> NetworkPlan:
    """The non-loopback interfaces, addresses and routes of the namespace at ``netns``."""
    fd = open_netns(netns)
    try:
        return inspect_fd(fd, Path(netns))
    finally:
        os.close(fd)
