"""Pod namespace -> tap wiring on real kernel objects (the unit tier runs as root).

Each test builds what a CNI bridge would leave behind, in throw-away namespaces
only: a "pod" namespace with eth0 (10.250.N.2/24, default route via 10.250.N.1) whose
veth peer sits in a "peer" namespace with 10.250.N.1. Frames written to the tap fd
must come out of eth0 and reach the peer, and its replies must come back through
the tap: that proves the tc mirroring both ways. Nothing touches the host's own
interfaces; every namespace goes at teardown.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path
from typing import TypeVar

import pytest

from vmpod.errors import NetworkError
from vmpod.network.model import Address, Route, TapLink
from vmpod.network.netns import inspect, netlink_socket, open_netns, run_in_netns
from vmpod.network.rtnl import Rtnl, create_named_netns, named_netns, remove_named_netns
from vmpod.network.tap import open_tap, teardown, wire

T = TypeVar("T")
PREFIX = "vmpodtest-"
VNET_HDR = bytes(10)  # struct virtio_net_hdr, no offload requested
_subnets = itertools.count(1)


@dataclass(frozen=True)
class Pod:
    netns: Path  # the pod's namespace (holds eth0)
    peer_netns: Path  # the other end of eth0, 10.250.N.1
    n: int
    veth_mac: str
    peer_mac: str

    @property
    def ip(self) -> str:
        return f"10.250.{self.n}.2"

    @property
    def gateway(self) -> str:
        return f"10.250.{self.n}.1"


def rtnl_in(path: Path) -> Rtnl:
    fd = open_netns(path)
    try:
        return netlink_socket(fd)
    finally:
        os.close(fd)


def in_netns(path: Path, fn: Callable[[], T]) -> T:
    fd = open_netns(path)
    try:
        return run_in_netns(fd, fn)
    finally:
        os.close(fd)


@pytest.fixture
def make_pod() -> Iterator[Callable[..., Pod]]:
    names: list[str] = []

    def make(mtu: int = 1400) -> Pod:
        tag = uuid.uuid4().hex[:8]
        n = next(_subnets)
        pod_name, peer_name = f"{PREFIX}{tag}-pod", f"{PREFIX}{tag}-peer"
        names.extend([pod_name, peer_name])
        pod, peer = Path(create_named_netns(pod_name)), Path(create_named_netns(peer_name))
        with rtnl_in(pod) as r:
            eth0 = r.add_veth("eth0", "peer0", peer_netns=str(peer))
            r.add_address(eth0, f"10.250.{n}.2", 24)
            r.add_address(eth0, f"fd00:250:{n}::2", 64)
            r.set_link(eth0, mtu=mtu, up=True)
            r.add_route(None, f"10.250.{n}.1")
            r.add_route("10.251.0.0/16", f"10.250.{n}.1")
            veth_mac = _mac(r, "eth0")
        with rtnl_in(peer) as r:
            link = r.link("peer0")
            assert link is not None
            r.add_address(link.index, f"10.250.{n}.1", 24)
            r.set_link(link.index, mtu=mtu, up=True)
            peer_mac = link.mac
        return Pod(pod, peer, n, veth_mac, peer_mac)

    yield make
    for name in names:
        remove_named_netns(name)


def _mac(r: Rtnl, name: str) -> str:
    link = r.link(name)
    assert link is not None
    return link.mac


def host_leftovers() -> set[str]:
    """Our names among the host namespace's links and the named namespaces."""
    links = {name for _, name in socket.if_nameindex() if name.endswith("_vmpod") or "vmpod-probe" in name}
    return links | {n for n in named_netns() if n.startswith(PREFIX)}


# -- frames ------------------------------------------------------------------------------


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def arp_request(src_mac: str, src_ip: str, dst_ip: str) -> bytes:
    src = mac_bytes(src_mac)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src + socket.inet_aton(src_ip)
    arp += bytes(6) + socket.inet_aton(dst_ip)
    return b"\xff" * 6 + src + b"\x08\x06" + arp


def icmp_echo(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, payload: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(icmp),
        1,
        0,
        64,
        1,
        0,
        socket.inet_aton(src_ip),
        socket.inet_aton(dst_ip),
    )
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x08\x00" + ip + icmp


def read_frame(fd: int, match: Callable[[bytes], bool], timeout: float = 5.0) -> bytes:
    """The first frame read from the tap ``fd`` that ``match`` accepts (others, such
    as the peer's IPv6 neighbour discovery, are passed over)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            frame = os.read(fd, 65536)[len(VNET_HDR) :]
            if match(frame):
                return frame
    raise AssertionError("no matching frame came back through the tap")


# -- inspect -----------------------------------------------------------------------------


def test_inspect_reports_what_the_engine_set_up(make_pod: Callable[..., Pod]) -> None:
    pod = make_pod(mtu=1400)
    plan = inspect(pod.netns)
    assert plan.netns == pod.netns
    assert plan.skipped == ()
    [eth0] = plan.interfaces
    assert (eth0.name, eth0.kind, eth0.mac, eth0.mtu) == ("eth0", "veth", pod.veth_mac, 1400)
    # fe80:: is left out: the guest makes its own
    assert set(eth0.addresses) == {
        Address(ip_interface(f"10.250.{pod.n}.2/24")),
        Address(ip_interface(f"fd00:250:{pod.n}::2/64")),
    }
    gw = ip_address(pod.gateway)
    # the prefix routes that the addresses imply (proto kernel) are not replayed
    assert set(plan.routes) == {
        Route(ip_network("0.0.0.0/0"), gw, "eth0"),
        Route(ip_network("10.251.0.0/16"), gw, "eth0"),
    }
    assert str(plan.routes_of("eth0")[0]).endswith("dev eth0")


def test_inspect_skips_a_tap_with_a_warning_and_keeps_addressless_interfaces(
    make_pod: Callable[..., Pod], caplog: pytest.LogCaptureFixture
) -> None:
    pod = make_pod()
    with rtnl_in(pod.netns) as r:
        r.add_veth("eth1", "peer1", peer_netns=str(pod.peer_netns))
    tap_fd = in_netns(pod.netns, lambda: open_tap("othertap"))
    try:
        with caplog.at_level(logging.WARNING, logger="vmpod.network"):
            plan = inspect(pod.netns)
    finally:
        os.close(tap_fd)
    assert [i.name for i in plan.interfaces] == ["eth0", "eth1"]
    assert plan.interfaces[1].addresses == ()
    [skipped] = plan.skipped
    assert skipped.name == "othertap" and "tun/tap" in skipped.reason
    assert "othertap" in caplog.text


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/run/netns/vmpodtest-does-not-exist", "does not exist"),
        ("/proc/self/ns/mnt", "not a network namespace"),
        ("/etc/hostname", "not a network namespace"),
        ("/tmp", "not a network namespace"),
    ],
)
def test_a_path_that_is_not_a_network_namespace_is_refused(path: str, message: str) -> None:
    for call in (inspect, wire):
        with pytest.raises(NetworkError, match=message) as info:
            call(path)
        assert "\n" not in str(info.value) and path in str(info.value)
    assert host_leftovers() == set()


def test_proc_pid_path_works(make_pod: Callable[..., Pod]) -> None:
    """/proc/PID/ns/net is the other form engines pass (here: this very thread's)."""
    pod = make_pod()
    plan = in_netns(pod.netns, lambda: inspect("/proc/thread-self/ns/net"))
    assert [i.name for i in plan.interfaces] == ["eth0"]


# -- wire, traffic, teardown -------------------------------------------------------------


def test_wire_mirrors_veth_and_tap_both_ways_and_teardown_leaves_nothing(
    make_pod: Callable[..., Pod],
) -> None:
    before_fds = set(os.listdir("/proc/self/fd"))
    pod = make_pod(mtu=1400)
    net = wire(pod.netns)
    [w] = net.interfaces
    assert (w.tap, w.mac, w.mtu, w.name) == ("tap0_vmpod", pod.veth_mac, 1400, "eth0")
    assert w.routes == net.plan.routes_of("eth0") and len(w.routes) == 2
    assert net.pass_fds == (w.fd,) and w.netdev("net0") == f"tap,id=net0,fd={w.fd}"
    assert os.get_inheritable(w.fd) is False  # only QEMU gets it, through pass_fds

    with rtnl_in(pod.netns) as r:
        veth, tap = r.link("eth0"), r.link("tap0_vmpod")
        assert veth is not None and tap is not None
        assert (tap.mtu, tap.up) == (1400, True)
        for dev, other in ((veth, tap), (tap, veth)):
            assert "ingress" in {q.kind for q in r.qdiscs(dev.index)}
            filters = r.ingress_filters(dev.index)
            assert {f.kind for f in filters} == {"u32"}
            assert {t for f in filters for t in f.redirect_to} == {other.index}
    # no IPv6 of the tap's own (its router solicitations would reach the guest); eth0 keeps it
    sysctl = "/proc/sys/net/ipv6/conf/{}/disable_ipv6"
    assert in_netns(pod.netns, lambda: Path(sysctl.format("tap0_vmpod")).read_text()) == "1\n"
    assert in_netns(pod.netns, lambda: Path(sysctl.format("eth0")).read_text()) == "0\n"

    # guest -> tap -> eth0 -> peer, and the peer's ARP reply back to the tap
    os.write(w.fd, VNET_HDR + arp_request(pod.veth_mac, pod.ip, pod.gateway))
    reply = read_frame(w.fd, lambda f: f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02")
    assert reply[:6] == mac_bytes(pod.veth_mac) and reply[28:32] == socket.inet_aton(pod.gateway)
    assert reply[22:28] == mac_bytes(pod.peer_mac)
    # and an ICMP echo, answered
    payload = uuid.uuid4().bytes
    os.write(w.fd, VNET_HDR + icmp_echo(pod.veth_mac, pod.peer_mac, pod.ip, pod.gateway, payload))
    echo = read_frame(w.fd, lambda f: f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0)
    assert echo[26:30] == socket.inet_aton(pod.gateway) and echo.endswith(payload)

    net.teardown()
    net.teardown()  # idempotent
    with rtnl_in(pod.netns) as r:
        eth0 = r.link("eth0")
        assert eth0 is not None and (eth0.mac, eth0.mtu) == (pod.veth_mac, 1400)  # the engine's, untouched
        assert "ingress" not in {q.kind for q in r.qdiscs(eth0.index)}
        assert r.ingress_filters(eth0.index) == []
        assert r.link("tap0_vmpod") is None  # the last fd closed: the kernel removed it
    assert inspect(pod.netns).interfaces[0].addresses  # eth0 keeps its addresses
    assert set(os.listdir("/proc/self/fd")) == before_fds  # nothing of ours left open


def test_every_interface_gets_its_tap_even_without_an_address(make_pod: Callable[..., Pod]) -> None:
    pod = make_pod()
    with rtnl_in(pod.netns) as r:
        r.add_veth("eth1", "peer1", peer_netns=str(pod.peer_netns))
    with wire(pod.netns) as net:
        assert [(w.name, w.tap) for w in net.interfaces] == [("eth0", "tap0_vmpod"), ("eth1", "tap1_vmpod")]
        assert net.interfaces[1].addresses == () and net.interfaces[1].routes == ()
        assert len(net.pass_fds) == 2
    with rtnl_in(pod.netns) as r:
        assert {link.name for link in r.links()} == {"lo", "eth0", "eth1"}


def test_taps_outlive_close_fds_while_another_holder_keeps_them(make_pod: Callable[..., Pod]) -> None:
    """What happens once QEMU runs: the runtime closes its copies, the VMM's keep the tap."""
    pod = make_pod()
    net = wire(pod.netns)
    qemu_copy = os.dup(net.interfaces[0].fd)
    net.close_fds()
    net.close_fds()
    assert net.pass_fds == ()
    try:
        with rtnl_in(pod.netns) as r:
            assert r.link("tap0_vmpod") is not None
        # a later process knows only the path and the links (from the state store)
        teardown(pod.netns, [TapLink("eth0", "tap0_vmpod")])
        with rtnl_in(pod.netns) as r:
            tap = r.link("tap0_vmpod")
            assert tap is not None and r.ingress_filters(tap.index) == []
    finally:
        os.close(qemu_copy)
    with rtnl_in(pod.netns) as r:
        assert r.link("tap0_vmpod") is None


def test_teardown_tolerates_a_namespace_the_engine_already_deleted(make_pod: Callable[..., Pod]) -> None:
    pod = make_pod()
    net = wire(pod.netns)
    remove_named_netns(pod.netns.name)
    net.teardown()
    teardown(pod.netns, net.links)
    assert net.pass_fds == ()


def test_a_failed_wire_undoes_itself(make_pod: Callable[..., Pod]) -> None:
    """eth0 already has an ingress qdisc (someone else's tc rules): one clear error,
    and neither the tap nor a qdisc of ours stays behind."""
    pod = make_pod()
    with rtnl_in(pod.netns) as r:
        r.add_veth("eth1", "peer1", peer_netns=str(pod.peer_netns))
        eth1 = r.link("eth1")
        assert eth1 is not None
        r.add_ingress_redirect(eth1.index, eth1.index)
    with pytest.raises(NetworkError, match="cannot mirror eth1 <-> tap1_vmpod") as info:
        wire(pod.netns)
    assert "already has an ingress qdisc" in str(info.value)
    with rtnl_in(pod.netns) as r:
        assert {link.name for link in r.links()} == {"lo", "eth0", "eth1"}
        eth0 = r.link("eth0")
        assert eth0 is not None and "ingress" not in {q.kind for q in r.qdiscs(eth0.index)}


def test_wire_leaves_no_namespace_link_or_thread_behind(make_pod: Callable[..., Pod]) -> None:
    before = host_leftovers()
    threads = threading.active_count()
    pod = make_pod()
    wire(pod.netns).teardown()
    assert threading.active_count() == threads
    assert host_leftovers() - before == {pod.netns.name, pod.peer_netns.name}  # the fixture's only
