"""docker's ``-p`` syntax: what parses, what is refused (in one line), and the checks
that run before a port is published."""

from __future__ import annotations

import socket

import pytest

from vmpod.errors import ConfigError
from vmpod.network.ports import PortMapping, check_distinct, host_port_in_use, parse_publish


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("8080:80", PortMapping("0.0.0.0", 8080, 80, "tcp")),
        ("127.0.0.1:8080:80", PortMapping("127.0.0.1", 8080, 80, "tcp")),
        ("127.0.0.1:53:53/udp", PortMapping("127.0.0.1", 53, 53, "udp")),
        (":8080:80/tcp", PortMapping("0.0.0.0", 8080, 80, "tcp")),
        ("65535:1", PortMapping("0.0.0.0", 65535, 1, "tcp")),
    ],
)
def test_parse_publish(spec: str, expected: PortMapping) -> None:
    assert parse_publish(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("80", "name the host port too (-p HOSTPORT:80)"),
        ("127.0.0.1::80", "name the host port"),
        ("70000:80", "host port 70000 is out of range (1-65535)"),
        ("8080:0", "container port 0 is out of range"),
        ("http:80", "host port 'http' is not a port number"),
        ("1.2.3:8080:80", "bad host address '1.2.3'"),
        ("8080:80/sctp", "unknown protocol 'sctp' (tcp or udp)"),
        ("[::1]:8080:80", "IPv4 only"),
        ("8000-8010:80-90", "port ranges are not supported"),
        ("a:b:c:d", "expected [IP:]HOSTPORT:CONTAINERPORT[/PROTO]"),
    ],
)
def test_parse_publish_refuses(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_publish(spec)
    text = str(info.value)
    assert message in text
    assert text.startswith(f"-p {spec}: ")
    assert "\n" not in text


def test_mapping_validates_itself() -> None:
    with pytest.raises(ConfigError, match="out of range"):
        PortMapping("127.0.0.1", 0, 80)
    with pytest.raises(ConfigError, match="IPv6"):
        PortMapping("::1", 8080, 80)


def test_to_cni_and_json_round_trip() -> None:
    local = parse_publish("127.0.0.1:8080:80/udp")
    assert local.to_cni() == {"hostIP": "127.0.0.1", "hostPort": 8080, "containerPort": 80, "protocol": "udp"}
    assert "hostIP" not in parse_publish("8080:80").to_cni()  # every host address
    assert PortMapping.from_json(local.to_json()) == local


def test_overlaps() -> None:
    anyhost = parse_publish("8080:80")
    assert anyhost.overlaps(parse_publish("127.0.0.1:8080:81"))
    assert parse_publish("127.0.0.1:8080:80").overlaps(parse_publish("127.0.0.1:8080:90"))
    assert not parse_publish("127.0.0.1:8080:80").overlaps(parse_publish("127.0.0.2:8080:80"))
    assert not anyhost.overlaps(parse_publish("8080:80/udp"))
    with pytest.raises(ConfigError, match="host port 8080/tcp is published twice"):
        check_distinct([anyhost, parse_publish("127.0.0.1:8080:81")])
    check_distinct([anyhost, parse_publish("8080:80/udp"), parse_publish("8081:80")])


def test_host_port_in_use() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert (
            host_port_in_use(PortMapping("127.0.0.1", port, 80))
            == f"host port 127.0.0.1:{port}/tcp is in use"
        )
        assert host_port_in_use(PortMapping("127.0.0.1", port, 80, "udp")) == ""
    assert host_port_in_use(PortMapping("127.0.0.1", port, 80)) == ""
    # an address of the tests' throw-away range, held by no interface (bind(2) sends nothing)
    assert "not an address of this host" in host_port_in_use(PortMapping("10.251.255.254", port, 80))
