"""What a pod network namespace holds, and what wiring it to the VM produced.

Frozen records, built once at the edge (``netns.inspect``) from netlink replies; the
guest side replays ``addresses`` and ``routes`` on its virtio-net NICs.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from pathlib import Path

IPInterface = IPv4Interface | IPv6Interface
IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True)
class Address:
    """An address with its prefix length, e.g. ``10.88.0.5/16`` (``ip.network`` is the subnet)."""

    ip: IPInterface

    @property
    def family(self) -> int:
        return socket.AF_INET if self.ip.version == 4 else socket.AF_INET6

    def __str__(self) -> str:
        return str(self.ip)


@dataclass(frozen=True)
class Route:
    """A route of the namespace's main table, to be added in the guest as is.

    ``destination`` is ``0.0.0.0/0`` / ``::/0`` for a default route; ``gateway`` is
    None for an on-link route (``scope link``). Routes the kernel derives from an
    address (the prefix route of ``10.88.0.5/16``) are not listed: the guest's kernel
    makes them when the address is added.
    """

    destination: IPNetwork
    gateway: IPAddress | None
    device: str
    metric: int | None = None

    @property
    def family(self) -> int:
        return socket.AF_INET if self.destination.version == 4 else socket.AF_INET6

    @property
    def is_default(self) -> bool:
        return self.destination.prefixlen == 0

    def __str__(self) -> str:
        dst = "default" if self.is_default else str(self.destination)
        via = f" via {self.gateway}" if self.gateway is not None else ""
        metric = f" metric {self.metric}" if self.metric is not None else ""
        return f"{dst}{via} dev {self.device}{metric}"


@dataclass(frozen=True)
class Interface:
    """A non-loopback interface of the pod namespace (typically the engine's veth eth0)."""

    name: str
    index: int
    kind: str  # "veth", "macvlan", "bridge", ...; "" when the kernel reports none
    mac: str
    mtu: int
    addresses: tuple[Address, ...]


@dataclass(frozen=True)
class SkippedInterface:
    """An interface that cannot be mirrored to a tap (see ``vmpod.network`` for which)."""

    name: str
    reason: str


@dataclass(frozen=True)
class NetworkPlan:
    """Everything the guest needs to replay the pod namespace's network."""

    netns: Path
    interfaces: tuple[Interface, ...]
    routes: tuple[Route, ...]
    skipped: tuple[SkippedInterface, ...] = ()

    def routes_of(self, device: str) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if r.device == device)


@dataclass(frozen=True)
class TapLink:
    """One veth <-> tap mirroring: enough to tear it down later, even from another
    process (the runtime's ``delete`` runs after ``create`` has exited)."""

    veth: str
    tap: str


@dataclass(frozen=True)
class WiredInterface:
    """A veth mirrored to a tap; give ``fd`` to QEMU (``pass_fds``) with ``netdev()``.

    The guest NIC takes the veth's MAC (as Kata does), so that the peers' ARP caches
    and any MAC-bound rules of the engine stay right. ``fd`` belongs to the
    ``WiredNetwork`` that made it: close it through that, never directly.
    """

    interface: Interface
    tap: str
    fd: int
    routes: tuple[Route, ...]

    @property
    def name(self) -> str:
        return self.interface.name

    @property
    def mac(self) -> str:
        return self.interface.mac

    @property
    def mtu(self) -> int:
        return self.interface.mtu

    @property
    def addresses(self) -> tuple[Address, ...]:
        return self.interface.addresses

    @property
    def link(self) -> TapLink:
        return TapLink(self.interface.name, self.tap)

    def netdev(self, netdev_id: str) -> str:
        """The ``-netdev`` value for QEMU. No ``vnet_hdr=`` option: QEMU rejects it
        together with ``fd=`` and instead probes the fd, which was opened with
        IFF_VNET_HDR, so checksum/GSO offloads are on."""
        return f"tap,id={netdev_id},fd={self.fd}"
