"""The CNI client with Debian's real plugins (bridge, host-local, portmap, firewall,
tuning) and real namespaces (the unit tier runs as root).

Each test gets its own network: bridge and network name ``vmpodt<N>``, subnet
``10.251.<N>.0/24``, conflist, lease and record directories under tmp_path. Only
loopback and that subnet are ever addressed. The fixture detaches whatever a test
left, deletes its bridge and then checks that no iptables rule mentions the
network, so a leak fails the test that caused it.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vmpod.errors import NetworkError
from vmpod.network import cni
from vmpod.network.ports import PortMapping
from vmpod.paths import Paths

PLUGINS = cni.CNI_PATH
_numbers = itertools.count(os.getpid() % 50 * 3)

pytestmark = pytest.mark.skipif(
    not any((d / "bridge").exists() for d in PLUGINS), reason="containernetworking-plugins is not installed"
)


def iptables_lines(*needles: str) -> list[str]:
    """iptables-save lines (every table) that mention any of ``needles``."""
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if any(n in line for n in needles)]


def ip_json(*argv: str) -> Any:
    return json.loads(subprocess.run(["ip", "-j", *argv], capture_output=True, text=True, check=True).stdout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Net:
    number: int
    network: cni.Network
    spec: cni.BridgeNetwork
    state_dir: Path
    ids: list[str] = field(default_factory=list)  # every container id attach was called with

    @property
    def name(self) -> str:
        return self.network.name

    @property
    def prefix(self) -> str:
        """The subnet's first three octets and a dot, as iptables-save prints addresses."""
        return str(self.spec.subnet.network_address).rsplit(".", 1)[0] + "."

    def leases(self) -> list[str]:
        """host-local's lease files (one per address in use)."""
        directory = self.spec.data_dir / self.name
        return (
            sorted(p.name for p in directory.iterdir() if p.name[0].isdigit()) if directory.is_dir() else []
        )

    def leftovers(self) -> list[str]:
        return iptables_lines(f'"{self.name}"', self.prefix)

    def attach(self, *ports: PortMapping, **kwargs: Any) -> cni.Attachment:
        self.ids.append(uuid.uuid4().hex)
        return cni.attach(self.network, self.ids[-1], list(ports), state_dir=self.state_dir, **kwargs)

    def namespaces(self) -> list[str]:
        """The named netns of this test's containers that exist."""
        return [name for name in map(cni.netns_name, self.ids) if (cni.NETNS_DIR / name).exists()]


def _unused_number() -> int:
    taken = {link["ifname"] for link in ip_json("link")}
    routes = [r["dst"] for r in ip_json("route")]
    for n in _numbers:
        n = 10 + n % 240
        if f"vmpodt{n}" not in taken and not any(d.startswith(f"10.251.{n}.") for d in routes):
            return n
    raise AssertionError("unreachable")


Plugins = list[dict[str, Any]]


def make_net(tmp_path: Path, edit: Callable[[Plugins], Plugins] | None = None) -> Net:
    n = _unused_number()
    spec = cni.BridgeNetwork(
        data_dir=tmp_path / "ipam",
        name=f"vmpodt{n}",
        bridge=f"vmpodt{n}",
        subnet=ipaddress.IPv4Network(f"10.251.{n}.0/24"),
    )
    conf_dir = tmp_path / "net.d"
    if edit is not None:
        conf_dir.mkdir(parents=True)
        conflist = spec.conflist()
        conflist["plugins"] = edit(conflist["plugins"])
        (conf_dir / cni.CONF_NAME).write_text(json.dumps(conflist))
    network = cni.ensure_network(conf_dir, spec)
    return Net(n, network, spec, tmp_path / "state")


def _teardown(net: Net) -> None:
    """Detach what the test left, then remove the bridge and netns whatever happened;
    fails if the test left anything."""
    problems = []
    for attachment in cni.load_attachments(net.state_dir):
        problems.append(f"attachment {attachment.container_id} left")
        try:
            cni.detach(attachment)
        except NetworkError as err:
            problems.append(str(err))
    subprocess.run(["ip", "link", "del", net.spec.bridge], capture_output=True)
    for name in net.namespaces():
        subprocess.run(["ip", "netns", "del", name], check=True)
        problems.append(f"netns {name} left")
    problems += net.leftovers()
    assert problems == []


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    made = make_net(tmp_path)
    yield made
    _teardown(made)


def assert_nothing_left(net: Net, attachment_netns: Path | None = None) -> None:
    assert net.leases() == []
    assert net.leftovers() == []
    assert [p.name for p in net.state_dir.glob("*.json")] == []
    if attachment_netns is not None:
        assert not attachment_netns.exists()
    assert net.namespaces() == []


# -- the configuration --------------------------------------------------------------


def test_conflist_written_once_then_the_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cni.CONF_DIR_ENV, str(tmp_path / "net.d"))
    assert cni.conf_dir() == tmp_path / "net.d"
    spec = cni.default_network(Paths(home=tmp_path / "home", run=tmp_path / "run"))
    assert (spec.name, spec.bridge, str(spec.subnet)) == ("vmpod", "vmpod0", "10.89.0.0/24")
    network = cni.ensure_network(cni.conf_dir(), spec)
    data = json.loads((tmp_path / "net.d" / cni.CONF_NAME).read_text())
    assert [p["type"] for p in data["plugins"]] == ["bridge", "portmap", "firewall", "tuning"]
    assert data["plugins"][0]["ipam"]["dataDir"] == str(tmp_path / "run" / "cni" / "ipam")
    assert data["plugins"][1]["capabilities"] == {"portMappings": True}
    assert network.subnets() == [ipaddress.ip_network("10.89.0.0/24")]
    # an edited conflist is the user's: not rewritten
    data["plugins"] = data["plugins"][:1]
    (tmp_path / "net.d" / cni.CONF_NAME).write_text(json.dumps(data))
    assert len(cni.ensure_network(cni.conf_dir(), spec).plugins) == 1


@pytest.mark.parametrize(
    ("conflist", "message"),
    [
        ({"cniVersion": "0.3.1", "name": "x", "plugins": [{"type": "bridge"}]}, "cniVersion '0.3.1'"),
        ({"cniVersion": "1.0.0", "name": "x", "plugins": []}, "no plugins"),
        ({"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "../bin/sh"}]}, "without a valid 'type'"),
        ({"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}, "no network name"),
    ],
)
def test_bad_conflist(tmp_path: Path, conflist: dict[str, Any], message: str) -> None:
    path = tmp_path / cni.CONF_NAME
    path.write_text(json.dumps(conflist))
    with pytest.raises(Exception, match="CNI network config") as info:
        cni.load_network(path)
    assert message in str(info.value)


def test_subnet_taken_by_a_host_route(tmp_path: Path) -> None:
    n = _unused_number()
    other = f"vmpodtd{n}"
    subprocess.run(["ip", "link", "add", other, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", f"10.251.{n}.1/25", "dev", other], check=True)
        subprocess.run(["ip", "link", "set", other, "up"], check=True)
        spec = cni.BridgeNetwork(
            data_dir=tmp_path,
            name=f"vmpodt{n}",
            bridge=f"vmpodt{n}",
            subnet=ipaddress.IPv4Network(f"10.251.{n}.0/24"),
        )
        with pytest.raises(NetworkError) as info:
            cni.ensure_network(tmp_path / "net.d", spec)
        assert str(info.value) == (
            f"network vmpodt{n}'s subnet 10.251.{n}.0/24 collides with the host route "
            f"10.251.{n}.0/25 dev {other}"
            f" (choose a free subnet in {tmp_path / 'net.d' / cni.CONF_NAME})"
        )
        assert not (tmp_path / "net.d" / cni.CONF_NAME).exists()
    finally:
        subprocess.run(["ip", "link", "del", other], check=True)


# -- attach and detach --------------------------------------------------------------


def test_attach_makes_a_netns_with_address_and_default_route(net: Net) -> None:
    attachment = net.attach()
    name = cni.netns_name(attachment.container_id)
    assert attachment.netns == Path("/run/netns") / name
    assert name == "vmpod-" + attachment.container_id[:12]

    result = attachment.result
    assert result is not None
    [ip] = result.ips
    assert ip.address.network == net.spec.subnet
    assert ip.gateway == f"10.251.{net.number}.1"
    assert result.interfaces[ip.interface or 0].name == "eth0"
    assert result.interfaces[ip.interface or 0].sandbox == str(attachment.netns)

    [link] = [i for i in ip_json("-n", name, "addr") if i["ifname"] == "eth0"]
    assert f"{ip.address.ip}/24" in [f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]]
    routes = ip_json("-n", name, "route")
    assert {"dst": "default", "gateway": f"10.251.{net.number}.1", "dev": "eth0"}.items() <= routes[0].items()

    assert net.leases() == [str(ip.address.ip)]
    record = cni.load_attachment(attachment.state_file)
    assert record == attachment
    assert record.result is not None and record.result.raw == result.raw

    cni.detach(attachment)
    assert_nothing_left(net, attachment.netns)
    # the bridge stays for the next container (as podman's cni-podman0)
    assert [link["ifname"] for link in ip_json("link", "show", net.spec.bridge)] == [net.spec.bridge]


SERVER = """
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 80))
srv.listen()
print("ready", flush=True)
conn, peer = srv.accept()
request = conn.recv(100)
conn.sendall(b"hello from the netns to " + peer[0].encode() + b": " + request)
conn.close()
"""


def test_published_port_on_localhost_reaches_the_netns(net: Net) -> None:
    port = free_port()
    attachment = net.attach(PortMapping("127.0.0.1", port, 80))
    assert net.leftovers() != []  # portmap's DNAT, bridge's masquerade, firewall's accept
    server = subprocess.Popen(
        ["ip", "netns", "exec", attachment.netns.name, sys.executable, "-c", SERVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        # 127.0.0.1 -> 10.251.N.2 needs route_localnet on the bridge: portmap sets it (snat)
        assert Path(f"/proc/sys/net/ipv4/conf/{net.spec.bridge}/route_localnet").read_text() == "1\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"ping")
            reply = conn.recv(200)
        # portmap masquerades localhost traffic: the server sees the bridge's address
        assert reply == f"hello from the netns to 10.251.{net.number}.1: ping".encode()
        assert server.wait(timeout=10) == 0
    finally:
        server.kill()
        server.wait()
    cni.detach(attachment)
    assert_nothing_left(net, attachment.netns)


def test_detach_after_the_netns_vanished(net: Net) -> None:
    attachment = net.attach(PortMapping("127.0.0.1", free_port(), 80))
    subprocess.run(["ip", "netns", "del", attachment.netns.name], check=True)
    cni.detach(attachment)
    # the bridge plugin alone would leave its masquerade rule: it finds it by the
    # (gone) interface's addresses, which the re-made netns gives back
    assert_nothing_left(net, attachment.netns)


def test_detach_twice(net: Net) -> None:
    attachment = net.attach()
    cni.detach(attachment)
    cni.detach(attachment)
    assert_nothing_left(net, attachment.netns)


def test_collect_stale(net: Net) -> None:
    alive = net.attach()
    dead = net.attach(PortMapping("127.0.0.1", free_port(), 80))
    # a vmpod that died: its record is all that knows
    assert cni.collect_stale(net.state_dir, lambda cid: cid == alive.container_id) == [dead.container_id]
    assert not dead.netns.exists()
    assert alive.netns.exists()
    assert [a.container_id for a in cni.load_attachments(net.state_dir)] == [alive.container_id]
    assert cni.collect_stale(net.state_dir, lambda cid: False) == [alive.container_id]
    assert_nothing_left(net, alive.netns)


def test_two_attachments_get_distinct_addresses(net: Net) -> None:
    a, b = net.attach(), net.attach()
    assert a.result is not None and b.result is not None
    assert a.result.ips[0].address != b.result.ips[0].address
    assert len(net.leases()) == 2
    cni.detach(a)
    cni.detach(b)
    assert_nothing_left(net)


# -- failures -----------------------------------------------------------------------


def test_bad_plugin_path(net: Net, tmp_path: Path) -> None:
    empty = tmp_path / "no-plugins"
    empty.mkdir()
    with pytest.raises(NetworkError) as info:
        net.attach(cni_path=[empty])
    assert str(info.value) == (
        f"CNI plugin bridge not found in {empty} (apt-get install containernetworking-plugins)"
    )
    assert_nothing_left(net)


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        # a plugin's own JSON error ({code, msg, details}), after bridge and portmap ran
        ({"type": "tuning", "sysctl": {"net.ipv4.no_such_knob": "1"}}, "CNI plugin tuning ADD failed: "),
        # a plugin that does not exist (found out before any plugin runs)
        ({"type": "nosuchplugin"}, "CNI plugin nosuchplugin not found in "),
    ],
)
def test_failed_add_leaves_nothing(tmp_path: Path, broken: dict[str, Any], message: str) -> None:
    net = make_net(tmp_path, lambda plugins: plugins[:2] + [broken])
    try:
        with pytest.raises(NetworkError) as info:
            net.attach(PortMapping("127.0.0.1", free_port(), 80))
        text = str(info.value)
        assert text.startswith(message)
        assert "\n" not in text
        assert_nothing_left(net)
    finally:
        _teardown(net)


def test_plugin_time_limit(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in PLUGINS:
        for plugin in ("bridge", "host-local", "portmap"):
            if (d / plugin).exists() and not (bin_dir / plugin).exists():
                (bin_dir / plugin).symlink_to(d / plugin)
    (bin_dir / "hang").write_text('#!/bin/sh\n[ "$CNI_COMMAND" = ADD ] && exec sleep 60\nexit 0\n')
    (bin_dir / "hang").chmod(0o755)
    net = make_net(tmp_path / "net", lambda plugins: plugins[:2] + [{"type": "hang"}])
    failure: list[BaseException] = []

    def attach() -> None:
        try:
            net.attach(PortMapping("127.0.0.1", free_port(), 80), cni_path=[bin_dir], timeout=2)
        except BaseException as err:
            failure.append(err)

    thread = threading.Thread(target=attach)
    thread.start()
    try:
        # while the third plugin hangs, the record holds what the first two made
        deadline = time.monotonic() + 2
        result = None
        while result is None and time.monotonic() < deadline:
            records = list(net.state_dir.glob("*.json"))
            result = json.loads(records[0].read_text())["result"] if records else None
            time.sleep(0.02)
        assert result is not None and result["ips"][0]["address"].startswith(net.prefix)
        thread.join()
        assert [str(err) for err in failure] == ["CNI plugin hang ADD did not finish in 2 s"]
        assert_nothing_left(net)
    finally:
        thread.join()
        _teardown(net)


def test_host_port_taken_by_a_host_program(net: Net) -> None:
    # portmap binds nothing: its DNAT would silently take the port's traffic from
    # the program, so attach refuses before any plugin runs
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(NetworkError) as info:
            net.attach(PortMapping("127.0.0.1", port, 80))
    assert str(info.value) == (
        f"cannot publish 127.0.0.1:{port}:80/tcp: host port 127.0.0.1:{port}/tcp is in use"
    )
    assert_nothing_left(net)


def test_host_port_published_by_another_container(net: Net) -> None:
    port = free_port()
    first = net.attach(PortMapping("0.0.0.0", port, 80))
    with pytest.raises(
        NetworkError, match=f"host port {port}/tcp is published by container {first.container_id}"
    ):
        net.attach(PortMapping("127.0.0.1", port, 8080))
    cni.detach(first)
    assert_nothing_left(net)


def test_attach_refuses_a_taken_id_or_netns(net: Net) -> None:
    attachment = net.attach()
    with pytest.raises(NetworkError, match="is attached to a network already"):
        cni.attach(net.network, attachment.container_id, [], state_dir=net.state_dir)
    # another id with the same first 12 characters: same netns name
    with pytest.raises(NetworkError, match="network namespace .* exists already"):
        cni.attach(net.network, attachment.container_id[:12] + "ffff", [], state_dir=net.state_dir)
    cni.detach(attachment)
    assert_nothing_left(net)


def test_unreadable_record_is_skipped(net: Net) -> None:
    net.state_dir.mkdir(parents=True, exist_ok=True)
    (net.state_dir / "junk.json").write_text("{")
    assert cni.load_attachments(net.state_dir) == []
    (net.state_dir / "junk.json").unlink()


def test_collect_stale_of_a_vmpod_killed_during_add(tmp_path: Path) -> None:
    # killed after the first plugin, before it recorded its result: bridge's DEL finds
    # its veth (and so its masquerade rule) in the netns, host-local its lease by id
    net = make_net(tmp_path, lambda plugins: plugins[:1])
    try:
        attachment = net.attach()
        record = json.loads(attachment.state_file.read_text())
        record["result"] = None
        attachment.state_file.write_text(json.dumps(record))
        assert cni.collect_stale(net.state_dir, lambda cid: False) == [attachment.container_id]
        assert_nothing_left(net, attachment.netns)
    finally:
        _teardown(net)
