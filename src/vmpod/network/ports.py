"""Published ports: docker's ``-p [IP:]HOSTPORT:CONTAINERPORT[/PROTO]``, validated once here.

A mapping always names its host port: ``-p 80`` (docker picks a random host port)
and ranges (``-p 8000-8010:80-90``) are refused with a message saying what to write
instead, because CNI's portmap plugin takes fixed ports and a port picked here could
be taken again before the plugin runs. The host address defaults to ``0.0.0.0``
(every address of the host, as docker); vmpod's network is IPv4 only, so an IPv6
host address is refused.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, cast

from vmpod.errors import ConfigError

Protocol = Literal["tcp", "udp"]
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp")
ANY_HOST = "0.0.0.0"

_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class PortMapping:
    """Traffic to ``host_ip:host_port`` (``0.0.0.0``: any host address) goes to the
    container's ``container_port``."""

    host_ip: str
    host_port: int
    container_port: int
    protocol: Protocol = "tcp"

    def __post_init__(self) -> None:
        for what, port in (("host port", self.host_port), ("container port", self.container_port)):
            if not 1 <= port <= 65535:
                raise ConfigError(f"{what} {port} is out of range (1-65535)")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {self.protocol!r} (tcp or udp)")
        _check_host_ip(self.host_ip)

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}:{self.container_port}/{self.protocol}"

    def to_cni(self) -> dict[str, Any]:
        """The entry of CNI's ``runtimeConfig.portMappings`` (portmap's capability)."""
        entry: dict[str, Any] = {
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.protocol,
        }
        if self.host_ip != ANY_HOST:
            entry["hostIP"] = self.host_ip
        return entry

    def overlaps(self, other: PortMapping) -> bool:
        """True when both would claim the same host port."""
        same_address = self.host_ip == other.host_ip or ANY_HOST in (self.host_ip, other.host_ip)
        return self.protocol == other.protocol and self.host_port == other.host_port and same_address

    def to_json(self) -> dict[str, Any]:
        return {
            "host_ip": self.host_ip,
            "host_port": self.host_port,
            "container_port": self.container_port,
            "protocol": self.protocol,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PortMapping:
        return cls(
            host_ip=str(data["host_ip"]),
            host_port=int(data["host_port"]),
            container_port=int(data["container_port"]),
            protocol=cast(Protocol, str(data["protocol"])),
        )


def _check_host_ip(text: str) -> None:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError as err:
        raise ConfigError(f"bad host address {text!r}: not an IP address") from err
    if addr.version != 4:
        raise ConfigError(f"host address {text} is IPv6: vmpod's network is IPv4 only")


def _port(text: str, what: str, spec: str) -> int:
    if "-" in text:
        raise ConfigError(f"-p {spec}: port ranges are not supported; publish each port with its own -p")
    if not _PORT.fullmatch(text):
        raise ConfigError(f"-p {spec}: {what} {text!r} is not a port number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ConfigError(f"-p {spec}: {what} {port} is out of range (1-65535)")
    return port


def parse_publish(spec: str) -> PortMapping:
    """Parse docker's ``-p [IP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]``; ConfigError says what is wrong."""
    body, _, proto = spec.partition("/")
    proto = proto or "tcp"
    if proto not in PROTOCOLS:
        raise ConfigError(f"-p {spec}: unknown protocol {proto!r} (tcp or udp)")
    if body.startswith("["):
        raise ConfigError(f"-p {spec}: IPv6 host addresses are not supported: vmpod's network is IPv4 only")
    parts = body.split(":")
    if len(parts) == 1:
        raise ConfigError(
            f"-p {spec}: name the host port too (-p HOSTPORT:{parts[0]}); vmpod does not pick random ports"
        )
    if len(parts) == 2:
        host_ip, host_port, container_port = ANY_HOST, parts[0], parts[1]
    elif len(parts) == 3:
        host_ip, host_port, container_port = parts[0] or ANY_HOST, parts[1], parts[2]
        if not host_port:
            raise ConfigError(f"-p {spec}: name the host port (-p {host_ip}:HOSTPORT:{container_port})")
    else:
        raise ConfigError(f"-p {spec}: expected [IP:]HOSTPORT:CONTAINERPORT[/PROTO]")
    try:
        _check_host_ip(host_ip)
    except ConfigError as err:
        raise ConfigError(f"-p {spec}: {err}") from None
    return PortMapping(
        host_ip=host_ip,
        host_port=_port(host_port, "host port", spec),
        container_port=_port(container_port, "container port", spec),
        protocol=proto,
    )


def check_distinct(ports: Iterable[PortMapping]) -> None:
    """Refuse two mappings that claim the same host port."""
    seen: list[PortMapping] = []
    for mapping in ports:
        for other in seen:
            if mapping.overlaps(other):
                raise ConfigError(f"host port {mapping.host_port}/{mapping.protocol} is published twice")
        seen.append(mapping)


def host_port_in_use(mapping: PortMapping) -> str:
    """Why the host port cannot be published now ("" if it is free): the port is bound
    by another program, or the address is not one of this host's.

    CNI's portmap plugin binds nothing (it only adds DNAT rules), so without this
    check a published port would silently take over traffic that a host program
    listens for. A check, not a reservation: a program may bind the port later.
    """
    kind = socket.SOCK_STREAM if mapping.protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind((mapping.host_ip, mapping.host_port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return f"host port {mapping.host_ip}:{mapping.host_port}/{mapping.protocol} is in use"
            if err.errno == errno.EADDRNOTAVAIL:
                return f"{mapping.host_ip} is not an address of this host"
            return f"cannot bind {mapping.host_ip}:{mapping.host_port}/{mapping.protocol}: {err.strerror}"
    return ""
