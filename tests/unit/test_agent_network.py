"""configure_network: the protocol records (nested messages on the wire), the
guest's validation of every field, and the busybox ``ip`` commands it runs, through
the in-process agent with a fake busybox that records its argv and a fake
/sys/class/net; plus the host client's typed method."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_agent_harness import InProcessAgent, agent_config
from tests.unit.test_client import FakeGuest, req_id
from tests.unit.test_client import run as run_client
from vmpod.agent import protocol as p
from vmpod.agent.client import AgentClient, AgentRequestError

MAC0, MAC1 = "52:54:00:00:00:01", "52:54:00:00:00:02"


class Guest:
    """Fake guest environment: NICs in a fake sysfs, a busybox that logs argv."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.sys = tmp / "sys-class-net"
        self.sysctl = tmp / "proc-sys-net"
        self.log = tmp / "busybox.log"
        self.fail = tmp / "fail"  # a busybox call containing this text fails
        self.busybox = tmp / "busybox"
        self.busybox.write_text(
            f'#!/bin/sh\necho "$*" >> {self.log}\n'
            f"f=$(cat {self.fail} 2>/dev/null)\n"
            'case "$*" in *"$f"*) [ -n "$f" ] && {\n'
            '    echo "ip: RTNETLINK answers: File exists" >&2; exit 2; } ;;\n'
            "esac\n"
            "exit 0\n"
        )
        self.busybox.chmod(0o755)
        self.nic("lo", "00:00:00:00:00:00")

    def nic(self, name: str, mac: str) -> None:
        (self.sys / name).mkdir(parents=True)
        (self.sys / name / "address").write_text(mac + "\n")
        (self.sysctl / "ipv6" / "conf" / name).mkdir(parents=True)
        (self.sysctl / "ipv6" / "conf" / name / "accept_dad").write_text("1\n")

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def dad(self, name: str) -> str:
        return (self.sysctl / "ipv6" / "conf" / name / "accept_dad").read_text().strip()


@pytest.fixture
def guest(tmp_path: Path) -> Guest:
    g = Guest(tmp_path)
    g.nic("eth0", MAC0.upper())  # the kernel writes lower case; compare regardless
    g.nic("eth1", MAC1)
    return g


@pytest.fixture
def agent(tmp_path: Path, guest: Guest) -> Iterator[InProcessAgent]:
    host = InProcessAgent(
        agent_config(
            tmp_path, busybox=str(guest.busybox), net_sys=str(guest.sys), net_sysctl=str(guest.sysctl)
        )
    )
    try:
        yield host
    finally:
        host.close()


def iface(mac: str = MAC0, **over: object) -> dict[str, object]:
    return {"mac": mac, "mtu": 1500, "addresses": ["10.250.0.2/24"], "name": "", **over}


def route(
    dest: str = "0.0.0.0/0", gateway: str = "10.250.0.1", mac: str = MAC0, **over: object
) -> dict[str, object]:
    return {"dest": dest, "gateway": gateway, "mac": mac, **over}


def net(
    *interfaces: dict[str, object], routes: tuple[dict[str, object], ...] = (), **over: object
) -> dict[str, object]:
    return {"interfaces": list(interfaces), "routes": list(routes), **over}


# -- protocol ---------------------------------------------------------------------


def test_nested_messages_round_trip_through_json() -> None:
    msg = p.ConfigureNetwork(
        interfaces=(
            p.NetInterface(mac=MAC0, mtu=1400, addresses=("10.0.0.2/24", "fd00::2/64"), name="eth0"),
        ),
        routes=(p.NetRoute(dest="0.0.0.0/0", mac=MAC0, gateway="10.0.0.1", metric=100),),
        hostname="pod",
    )
    wire = p.parse_json(p.encode_json(p.REQUEST, 1, p.encode(msg))[p.HEADER.size :])
    assert wire["interfaces"] == [
        {"mac": MAC0, "mtu": 1400, "addresses": ["10.0.0.2/24", "fd00::2/64"], "name": "eth0"}
    ]
    assert p.decode(p.ConfigureNetwork, wire) == msg
    assert p.OPS["configure_network"] == (p.ConfigureNetwork, p.NetworkConfigured)


@pytest.mark.parametrize(
    "obj,error",
    [
        ({"interfaces": "eth0"}, "ConfigureNetwork.interfaces: expected a list"),
        ({"interfaces": ["eth0"]}, "ConfigureNetwork.interfaces: expected an object"),
        ({"interfaces": [{"mac": 1}]}, "NetInterface.mac: expected str, got int"),
        ({"interfaces": [{"mac": MAC0, "mtu": "1500"}]}, "NetInterface.mtu: expected int, got str"),
        (
            {"interfaces": [{"mac": MAC0, "addresses": "10.0.0.1/8"}]},
            "NetInterface.addresses: expected a list",
        ),
        ({"interfaces": [{"mac": MAC0, "bridge": "br0"}]}, "NetInterface: unknown fields ['bridge']"),
        ({"interfaces": [{"mtu": 1500}]}, "NetInterface: NetInterface needs field 'mac'"),
        ({"interfaces": [], "routes": [{"dest": "0.0.0.0/0"}]}, "NetRoute: NetRoute needs field 'mac'"),
        (
            {"interfaces": [], "routes": [{"dest": "0.0.0.0/0", "mac": MAC0, "metric": True}]},
            "NetRoute.metric",
        ),
        ({}, "ConfigureNetwork: ConfigureNetwork needs field 'interfaces'"),
    ],
)
def test_malformed_records_are_protocol_violations(obj: dict[str, object], error: str) -> None:
    with pytest.raises(p.ProtocolViolation, match=error.replace("[", r"\[").replace("]", r"\]")):
        p.decode(p.ConfigureNetwork, obj)


# -- the guest: what it runs ----------------------------------------------------------


def test_configure_brings_lo_and_each_nic_up_then_adds_routes(agent: InProcessAgent, guest: Guest) -> None:
    renamed = guest.sysctl / "ipv6" / "conf" / "pod0"  # where the kernel has it after the rename
    renamed.mkdir(parents=True)
    (renamed / "accept_dad").write_text("1\n")
    args = net(
        iface(MAC1, mtu=9000, addresses=["10.251.0.2/16"]),
        iface(MAC0, mtu=1400, addresses=["10.250.0.2/24", "FD00:250:0::2/64"], name="pod0"),
        routes=(
            route("10.250.9.1/32", "", MAC0),
            route("0.0.0.0/0", "10.250.9.1", MAC0, metric=100),
            route("::/0", "fd00:250::1", MAC0),
            route("10.0.0.0/8", "10.251.0.1", MAC1),
        ),
        hostname="pod-1.example",
    )
    assert agent.call("configure_network", args) == p.NetworkConfigured(names=("eth1", "pod0"))
    bb = "ip"
    assert guest.calls() == [
        f"{bb} link set dev lo up",
        f"{bb} link set dev eth1 mtu 9000",
        f"{bb} -4 addr add 10.251.0.2/16 dev eth1",
        f"{bb} link set dev eth1 up",
        f"{bb} link set dev eth0 name pod0",
        f"{bb} link set dev pod0 mtu 1400",
        f"{bb} -4 addr add 10.250.0.2/24 dev pod0",
        f"{bb} -6 addr add fd00:250::2/64 dev pod0",  # canonical form
        f"{bb} link set dev pod0 up",
        f"{bb} -4 route add 10.250.9.1/32 dev pod0",
        f"{bb} -4 route add default via 10.250.9.1 dev pod0 metric 100",
        f"{bb} -6 route add default via fd00:250::1 dev pod0",
        f"{bb} -4 route add 10.0.0.0/8 via 10.251.0.1 dev eth1",
        "hostname pod-1.example",
    ]
    # IPv6 duplicate address detection off where IPv6 addresses go (by the new name)
    assert (guest.dad("pod0"), guest.dad("eth0"), guest.dad("eth1")) == ("0", "1", "1")
    assert agent.refused("configure_network", args) == ("exists", "the network is already configured")


def test_no_interfaces_still_brings_lo_up(agent: InProcessAgent, guest: Guest) -> None:
    assert agent.call("configure_network", net()) == p.NetworkConfigured(names=())
    assert guest.calls() == ["ip link set dev lo up"]


def test_ipv6_dad_is_turned_off_before_the_address_is_added(agent: InProcessAgent, guest: Guest) -> None:
    agent.call("configure_network", net(iface(MAC0, addresses=["fd00::2/64"])))
    assert guest.dad("eth0") == "0"
    assert guest.dad("eth1") == "1"


def test_an_unknown_mac_is_not_found_and_names_what_is_there(agent: InProcessAgent, guest: Guest) -> None:
    kind, error = agent.refused("configure_network", net(iface("52:54:00:00:00:09")))
    assert kind == "not_found"
    assert error == f"no network interface has MAC 52:54:00:00:00:09 (have: eth0 {MAC0}, eth1 {MAC1})"


def test_a_failing_command_names_the_interface_and_the_command(agent: InProcessAgent, guest: Guest) -> None:
    guest.fail.write_text("addr add 10.250.0.2/24")
    kind, error = agent.refused("configure_network", net(iface(MAC0, name="eth9")))
    assert kind == "failed"
    assert error == (
        f"eth9 ({MAC0}): `ip -4 addr add 10.250.0.2/24 dev eth9` failed: ip: RTNETLINK answers: File exists"
    )
    # nothing after the failure ran; the half-done network is not configured twice
    assert guest.calls()[-1] == "ip -4 addr add 10.250.0.2/24 dev eth9"
    guest.fail.write_text("")
    assert agent.refused("configure_network", net(iface(MAC0))) == (
        "exists",
        "the network is already configured",
    )


def test_a_failing_route_names_the_interface(agent: InProcessAgent, guest: Guest) -> None:
    guest.fail.write_text("route add")
    kind, error = agent.refused("configure_network", net(iface(MAC0), routes=(route(),)))
    assert (kind, error) == (
        "failed",
        f"eth0 ({MAC0}): `ip -4 route add default via 10.250.0.1 dev eth0` failed: "
        "ip: RTNETLINK answers: File exists",
    )


# -- the guest: what it refuses (before running anything) ---------------------------------


@pytest.mark.parametrize(
    "args,error",
    [
        (net(iface("52:54:00:00:00")), "invalid MAC address '52:54:00:00:00'"),
        (net(iface("52:54:00:00:00:0g")), "invalid MAC address '52:54:00:00:00:0g'"),
        (net(iface("52-54-00-00-00-01")), "invalid MAC address '52-54-00-00-00-01'"),
        (net(iface("01:00:5e:00:00:01")), "MAC address '01:00:5e:00:00:01' is not a unicast address"),
        (net(iface("00:00:00:00:00:00")), "MAC address '00:00:00:00:00:00' is not a unicast address"),
        (net(iface(MAC0), iface(MAC0.upper())), f"MAC address {MAC0} is given twice"),
        (net(iface(mtu=67)), f"invalid MTU 67 for {MAC0} (68..65535)"),
        (net(iface(mtu=65536)), f"invalid MTU 65536 for {MAC0} (68..65535)"),
        (net(iface(addresses=["10.250.0.2"])), "invalid address '10.250.0.2' (need address/prefix)"),
        (net(iface(addresses=["10.250.0.2/33"])), "invalid address '10.250.0.2/33'"),
        (net(iface(addresses=["fd00::2/129"])), "invalid address 'fd00::2/129'"),
        (net(iface(addresses=["10.250.0.2/-1"])), "invalid address '10.250.0.2/-1' (need address/prefix)"),
        (net(iface(addresses=["10.250.0.2/255.255.255.0"])), "(need address/prefix)"),
        (net(iface(addresses=["10.250.0.256/24"])), "invalid address '10.250.0.256/24'"),
        (net(iface(addresses=["010.250.0.2/24"])), "invalid address '010.250.0.2/24'"),
        (net(iface(addresses=["fe80::1%eth0/64"])), "(need address/prefix)"),
        (net(iface(addresses=["10.250.0.2/0"])), "address '10.250.0.2/0' cannot be an interface's address"),
        (net(iface(addresses=["127.0.0.2/8"])), "cannot be an interface's address"),
        (net(iface(addresses=["224.0.0.1/24"])), "cannot be an interface's address"),
        (net(iface(addresses=["0.0.0.0/8"])), "cannot be an interface's address"),
        (net(iface(addresses=["10.0.0.1/8", "10.0.0.1/16"])), "address 10.0.0.1 is given twice"),
        (net(iface(addresses=["x" * 20])), "(need address/prefix)"),
        (net(iface(name="lo")), "invalid interface name 'lo'"),
        (net(iface(name="-eth0")), "invalid interface name '-eth0'"),
        (net(iface(name="eth 0")), "invalid interface name 'eth 0'"),
        (net(iface(name="eth0/x")), "invalid interface name 'eth0/x'"),
        (net(iface(name="a" * 16)), "invalid interface name"),
        (net(iface(MAC0, name="e"), iface(MAC1, name="e")), "interface name 'e' is given twice"),
        (
            net(iface(addresses=[f"10.0.0.{i}/8" for i in range(1, 18)])),
            f"17 addresses for {MAC0} (at most 16)",
        ),
        (net(*(iface(f"52:54:00:00:00:{i:02x}") for i in range(1, 10))), "9 interfaces (at most 8)"),
        (net(iface(), routes=tuple(route(f"10.{i}.0.0/16") for i in range(65))), "65 routes (at most 64)"),
        (net(iface(), routes=(route("10.0.0.1/8"),)), "invalid route destination '10.0.0.1/8'"),
        (
            net(iface(), routes=(route("default"),)),
            "invalid route destination 'default' (need network/prefix)",
        ),
        (net(iface(), routes=(route("10.0.0.0/40"),)), "invalid route destination '10.0.0.0/40'"),
        (
            net(iface(), routes=(route(gateway="fd00::1"),)),
            "gateway fd00::1 is not IPv4 like route 0.0.0.0/0",
        ),
        (
            net(iface(), routes=(route(gateway="10.0.0.300"),)),
            "invalid gateway '10.0.0.300' for route 0.0.0.0/0",
        ),
        (net(iface(), routes=(route(gateway="0.0.0.0"),)), "invalid gateway '0.0.0.0' for route 0.0.0.0/0"),
        (net(iface(), routes=(route(gateway="10.0.0.1 dev lo"),)), "invalid gateway '10.0.0.1 dev lo'"),
        (net(iface(), routes=(route(mac=MAC1),)), f"route 0.0.0.0/0 leaves by {MAC1}, which is none"),
        (net(iface(), routes=(route(mac="nope"),)), "invalid MAC address 'nope'"),
        (net(iface(), routes=(route(metric=-1),)), "invalid metric -1 for route 0.0.0.0/0"),
        (net(iface(), routes=(route(), route())), "route 0.0.0.0/0 is given twice"),
        (net(iface(), hostname="-pod"), "invalid hostname '-pod'"),
        (net(iface(), hostname="pod..x"), "invalid hostname 'pod..x'"),
        (net(iface(), hostname="pod x"), "invalid hostname 'pod x'"),
        (net(iface(), hostname="a" * 65), "invalid hostname"),
    ],
)
def test_invalid_requests_are_refused_before_anything_runs(
    agent: InProcessAgent, guest: Guest, args: dict[str, object], error: str
) -> None:
    kind, message = agent.refused("configure_network", args)
    assert kind == "invalid"
    assert error in message
    assert guest.calls() == []
    # a refused request does not use up the one configuration
    assert agent.call("configure_network", net(iface())) == p.NetworkConfigured(names=("eth0",))


# -- the host client ---------------------------------------------------------------------


def test_client_configure_network_sends_the_typed_request(tmp_path: Path) -> None:
    msg = p.ConfigureNetwork(
        interfaces=(p.NetInterface(mac=MAC0, addresses=("10.0.0.2/24",)),),
        routes=(p.NetRoute(dest="0.0.0.0/0", mac=MAC0, gateway="10.0.0.1"),),
    )
    seen: list[dict[str, object]] = []

    async def fake(g: FakeGuest) -> None:
        g.hello()
        req = await g.request()
        seen.append(req)
        g.respond(req_id(req), result={"names": ["eth0"]})
        req = await g.request()
        g.respond(req_id(req), ok=False, error="the network is already configured", error_kind="exists")

    async def body(client: AgentClient, sock: Path) -> None:
        assert await client.configure_network(msg) == p.NetworkConfigured(names=("eth0",))
        with pytest.raises(AgentRequestError, match="already configured") as err:
            await client.configure_network(msg)
        assert err.value.kind == "exists"

    run_client(fake, body, tmp_path)
    assert seen[0]["op"] == "configure_network"
    assert seen[0]["args"] == p.encode(msg)
