"""A narrow, typed layer over pyroute2's rtnetlink API: the only module that imports it.

pyroute2 ships no type information, and its messages are dict-like objects whose
attributes come and go by kernel version. Everything here turns them into small
frozen records right away, so the rest of ``vmpod.network`` stays typed and never
sees a netlink message. Sockets are handed in as file descriptors (see
``netns.netlink_socket``): we never let pyroute2 enter a namespace itself, because
its ``netns=`` argument forks a helper process and, by default, *creates* a
namespace that does not exist.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute, NetlinkError  # type: ignore[import-untyped]
from pyroute2 import netns as _pyroute2_netns
from pyroute2 import protocols as _protocols

INGRESS = 0xFFFF0000  # the ingress qdisc's handle ("ffff:") and its filters' parent
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2
RTN_UNICAST = 1
IFF_UP = 0x1
MIRRED_EGRESS_REDIRECT = 1  # TCA_EGRESS_REDIR


class RtnlError(OSError):
    """A netlink request the kernel refused (``errno`` set, message from the kernel)."""


@dataclass(frozen=True)
class LinkInfo:
    index: int
    name: str
    kind: str  # IFLA_INFO_KIND ("veth", "bridge", "tun", ...); "" for devices without one
    link_type: int  # ARPHRD_*
    mac: str
    mtu: int
    up: bool


@dataclass(frozen=True)
class AddrInfo:
    index: int
    family: int
    address: str
    prefixlen: int


@dataclass(frozen=True)
class RouteInfo:
    family: int
    dst: str | None  # None: the default route
    dst_len: int
    gateway: str | None
    oif: int | None
    priority: int | None
    table: int
    proto: int
    type: int
    multipath: bool


@dataclass(frozen=True)
class TcInfo:
    """A qdisc or filter as the kernel lists it."""

    index: int
    kind: str
    handle: int
    parent: int
    redirect_to: tuple[int, ...] = ()  # ifindexes of mirred actions (filters only)


def _kernel_error(err: NetlinkError, what: str) -> RtnlError:
    return RtnlError(err.code, f"{what}: {err.args[1] if len(err.args) > 1 else err}")


def _mirred_targets(msg: Any) -> tuple[int, ...]:
    """ifindexes that the ``mirred egress redirect`` actions of a u32 filter message
    send to (the u32 hash-table entries the kernel lists alongside have none)."""
    out: list[int] = []
    options = msg.get_attr("TCA_OPTIONS")
    acts = options.get_attr("TCA_U32_ACT") if options is not None else None
    for name, act in acts["attrs"] if acts is not None else []:
        if not name.startswith("TCA_ACT_PRIO_") or act.get_attr("TCA_ACT_KIND") != "mirred":
            continue
        parms = act.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_MIRRED_PARMS")
        if parms["eaction"] == MIRRED_EGRESS_REDIRECT:
            out.append(int(parms["ifindex"]))
    return tuple(out)


class Rtnl:
    """An rtnetlink connection bound to the namespace its socket was created in.

    Use it from the thread that made it: pyroute2 keeps an event loop per thread.
    """

    def __init__(self, fileno: int) -> None:
        # IPRoute takes ownership of the descriptor and closes it in close(). If it
        # fails it may own it already: better a leaked fd than closing it twice.
        self._ipr = IPRoute(fileno=fileno)

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._ipr, method)(*args, **kwargs)
        except NetlinkError as err:
            raise _kernel_error(err, what) from err

    # -- reading ---------------------------------------------------------------------

    def links(self) -> list[LinkInfo]:
        out = []
        for msg in self._call("list links", "get_links"):
            info = msg.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            out.append(
                LinkInfo(
                    index=int(msg["index"]),
                    name=str(msg.get_attr("IFLA_IFNAME")),
                    kind=str(kind or ""),
                    link_type=int(msg["ifi_type"]),
                    mac=str(msg.get_attr("IFLA_ADDRESS") or ""),
                    mtu=int(msg.get_attr("IFLA_MTU") or 0),
                    up=bool(msg["flags"] & IFF_UP),
                )
            )
        return out

    def link(self, name: str) -> LinkInfo | None:
        return next((link for link in self.links() if link.name == name), None)

    def addresses(self) -> list[AddrInfo]:
        out = []
        for msg in self._call("list addresses", "get_addr"):
            # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on
            # point-to-point links and the same as IFA_LOCAL elsewhere (IPv6 has no LOCAL).
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if addr:
                out.append(AddrInfo(int(msg["index"]), int(msg["family"]), str(addr), int(msg["prefixlen"])))
        return out

    def routes(self) -> list[RouteInfo]:
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self._call("list routes", "get_routes", family=family):
                table = msg.get_attr("RTA_TABLE")
                out.append(
                    RouteInfo(
                        family=family,
                        dst=msg.get_attr("RTA_DST"),
                        dst_len=int(msg["dst_len"]),
                        gateway=msg.get_attr("RTA_GATEWAY"),
                        oif=msg.get_attr("RTA_OIF"),
                        priority=msg.get_attr("RTA_PRIORITY"),
                        table=int(table if table is not None else msg["table"]),
                        proto=int(msg["proto"]),
                        type=int(msg["type"]),
                        multipath=msg.get_attr("RTA_MULTIPATH") is not None,
                    )
                )
        return out

    def qdiscs(self, index: int) -> list[TcInfo]:
        return [
            TcInfo(int(m["index"]), str(m.get_attr("TCA_KIND")), int(m["handle"]), int(m["parent"]))
            for m in self._call("list qdiscs", "get_qdiscs", index)
            if int(m["index"]) == index
        ]

    def ingress_filters(self, index: int) -> list[TcInfo]:
        return [
            TcInfo(
                int(m["index"]),
                str(m.get_attr("TCA_KIND")),
                int(m["handle"]),
                int(m["parent"]),
                _mirred_targets(m),
            )
            for m in self._call("list filters", "get_filters", index, parent=INGRESS)
        ]

    # -- changing --------------------------------------------------------------------

    def set_link(self, index: int, *, mtu: int, up: bool) -> None:
        self._call("set link", "link", "set", index=index, mtu=mtu, state="up" if up else "down")

    def add_ingress_redirect(self, index: int, to_index: int) -> None:
        """An ingress qdisc on ``index`` whose one u32 match-all filter redirects every
        frame to the egress of ``to_index`` (``tc filter ... u32 match u8 0 0 action
        mirred egress redirect``): the same rule Kata's tc-filter network model uses."""
        self._call("add ingress qdisc", "tc", "add", "ingress", index, INGRESS)
        self._call(
            "add mirred filter",
            "tc",
            "add-filter",
            "u32",
            index,
            parent=INGRESS,
            prio=1,
            protocol=_protocols.ETH_P_ALL,
            target=0,  # no class: the action decides (ingress has no classes)
            keys=["0x0/0x0+0"],  # one key that matches every frame
            action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": to_index},
        )

    def del_ingress(self, index: int) -> bool:
        """Remove the ingress qdisc (and its filters) of ``index``; False if it had none."""
        try:
            self._ipr.tc("del", "ingress", index, INGRESS)
        except NetlinkError as err:
            if err.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                return False
            raise _kernel_error(err, "delete ingress qdisc") from err
        return True

    # -- building test and probe topologies -----------------------------------------

    def add_veth(self, name: str, peer: str, peer_netns: str | None = None) -> int:
        """A veth pair; the peer moves to ``peer_netns`` (a path) when given. Returns
        the index of ``name``."""
        peer_spec: dict[str, Any] = {"ifname": peer}
        if peer_netns is not None:
            with open(peer_netns, "rb") as ns:
                peer_spec["net_ns_fd"] = ns.fileno()
                self._call("add veth", "link", "add", ifname=name, kind="veth", peer=peer_spec)
        else:
            self._call("add veth", "link", "add", ifname=name, kind="veth", peer=peer_spec)
        link = self.link(name)
        assert link is not None
        return link.index

    def add_address(self, index: int, address: str, prefixlen: int) -> None:
        self._call("add address", "addr", "add", index=index, address=address, prefixlen=prefixlen)

    def add_route(self, dst: str | None, gateway: str | None, index: int | None = None) -> None:
        spec: dict[str, Any] = {}
        if dst is not None:
            spec["dst"] = dst
        if gateway is not None:
            spec["gateway"] = gateway
        if index is not None:
            spec["oif"] = index
        self._call("add route", "route", "add", **spec)


def create_named_netns(name: str) -> str:
    """``ip netns add NAME``; returns its path under /run/netns."""
    _pyroute2_netns.create(name)
    return f"{_pyroute2_netns.NETNS_RUN_DIR}/{name}"


def remove_named_netns(name: str) -> None:
    """``ip netns del NAME`` (no error if it is gone)."""
    try:
        _pyroute2_netns.remove(name)
    except FileNotFoundError:
        pass


def named_netns() -> list[str]:
    return [str(n) for n in _pyroute2_netns.listnetns()]
