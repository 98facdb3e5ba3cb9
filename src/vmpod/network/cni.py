"""A CNI client: vmpod's own network namespaces for `vmpod run --network bridge`.

podman makes the pod's network namespace for vmpod-runtime; standalone `vmpod run`
makes it here the same way podman's CNI backend does: a fresh named netns, then the
plugins of a network configuration list (conflist) executed one after the other
per the CNI specification (1.0.0; 0.4.0 lists are accepted too). The VM side
(``vmpod.network.tap``) then mirrors the netns's veth into the guest.

The network is vmpod's own: ``vmpod.conflist`` in ``/etc/vmpod/net.d``
(``VMPOD_CNI_CONF_DIR``), written on first use and the user's to edit after that.
It chains ``bridge`` (bridge ``vmpod0``, host-local IPAM on ``10.89.0.0/24``,
gateway and masquerade), ``portmap`` (published ports), ``firewall`` (lets the
bridge's traffic through a FORWARD policy of DROP) and ``tuning``: podman's
default list, on a subnet next to podman's 10.88.0.0/16. A subnet that a host
route already covers is refused before any plugin runs.

Lifecycle, all in one place:
- ``attach`` writes the attachment record (``<state_dir>/<id>.json``) *before* it
  creates anything, so that a vmpod killed half way is cleaned up later by
  ``collect_stale``; the record keeps the exact conflist and port mappings the ADD
  used, and the ADD's result (updated after every plugin), which DEL gets back as
  ``prevResult`` (the spec's cached result).
- A failed ADD runs DEL for the plugins already run (the failed one included:
  DEL must tolerate what ADD never made), deletes the netns and the record.
- ``detach`` runs DEL in reverse order, then deletes the netns and the record. The
  plugins complete a DEL when the netns is gone; but the bridge plugin (1.1.1)
  then forgets its masquerade rule, which it finds by the addresses of the
  container's interface. So a vanished netns is first re-made with a dummy
  ``eth0`` holding the ADD's addresses: every plugin then finds what it made.

Published ports: portmap adds DNAT rules and binds nothing, so ``attach`` first
checks that no host program has bound the port and no other vmpod attachment
publishes it (a check, not a reservation). ``127.0.0.1`` works because portmap's
``snat`` (on by default) masquerades traffic from the host's own addresses and sets
``route_localnet`` on the bridge, which lets 127/8 be routed to a container.

The bridge outlives its last container (as podman's ``cni-podman0``): removing it
would race with a concurrent ADD, and a bridge with no ports costs nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vmpod.errors import ConfigError, NetworkError
from vmpod.jsonsafe import parse_json
from vmpod.network import rtnl
from vmpod.network.cniresult import CniResult, parse_result
from vmpod.network.netns import netlink_socket, open_netns
from vmpod.network.ports import PortMapping, check_distinct, host_port_in_use
from vmpod.paths import Paths
from vmpod.proc import tail

log = logging.getLogger(__name__)

CONF_DIR = Path("/etc/vmpod/net.d")
CONF_DIR_ENV = "VMPOD_CNI_CONF_DIR"
CONF_NAME = "vmpod.conflist"
# Debian's containernetworking-plugins, then the upstream default.
CNI_PATH: tuple[Path, ...] = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
CNI_VERSIONS = ("0.4.0", "1.0.0")
IFNAME = "eth0"
NETNS_DIR = Path("/run/netns")  # where `ip netns` (and pyroute2) keep named namespaces
NETNS_PREFIX_ENV = "VMPOD_CNI_NETNS_PREFIX"  # tests tell their namespaces apart by it
# One plugin call: host-local waits for its lease lock, portmap/firewall for the
# xtables lock (iptables -w); seconds on a busy host, never minutes.
PLUGIN_TIMEOUT = 60.0
# Plugins run iptables, ip6tables, modprobe: they need a PATH with sbin.
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# CNI spec: "alphanumeric, plus hyphen, underscore and period" (and our file names).
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_PLUGIN_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# -- the network configuration ------------------------------------------------------


@dataclass(frozen=True)
class BridgeNetwork:
    """What vmpod writes as its conflist when there is none yet."""

    data_dir: Path  # host-local's lease directory (leases go to DATA_DIR/NAME/)
    name: str = "vmpod"
    bridge: str = "vmpod0"
    subnet: ipaddress.IPv4Network = ipaddress.IPv4Network("10.89.0.0/24")

    def conflist(self) -> dict[str, Any]:
        gateway = str(next(self.subnet.hosts()))
        return {
            "cniVersion": "1.0.0",
            "name": self.name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(self.subnet), "gateway": gateway}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.data_dir),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
                {"type": "firewall", "backend": "iptables"},
                {"type": "tuning"},
            ],
        }


def default_network(paths: Paths) -> BridgeNetwork:
    """vmpod's network; leases live beside the attachment records in the run
    directory, so both vanish together at a reboot (when every netns has)."""
    return BridgeNetwork(data_dir=paths.run / "cni" / "ipam")


def conf_dir() -> Path:
    return Path(os.environ.get(CONF_DIR_ENV) or CONF_DIR)


def state_dir(paths: Paths) -> Path:
    """Where the attachment records of ``paths`` live."""
    return paths.run / "cni"


@dataclass(frozen=True)
class Network:
    """A loaded, checked conflist."""

    path: Path
    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...] = field(compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"cniVersion": self.cni_version, "name": self.name, "plugins": list(self.plugins)}

    def subnets(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The host-local ranges of the bridge plugins (what must not collide with host routes)."""
        out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for plugin in self.plugins:
            ipam = plugin.get("ipam") or {}
            if plugin.get("type") != "bridge" or ipam.get("type") != "host-local":
                continue
            ranges = ipam.get("ranges") or ([[{"subnet": ipam["subnet"]}]] if "subnet" in ipam else [])
            for rangeset in ranges:
                for r in rangeset:
                    out.append(ipaddress.ip_network(str(r["subnet"]), strict=False))
        return out

    def bridges(self) -> list[str]:
        return [str(p.get("bridge", "cni0")) for p in self.plugins if p.get("type") == "bridge"]


def parse_network(data: Any, path: Path) -> Network:
    """Check a conflist's shape once, here; ConfigError names the file."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"CNI network config {path}: {why}", hint="fix or delete it (vmpod rewrites it)")

    if not isinstance(data, dict):
        raise bad("not a JSON object")
    name, version, plugins = data.get("name"), data.get("cniVersion"), data.get("plugins")
    if not isinstance(name, str) or not name:
        raise bad("no network name")
    if version not in CNI_VERSIONS:
        raise bad(f"cniVersion {version!r} is not one vmpod speaks ({', '.join(CNI_VERSIONS)})")
    if not isinstance(plugins, list) or not plugins:
        raise bad("no plugins (a conflist needs a 'plugins' list)")
    for plugin in plugins:
        if not isinstance(plugin, dict) or not _PLUGIN_TYPE.fullmatch(str(plugin.get("type", ""))):
            raise bad(f"a plugin without a valid 'type': {json.dumps(plugin)[:200]}")
    try:
        network = Network(path=path, name=name, cni_version=version, plugins=tuple(plugins))
        network.subnets()
    except (KeyError, TypeError, ValueError) as err:
        raise bad(f"bad host-local range: {err}") from err
    return network


def load_network(path: Path) -> Network:
    try:
        data = parse_json(path.read_bytes())
    except FileNotFoundError as err:
        raise ConfigError(f"no CNI network config at {path}") from err
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read CNI network config {path}: {err}") from err
    return parse_network(data, path)


def ensure_network(directory: Path, default: BridgeNetwork) -> Network:
    """The conflist in ``directory``, written from ``default`` if there is none (after
    checking that its subnet is free)."""
    path = directory / CONF_NAME
    if not path.exists():
        check_subnets_free(parse_network(default.conflist(), path))
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{CONF_NAME}.{os.getpid()}")
        tmp.write_text(json.dumps(default.conflist(), indent=2) + "\n")
        try:
            os.link(tmp, path)  # never replaces a conflist another process wrote meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        log.info("wrote CNI network config %s", path)
    return load_network(path)


def _host_routes() -> list[rtnl.RouteInfo]:
    with rtnl.Rtnl(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0).detach()) as conn:
        return conn.routes()


def _host_links() -> dict[int, str]:
    with rtnl.Rtnl(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0).detach()) as conn:
        return {link.index: link.name for link in conn.links()}


def check_subnets_free(network: Network) -> None:
    """NetworkError if a host route other than the network's own bridge's overlaps
    its subnet (a VPN, another bridge, the host's LAN): containers would be
    unreachable or would hide those hosts. The default route does not count."""
    subnets = network.subnets()
    if not subnets:
        return
    names = _host_links()
    own = set(network.bridges())
    for route in _host_routes():
        if route.dst is None or route.dst_len == 0 or route.table != rtnl.RT_TABLE_MAIN:
            continue
        dev = names.get(route.oif, "?") if route.oif is not None else "?"
        if dev in own:
            continue
        dst = ipaddress.ip_network(f"{route.dst}/{route.dst_len}", strict=False)
        for subnet in subnets:
            if subnet.version == dst.version and subnet.overlaps(dst):
                raise NetworkError(
                    f"network {network.name}'s subnet {subnet} collides with the host route {dst} dev {dev}",
                    hint=f"choose a free subnet in {network.path}",
                )


# -- results ------------------------------------------------------------------------


@dataclass(frozen=True)
class Attachment:
    """One container's place on a CNI network, as recorded in ``state_file``."""

    container_id: str
    netns: Path
    network: Network
    ports: tuple[PortMapping, ...]
    cni_path: tuple[Path, ...]
    state_file: Path
    ifname: str = IFNAME
    result: CniResult | None = None  # None while the ADD runs (or if vmpod died in it)

    def to_json(self) -> dict[str, Any]:
        return {
            "container_id": self.container_id,
            "netns": str(self.netns),
            "ifname": self.ifname,
            "conflist_path": str(self.network.path),
            "conflist": self.network.to_json(),
            "ports": [p.to_json() for p in self.ports],
            "cni_path": [str(p) for p in self.cni_path],
            "result": self.result.raw if self.result is not None else None,
        }


def load_attachment(path: Path) -> Attachment:
    try:
        data = parse_json(path.read_bytes())
        result = parse_result(data["result"], "(recorded)") if data.get("result") is not None else None
        return Attachment(
            container_id=str(data["container_id"]),
            netns=Path(data["netns"]),
            network=parse_network(data["conflist"], Path(data["conflist_path"])),
            ports=tuple(PortMapping.from_json(p) for p in data["ports"]),
            cni_path=tuple(Path(p) for p in data["cni_path"]),
            state_file=path,
            ifname=str(data["ifname"]),
            result=result,
        )
    except (OSError, ValueError, KeyError, TypeError, ConfigError, NetworkError) as err:
        raise NetworkError(f"unreadable CNI attachment record {path}: {err}") from err


def _save(attachment: Attachment) -> None:
    tmp = attachment.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(attachment.to_json(), indent=1))
    os.replace(tmp, attachment.state_file)


def load_attachments(directory: Path) -> list[Attachment]:
    """Every recorded attachment in ``directory`` (unreadable records are logged and skipped)."""
    out = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            out.append(load_attachment(path))
        except NetworkError as err:
            log.warning("%s", err)
    return out


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One attach/detach at a time per state directory (port checks, record files)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def netns_name(container_id: str) -> str:
    return os.environ.get(NETNS_PREFIX_ENV, "vmpod-") + container_id[:12]


# -- plugin execution ---------------------------------------------------------------


def _find_plugin(kind: str, cni_path: Sequence[Path]) -> Path:
    for directory in cni_path:
        candidate = directory / kind
        if os.access(candidate, os.X_OK) and candidate.is_file():
            return candidate
    raise NetworkError(
        f"CNI plugin {kind} not found in {':'.join(map(str, cni_path))}",
        hint="apt-get install containernetworking-plugins",
    )


def _plugin_error(kind: str, command: str, stdout: bytes, stderr: bytes, returncode: int) -> NetworkError:
    """The spec's error object ({code, msg, details}) as one line naming the plugin."""
    try:
        err = parse_json(stdout)
        msg = str(err["msg"])
        code = err.get("code")
        details = str(err.get("details") or "")
    except (ValueError, KeyError, TypeError):
        msg = tail(stderr or stdout, 300).replace("\n", "; ") or f"exit status {returncode}"
        code, details = None, ""
    text = f"CNI plugin {kind} {command} failed: {msg}"
    if details and details not in msg:
        text += f": {details}"
    text = "; ".join(line.strip() for line in text.splitlines() if line.strip())  # one line
    return NetworkError(text, plugin=kind, command=command, code=code, stderr=tail(stderr))


def _exec_plugin(
    attachment: Attachment,
    plugin: dict[str, Any],
    command: str,
    prev_result: dict[str, Any] | None,
    timeout: float,
) -> dict[str, Any] | None:
    """Run one plugin of the list; its ADD result (a dict), None for DEL."""
    kind = str(plugin["type"])
    binary = _find_plugin(kind, attachment.cni_path)
    conf = dict(plugin)
    conf["name"] = attachment.network.name
    conf["cniVersion"] = attachment.network.cni_version
    runtime_config = {"portMappings": [p.to_cni() for p in attachment.ports]}
    capabilities = plugin.get("capabilities") or {}
    wanted = {k: v for k, v in runtime_config.items() if capabilities.get(k)}
    if wanted:
        conf["runtimeConfig"] = wanted
    if prev_result is not None:
        conf["prevResult"] = prev_result
    env = {
        "PATH": os.environ.get("PATH", "") + ":" + _SBIN_PATH,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": attachment.container_id,
        "CNI_NETNS": str(attachment.netns),
        "CNI_IFNAME": attachment.ifname,
        "CNI_PATH": ":".join(map(str, attachment.cni_path)),
    }
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [str(binary)], input=json.dumps(conf).encode(), env=env, capture_output=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        raise NetworkError(
            f"CNI plugin {kind} {command} did not finish in {timeout:.0f} s",
            plugin=kind,
            command=command,
            stderr=tail(err.stderr or b""),
        ) from err
    except OSError as err:
        raise NetworkError(f"CNI plugin {kind} {command}: cannot run {binary}: {err.strerror}") from err
    log.debug("CNI %s %s: exit %d in %.3f s", kind, command, proc.returncode, time.monotonic() - started)
    if proc.returncode != 0:
        raise _plugin_error(kind, command, proc.stdout, proc.stderr, proc.returncode)
    if command != "ADD":
        return None
    try:
        result = parse_json(proc.stdout)
    except ValueError as err:
        raise NetworkError(f"CNI plugin {kind} ADD printed no JSON result: {tail(proc.stdout, 200)}") from err
    parse_result(result, kind)
    assert isinstance(result, dict)
    return result


def _del_chain(attachment: Attachment, plugins: Sequence[dict[str, Any]], timeout: float) -> list[str]:
    """DEL for ``plugins`` in reverse order; every plugin gets its turn, the failures are returned."""
    prev = attachment.result.raw if attachment.result is not None else None
    failures = []
    for plugin in reversed(plugins):
        try:
            _exec_plugin(attachment, plugin, "DEL", prev, timeout)
        except NetworkError as err:
            failures.append(str(err))
    return failures


def _remake_netns(attachment: Attachment) -> bool:
    """Re-make a vanished netns with a dummy interface holding the ADD's addresses, so
    that DEL finds what the plugins key their clean-up on. True if it did."""
    if attachment.result is None or attachment.netns.exists():
        return False
    if attachment.netns.parent != NETNS_DIR:
        return False
    rtnl.create_named_netns(attachment.netns.name)
    try:
        fd = open_netns(attachment.netns)
        try:
            with netlink_socket(fd) as conn:
                # a veth with both ends inside: the bridge plugin deletes it by name
                index = conn.add_veth(attachment.ifname, "vmpod-del")
                for ip in attachment.result.ips:
                    conn.add_address(index, str(ip.address.ip), ip.address.network.prefixlen)
        finally:
            os.close(fd)
    except BaseException:
        _remove_netns(attachment.netns)
        raise
    return True


def _remove_netns(netns: Path) -> None:
    if netns.parent == NETNS_DIR:
        rtnl.remove_named_netns(netns.name)


# -- the API ------------------------------------------------------------------------


def attach(
    network: Network,
    container_id: str,
    ports: Sequence[PortMapping],
    *,
    state_dir: Path,
    cni_path: Sequence[Path] = CNI_PATH,
    timeout: float = PLUGIN_TIMEOUT,
) -> Attachment:
    """A fresh netns ``/run/netns/vmpod-<id12>`` with the network's plugins ADDed.

    On any failure every plugin run so far gets its DEL, the netns and the record
    go, and NetworkError says which plugin failed and why.
    """
    if not _CONTAINER_ID.fullmatch(container_id):
        raise ConfigError(f"container id {container_id!r} is not usable for CNI (letters, digits, _ . -)")
    check_distinct(ports)
    name = netns_name(container_id)
    attachment = Attachment(
        container_id=container_id,
        netns=NETNS_DIR / name,
        network=network,
        ports=tuple(ports),
        cni_path=tuple(cni_path),
        state_file=state_dir / f"{container_id}.json",
    )
    with _locked(state_dir):
        if attachment.state_file.exists():
            raise NetworkError(f"container {container_id} is attached to a network already")
        if attachment.netns.exists():
            raise NetworkError(
                f"network namespace {attachment.netns} exists already",
                hint=f"a container whose id starts {container_id[:12]} runs, or `ip netns del {name}`",
            )
        for plugin in network.plugins:  # all there before anything is made
            _find_plugin(str(plugin["type"]), attachment.cni_path)
        check_subnets_free(network)
        others = load_attachments(state_dir)
        for mapping in ports:
            for other in others:
                if any(mapping.overlaps(p) for p in other.ports):
                    raise NetworkError(
                        f"host port {mapping.host_port}/{mapping.protocol} is published by container "
                        f"{other.container_id} already"
                    )
            why = host_port_in_use(mapping)
            if why:
                raise NetworkError(f"cannot publish {mapping}: {why}")
        _save(attachment)
        started: list[dict[str, Any]] = []
        prev: dict[str, Any] | None = None
        try:
            rtnl.create_named_netns(name)
            for plugin in network.plugins:
                started.append(plugin)
                prev = _exec_plugin(attachment, plugin, "ADD", prev, timeout)
                # recorded after every plugin: a vmpod killed in the chain leaves the
                # addresses that the next plugins' DEL need (firewall finds its rules by them)
                attachment = replace(attachment, result=parse_result(prev, "chain"))
                _save(attachment)
        except BaseException as err:
            partial = replace(attachment, result=parse_result(prev, "chain") if prev is not None else None)
            failures = _del_chain(partial, started, timeout)
            if failures:
                log.warning("clean-up of the failed ADD left work: %s", "; ".join(failures))
                if isinstance(err, NetworkError):
                    err.details["cleanup_failures"] = failures
            else:
                _remove_netns(attachment.netns)
                attachment.state_file.unlink(missing_ok=True)
            raise
    log.info(
        "attached %s to %s: %s",
        container_id,
        network.name,
        ", ".join(str(ip.address) for ip in attachment.result.ips) if attachment.result else "-",
    )
    return attachment


def detach(attachment: Attachment, *, timeout: float = PLUGIN_TIMEOUT) -> None:
    """DEL for every plugin (reverse order), then the netns and the record go. Works
    when the netns is gone already, and does nothing the second time. A DEL that
    fails keeps the record (and netns) for a retry and raises NetworkError."""
    with _locked(attachment.state_file.parent):
        if not attachment.state_file.exists():
            log.debug("%s is detached already", attachment.container_id)
            return
        remade = False
        try:
            remade = _remake_netns(attachment)
        except (OSError, NetworkError) as err:
            log.warning("cannot re-make %s for DEL (%s); DEL without it", attachment.netns, err)
        failures = _del_chain(attachment, attachment.network.plugins, timeout)
        if failures and remade:
            # e.g. an earlier DEL removed the masquerade rule already: as the spec has it
            _remove_netns(attachment.netns)
            log.info("DEL with a re-made netns failed (%s); DEL without it", failures[0])
            failures = _del_chain(attachment, attachment.network.plugins, timeout)
        if failures:
            raise NetworkError(
                f"cannot detach {attachment.container_id} from {attachment.network.name}: {failures[0]}",
                hint="the record is kept: the next detach or collection retries",
                failures=failures,
            )
        _remove_netns(attachment.netns)
        attachment.state_file.unlink(missing_ok=True)


def collect_stale(directory: Path, in_use: Callable[[str], bool]) -> list[str]:
    """Detach every recorded attachment whose container ``in_use`` says is gone (a
    vmpod that died before its detach); returns their container ids. Failures are
    logged and left for the next collection."""
    collected = []
    for attachment in load_attachments(directory):
        if in_use(attachment.container_id):
            continue
        try:
            detach(attachment)
        except NetworkError as err:
            log.warning("stale CNI attachment %s: %s", attachment.container_id, err)
            continue
        collected.append(attachment.container_id)
    return collected
