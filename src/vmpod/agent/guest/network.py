"""Guest side: the VM's network. ``lo`` up, each NIC found by its MAC (renamed,
MTU, addresses, up), then the routes, with busybox ``ip`` (argv lists only).

``check`` validates a ``ConfigureNetwork`` completely before ``configure`` changes
anything. Standard library only; ``ipaddress`` is imported on use (start-up cost).
"""

from __future__ import annotations

import os

from vmpod.agent.guest.errors import AgentFailure
from vmpod.agent.guest.gproc import run_capture
from vmpod.agent.protocol import MAX_ADDRESSES, MAX_NICS, MAX_ROUTES, ConfigureNetwork

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vmpod.agent.guest.config import AgentConfig

_HEX = set("0123456789abcdef")
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_HOST_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_ADDR_OK = set("0123456789abcdefABCDEF.:/")


class Nic:
    """One interface to set up: checked and normalised."""

    __slots__ = ("mac", "mtu", "addresses", "name")

    def __init__(self, mac: str, mtu: int, addresses: list[tuple[int, str]], name: str) -> None:
        self.mac, self.mtu, self.addresses, self.name = mac, mtu, addresses, name


class Route:
    __slots__ = ("family", "dest", "gateway", "mac", "metric")

    def __init__(self, family: int, dest: str, gateway: str, mac: str, metric: int) -> None:
        self.family, self.dest, self.gateway, self.mac, self.metric = family, dest, gateway, mac, metric


class Plan:
    """A ``ConfigureNetwork`` that passed ``check``."""

    __slots__ = ("nics", "routes", "hostname")

    def __init__(self, nics: list[Nic], routes: list[Route], hostname: str) -> None:
        self.nics, self.routes, self.hostname = nics, routes, hostname


def _invalid(msg: str) -> AgentFailure:
    return AgentFailure(msg, "invalid")


def check_mac(mac: str) -> str:
    """``mac`` lower-cased; a unicast, non-zero ``xx:xx:xx:xx:xx:xx`` or AgentFailure."""
    low = mac.lower()
    parts = low.split(":")
    if len(parts) != 6 or not all(len(x) == 2 and set(x) <= _HEX for x in parts):
        raise _invalid(f"invalid MAC address {mac!r}")
    if int(parts[0], 16) & 1 or low == "00:00:00:00:00:00":
        raise _invalid(f"MAC address {mac!r} is not a unicast address")
    return low


def _check_name(name: str) -> None:
    ok = 0 < len(name) <= 15 and set(name) <= _NAME_OK and name[0].isalnum()
    if not ok or name == "lo":
        raise _invalid(f"invalid interface name {name!r}")


def _check_hostname(name: str) -> None:
    labels = name.split(".")
    if len(name) > 64 or not all(
        0 < len(x) <= 63 and set(x) <= _HOST_OK and x[0] != "-" and x[-1] != "-" for x in labels
    ):
        raise _invalid(f"invalid hostname {name!r}")


def _interface(text: str) -> tuple[int, str]:
    """``"address/prefix"`` -> (4 or 6, its canonical form)."""
    import ipaddress

    addr, slash, prefix = text.partition("/")
    if not slash or not set(text) <= _ADDR_OK or not prefix.isdigit() or len(prefix) > 3:
        raise _invalid(f"invalid address {text!r} (need address/prefix)")
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise _invalid(f"invalid address {text!r}") from None
    ip = iface.ip
    if iface.network.prefixlen == 0 or ip.is_multicast or ip.is_unspecified or ip.is_loopback:
        raise _invalid(f"address {text!r} cannot be an interface's address")
    return ip.version, str(iface)


def _route(dest: str, gateway: str) -> tuple[int, str, str]:
    """(family, destination for ``ip route``, gateway) of one route."""
    import ipaddress

    if "/" not in dest or not set(dest) <= _ADDR_OK:
        raise _invalid(f"invalid route destination {dest!r} (need network/prefix)")
    try:
        net = ipaddress.ip_network(dest, strict=True)
    except ValueError:
        raise _invalid(f"invalid route destination {dest!r}") from None
    where = "default" if net.prefixlen == 0 else str(net)
    if not gateway:
        return net.version, where, ""
    try:
        gw = ipaddress.ip_address(gateway) if set(gateway) <= _ADDR_OK else None
    except ValueError:
        gw = None
    if gw is None or gw.is_multicast or gw.is_unspecified or gw.is_loopback:
        raise _invalid(f"invalid gateway {gateway!r} for route {dest}")
    if gw.version != net.version:
        raise _invalid(f"gateway {gateway} is not IPv{net.version} like route {dest}")
    return net.version, where, str(gw)


def check(a: ConfigureNetwork) -> Plan:
    """Validate every field (counts, MACs, names, addresses, routes, hostname)."""
    if len(a.interfaces) > MAX_NICS:
        raise _invalid(f"{len(a.interfaces)} interfaces (at most {MAX_NICS})")
    if len(a.routes) > MAX_ROUTES:
        raise _invalid(f"{len(a.routes)} routes (at most {MAX_ROUTES})")
    nics: list[Nic] = []
    macs: set[str] = set()
    names: set[str] = set()
    seen_addr: set[str] = set()
    for i in a.interfaces:
        mac = check_mac(i.mac)
        if mac in macs:
            raise _invalid(f"MAC address {mac} is given twice")
        macs.add(mac)
        if i.name:
            _check_name(i.name)
            if i.name in names:
                raise _invalid(f"interface name {i.name!r} is given twice")
            names.add(i.name)
        if not 68 <= i.mtu <= 65535:
            raise _invalid(f"invalid MTU {i.mtu} for {mac} (68..65535)")
        if len(i.addresses) > MAX_ADDRESSES:
            raise _invalid(f"{len(i.addresses)} addresses for {mac} (at most {MAX_ADDRESSES})")
        addrs = [_interface(x) for x in i.addresses]
        for _, addr in addrs:
            ip = addr.partition("/")[0]
            if ip in seen_addr:
                raise _invalid(f"address {ip} is given twice")
            seen_addr.add(ip)
        nics.append(Nic(mac, i.mtu, addrs, i.name))
    routes: list[Route] = []
    seen_dest: set[tuple[int, str, int]] = set()
    for r in a.routes:
        family, dest, gateway = _route(r.dest, r.gateway)
        mac = check_mac(r.mac)
        if mac not in macs:
            raise _invalid(f"route {r.dest} leaves by {mac}, which is none of the interfaces")
        if not 0 <= r.metric < 1 << 32:
            raise _invalid(f"invalid metric {r.metric} for route {r.dest}")
        if (family, dest, r.metric) in seen_dest:
            raise _invalid(f"route {r.dest} is given twice")
        seen_dest.add((family, dest, r.metric))
        routes.append(Route(family, dest, gateway, mac, r.metric))
    if a.hostname:
        _check_hostname(a.hostname)
    return Plan(nics, routes, a.hostname)


def find_by_mac(config: AgentConfig) -> dict[str, str]:
    """MAC -> interface name, from ``config.net_sys`` (/sys/class/net)."""
    found: dict[str, str] = {}
    for name in sorted(os.listdir(config.net_sys)):
        try:
            with open(os.path.join(config.net_sys, name, "address")) as fh:
                mac = fh.read().strip().lower()
        except OSError:
            continue
        found.setdefault(mac, name)
    return found


def configure(config: AgentConfig, plan: Plan) -> list[str]:
    """Apply a checked plan; returns the interfaces' names in order. A failure
    names the interface and the command; what ran before it stays applied."""
    bb = config.busybox
    _ip(bb, "lo", ["link", "set", "dev", "lo", "up"])
    present = find_by_mac(config)
    dev: dict[str, str] = {}
    for nic in plan.nics:
        name = present.get(nic.mac)
        if name is None:
            have = ", ".join(f"{n} {m}" for m, n in sorted(present.items()) if n != "lo") or "none"
            raise AgentFailure(f"no network interface has MAC {nic.mac} (have: {have})", "not_found")
        what = f"{name} ({nic.mac})"
        if nic.name and nic.name != name:
            _ip(bb, what, ["link", "set", "dev", name, "name", nic.name])
            name, what = nic.name, f"{nic.name} ({nic.mac})"
        _ip(bb, what, ["link", "set", "dev", name, "mtu", str(nic.mtu)])
        if any(family == 6 for family, _ in nic.addresses):
            _no_dad(config, name)
        for family, addr in nic.addresses:
            _ip(bb, what, [f"-{family}", "addr", "add", addr, "dev", name])
        _ip(bb, what, ["link", "set", "dev", name, "up"])
        dev[nic.mac] = name
    for r in plan.routes:
        name = dev[r.mac]
        via = ["via", r.gateway] if r.gateway else []
        metric = ["metric", str(r.metric)] if r.metric else []
        _ip(bb, f"{name} ({r.mac})", [f"-{r.family}", "route", "add", r.dest, *via, "dev", name, *metric])
    if plan.hostname:
        _run(bb, "hostname", ["hostname", plan.hostname])
    return [dev[n.mac] for n in plan.nics]


def _no_dad(config: AgentConfig, name: str) -> None:
    """No duplicate address detection: the pod's addresses were assigned (and
    checked) in its network namespace, and under TCG DAD keeps a new IPv6 address
    unusable ("tentative") for seconds. No IPv6 in the kernel: nothing to do."""
    path = os.path.join(config.net_sysctl, "ipv6", "conf", name, "accept_dad")
    try:
        with open(path, "w") as fh:
            fh.write("0\n")
    except FileNotFoundError:
        pass
    except OSError as err:
        raise AgentFailure(f"{name}: cannot turn off duplicate address detection: {err}") from None


def _ip(busybox: str, what: str, args: list[str]) -> None:
    _run(busybox, what, ["ip", *args])


def _run(busybox: str, what: str, args: list[str]) -> None:
    code, out, err = run_capture([busybox, *args], 4096)
    if code != 0:
        detail = (err or out).strip().splitlines()
        raise AgentFailure(f"{what}: `{' '.join(args)}` failed: {detail[-1] if detail else f'status {code}'}")
