"""What a CNI plugin chain answers (the spec's Result), parsed and checked: the
addresses, routes, interfaces and DNS of an attachment."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from vmpod.errors import NetworkError


@dataclass(frozen=True)
class IPConfig:
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    gateway: str | None
    interface: int | None  # index into CniResult.interfaces


@dataclass(frozen=True)
class RouteConfig:
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    gw: str | None


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class InterfaceConfig:
    name: str
    mac: str
    sandbox: str  # the netns path for the container's interfaces, "" on the host


@dataclass(frozen=True)
class CniResult:
    """A plugin chain's ADD result (CNI 0.4.0/1.0.0 schema); ``raw`` is DEL's prevResult."""

    interfaces: tuple[InterfaceConfig, ...]
    ips: tuple[IPConfig, ...]
    routes: tuple[RouteConfig, ...]
    dns: DNSConfig
    raw: dict[str, Any] = field(compare=False, repr=False)


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {value!r}")
    return tuple(str(v) for v in value)


def parse_result(raw: Any, plugin: str) -> CniResult:
    """The schema check of a plugin's ADD output (NetworkError names the plugin)."""
    try:
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        interfaces = tuple(
            InterfaceConfig(str(i["name"]), str(i.get("mac", "")), str(i.get("sandbox", "")))
            for i in raw.get("interfaces") or []
        )
        ips = tuple(
            IPConfig(
                ipaddress.ip_interface(str(ip["address"])),
                str(ip["gateway"]) if ip.get("gateway") else None,
                int(ip["interface"]) if ip.get("interface") is not None else None,
            )
            for ip in raw.get("ips") or []
        )
        routes = tuple(
            RouteConfig(
                ipaddress.ip_network(str(r["dst"]), strict=False), str(r["gw"]) if r.get("gw") else None
            )
            for r in raw.get("routes") or []
        )
        dns_raw = raw.get("dns") or {}
        dns = DNSConfig(
            nameservers=_strings(dns_raw.get("nameservers")),
            domain=str(dns_raw.get("domain") or ""),
            search=_strings(dns_raw.get("search")),
            options=_strings(dns_raw.get("options")),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise NetworkError(f"CNI plugin {plugin} returned a malformed result: {err}") from err
    return CniResult(interfaces=interfaces, ips=ips, routes=routes, dns=dns, raw=raw)


# -- attachments --------------------------------------------------------------------
