"""`vmpod run --network/-p` parsing and the ownership of attachments."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmpod.containers import network as net
from vmpod.errors import ConfigError
from vmpod.network.ports import PortMapping
from vmpod.paths import Paths


def test_modes_and_ports() -> None:
    assert net.parse_network("none", ()) == ("none", ())
    mode, ports = net.parse_network("bridge", ("127.0.0.1:8080:80", "53:53/udp"))
    assert mode == "bridge"
    assert ports == (PortMapping("127.0.0.1", 8080, 80, "tcp"), PortMapping("0.0.0.0", 53, 53, "udp"))


@pytest.mark.parametrize(
    ("mode", "publish", "message"),
    [
        ("host", (), "cannot share the host's"),
        ("overlay", (), "unknown network"),
        ("none", ("8080:80",), "-p needs a network"),
        ("bridge", ("8080:80", "8080:81"), "8080"),
        ("bridge", ("70000:80",), "70000"),
    ],
)
def test_bad_input_is_one_line(mode: str, publish: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        net.parse_network(mode, publish)
    assert "\n" not in str(err.value)


def test_ownership_keeps_an_attachment_from_collection(tmp_path: Path) -> None:
    paths = Paths(home=tmp_path / "home", run=tmp_path / "run")
    assert not net._in_use(paths, "abc")
    with net.owned(paths, "abc"):
        assert net._in_use(paths, "abc")
    assert not net._in_use(paths, "abc")
    (paths.home / "containers" / "abc").mkdir(parents=True)  # a kept container's record
    assert net._in_use(paths, "abc")
    assert net.netns_path("abc") == "/run/netns/vmpod-abc"
