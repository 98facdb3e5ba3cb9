"""Networking of vmpod-runtime containers under podman 4.3 (CNI), with real traffic.

Each test gets a podman network of its own (``podman network create``, a /24 in
10.252.0.0/16) and talks only to addresses on this machine: loopback (ports
published with ``-p 127.0.0.1:PORT:8080``) and that network's bridge. The servers
are busybox ``httpd`` in VMs; the host side is urllib.

After every test (the ``net`` fixture) nothing may be left: containers, QEMU,
virtiofsd, sandbox state (conftest ``leftovers``), network namespaces made during
the test (``ip netns list``), iptables rules mentioning the network's subnet
(``iptables-save``), CNI leases in its host-local directory, taps on the host.

The podman store is private and module-scoped (as in test_podman.py). Podman's CNI
network configs are global (/etc/cni/net.d): the networks get unique names and are
removed at the end of their test.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.vm.conftest import leftovers
from tests.vm.test_podman import IMAGE, ULIMITS, Podman, private_podman
from tests.vm.test_runtime_support import monitor_pids
from vmpod.guest.assets import GuestAssets
from vmpod.paths import Paths
from vmpod.proc import descendant_named

CNI_LEASES = Path("/var/lib/cni/networks")
DNSNAME_PLUGIN = Path("/usr/lib/cni/dnsname")
BIG_MB = 50
HTTPD = ["httpd", "-f", "-p", "8080", "-h", "/www"]
SETTLE = 15  # seconds teardown waits for what podman/conmon clean up asynchronously


class NetPodman(Podman):
    def __init__(self, base: list[str], rt_root: Path) -> None:
        super().__init__(base)
        self.rt_root = rt_root

    def ok(self, *args: str, timeout: float = 180) -> str:
        res = self(*args, timeout=timeout)
        assert res.returncode == 0, f"podman {' '.join(args)}: {res.returncode} {res.stderr}"
        return res.stdout


@pytest.fixture(scope="module")
def podman(
    paths: Paths, assets: GuestAssets, busybox: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NetPodman]:
    if shutil.which("iptables-save") is None:
        pytest.skip("iptables-save not installed (the teardown checks need it)")
    with private_podman(paths, busybox, tmp_path_factory.mktemp("podman-net")) as (base, rt_root):
        yield NetPodman(base, rt_root)


# -- the test's own network and the checks after it ---------------------------------------


@dataclass(frozen=True)
class Net:
    name: str
    third: int  # subnet 10.252.<third>.0/24

    @property
    def subnet(self) -> str:
        return f"10.252.{self.third}.0/24"

    @property
    def prefix(self) -> str:
        """What every address of the subnet starts with, as iptables-save prints it."""
        return f"10.252.{self.third}."

    @property
    def gateway(self) -> str:
        return f"10.252.{self.third}.1"


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def host_taps() -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return [line.split(":")[1].strip() for line in out.splitlines() if "_vmpod" in line]


def iptables_rules(prefix: str) -> list[str]:
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if prefix in line]


def cni_leases(name: str) -> list[str]:
    d = CNI_LEASES / name
    if not d.is_dir():
        return []
    return sorted(
        p.name for p in d.iterdir() if not p.name.startswith("last_reserved_ip") and p.name != "lock"
    )


def network_leftovers(net: Net, netns_before: set[str]) -> list[str]:
    found = []
    if stale := sorted(netns_names() - netns_before):
        found.append(f"network namespaces left: {stale}")
    if rules := iptables_rules(net.prefix):
        found.append(f"iptables rules for {net.subnet} left: {rules}")
    if leases := cni_leases(net.name):
        found.append(f"CNI leases left in {CNI_LEASES / net.name}: {leases}")
    if taps := host_taps():
        found.append(f"taps on the host: {taps}")
    return found


def _settled(find: Callable[[], list[str]], timeout: float = SETTLE) -> list[str]:
    """``find()`` once it is empty, or what it still finds after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (found := find()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def _create_network(podman: NetPodman) -> Net:
    """A network with a /24 of 10.252.0.0/16 no other network (or route) uses."""
    start = os.getpid() % 250
    errors = []
    for i in range(25):
        net = Net(f"vmpodnet-{os.getpid()}-{i}", 2 + (start + i) % 250)
        res = podman("network", "create", "--subnet", net.subnet, net.name)
        if res.returncode == 0:
            return net
        errors.append(res.stderr.strip())
    raise AssertionError(f"no free subnet in 10.252.0.0/16: {errors[-3:]}")


@pytest.fixture
def net(podman: NetPodman, paths: Paths) -> Iterator[Net]:
    netns_before = netns_names()
    net = _create_network(podman)
    try:
        yield net
    finally:
        problems = []
        if left := podman("ps", "-a", "--format", "{{.Names}}").stdout.split():
            problems.append(f"containers left by the test: {left}")
            podman("rm", "--all", "--force", "--time", "0")
        problems += _settled(lambda: network_leftovers(net, netns_before))
        res = podman("network", "rm", "--force", net.name)
        if res.returncode != 0:
            problems.append(f"podman network rm {net.name}: {res.stderr.strip()}")
        shutil.rmtree(CNI_LEASES / net.name, ignore_errors=True)
        problems += _settled(lambda: [str(p) for p in monitor_pids(podman.rt_root)])
        problems += _settled(lambda: leftovers(paths))
        if podman.rt_root.exists() and (state := sorted(p.name for p in podman.rt_root.iterdir())):
            problems.append(f"runtime state left: {state}")
        assert problems == [], "; ".join(problems)


# -- helpers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 30) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        data: bytes = resp.read()
        return data


def wait_http(url: str, timeout: float = 120) -> bytes:
    """The body of ``url`` once it answers (the server's VM is booting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http_get(url, timeout=5)
        except (OSError, urllib.error.URLError) as err:
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer in {timeout} s: {err}") from err
            time.sleep(0.3)


def sha256_of_url(url: str) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with urllib.request.urlopen(url, timeout=60) as resp:
        while chunk := resp.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def make_www(where: Path, big_mb: int) -> tuple[Path, str]:
    """A directory with index.html and ``big`` (random, ``big_mb`` MB); the big
    file's sha256."""
    where.mkdir()
    (where / "index.html").write_text(f"vmpod says hello from {where.name}\n")
    h = hashlib.sha256()
    with open(where / "big", "wb") as f:
        for _ in range(big_mb):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    return where, h.hexdigest()


def container_ip(podman: NetPodman, name: str, net: Net) -> str:
    ip = podman.ok(
        "inspect", "--format", f'{{{{(index .NetworkSettings.Networks "{net.name}").IPAddress}}}}', name
    )
    ip = ip.strip()
    assert ip.startswith(net.prefix), (ip, net.subnet)
    return ip


def qemu_of(podman: NetPodman, name: str) -> int:
    """The QEMU of a running container: below its runtime monitor (State.Pid)."""
    monitor = int(podman.ok("inspect", "--format", "{{.State.Pid}}", name))
    qemu = descendant_named(monitor, "qemu-system")  # jailed: below bwrap
    if qemu is None:
        raise AssertionError(f"no QEMU below monitor {monitor}")
    return qemu


def wait_exited(podman: NetPodman, name: str, timeout: float = 60) -> list[str]:
    """[status, exit code] of ``name`` once it has exited (or at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        state = podman.ok("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name).split()
        if state[0] == "exited" or time.monotonic() > deadline:
            return state
        time.sleep(0.3)


def serve(podman: NetPodman, name: str, net: Net, www: Path, *extra: str) -> None:
    podman.ok(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        net.name,
        "-v",
        f"{www}:/www:ro",
        *extra,
        *ULIMITS,
        IMAGE,
        *HTTPD,
    )


# -- tests ----------------------------------------------------------------------------------


def test_published_port_serves_a_volume(podman: NetPodman, net: Net, tmp_path: Path) -> None:
    """Host -> 127.0.0.1:PORT -> portmap DNAT -> veth -> tc -> tap -> the VM's httpd,
    serving files from a read-only volume; 50 MB checked by sha256."""
    www, digest = make_www(tmp_path / "www", BIG_MB)
    port = free_port()
    serve(podman, "web", net, www, "-p", f"127.0.0.1:{port}:8080")
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_http(f"{base}/index.html") == b"vmpod says hello from www\n"
        start = time.monotonic()
        assert sha256_of_url(f"{base}/big") == (BIG_MB << 20, digest)
        elapsed = time.monotonic() - start
        print(f"{BIG_MB} MB through the published port in {elapsed:.2f} s ({BIG_MB / elapsed:.1f} MB/s)")
        with pytest.raises(urllib.error.HTTPError) as err:
            http_get(f"{base}/missing")
        assert err.value.code == 404
        # the guest has the address podman's IPAM gave the veth, and its default route
        ip = container_ip(podman, "web", net)
        addrs = podman.ok("exec", "web", "ip", "-o", "-4", "addr", "show", "eth0")
        assert f"inet {ip}/24" in addrs, addrs
        routes = podman.ok("exec", "web", "ip", "route")
        assert f"default via {net.gateway} dev eth0" in routes, routes
        # what the teardown checks look for is there while the container runs
        assert cni_leases(net.name) == [ip]
        assert any("DNAT" in rule and f"{ip}:8080" in rule for rule in iptables_rules(net.prefix))
    finally:
        podman("rm", "--force", "--time", "0", "web")


def test_container_reaches_a_peer_by_ip_and_hosts_entry(podman: NetPodman, net: Net, tmp_path: Path) -> None:
    """Container -> container on the same network (guest NIC -> tap -> veth -> bridge
    -> veth -> tap -> guest NIC), by IP and by a name from /etc/hosts."""
    www, digest = make_www(tmp_path / "peerwww", 4)
    serve(podman, "srv", net, www)
    try:
        ip = container_ip(podman, "srv", net)
        # the host is on the bridge: readiness from here
        assert wait_http(f"http://{ip}:8080/index.html") == b"vmpod says hello from peerwww\n"
        hosts = podman.ok("exec", "srv", "cat", "/etc/hosts")
        assert any(line.split()[:1] == [ip] and "srv" in line.split() for line in hosts.splitlines()), hosts
        script = (
            f"wget -q -O - http://{ip}:8080/index.html && "
            "wget -q -O - http://peer:8080/big | sha256sum && "
            "ip -o -4 addr show eth0 && ip route"
        )
        res = podman(
            "run",
            "--rm",
            "--network",
            net.name,
            "--add-host",
            f"peer:{ip}",
            *ULIMITS,
            IMAGE,
            "sh",
            "-c",
            script,
        )
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[0] == "vmpod says hello from peerwww", res.stdout
        assert lines[1].split()[0] == digest, res.stdout
        own = re.search(r"inet (\S+)/24", lines[2])
        assert own and own.group(1).startswith(net.prefix) and own.group(1) != ip, res.stdout
        assert f"default via {net.gateway} dev eth0" in res.stdout
    finally:
        podman("rm", "--force", "--time", "0", "srv")


@pytest.mark.skipif(
    not DNSNAME_PLUGIN.exists(),
    reason=f"podman's dnsname CNI plugin is not installed ({DNSNAME_PLUGIN}): no name service on the "
    "network (names from /etc/hosts are tested by test_container_reaches_a_peer_by_ip_and_hosts_entry)",
)
def test_container_reaches_a_peer_by_name(podman: NetPodman, net: Net, tmp_path: Path) -> None:
    www, _ = make_www(tmp_path / "dnswww", 1)
    serve(podman, "named-srv", net, www)
    try:
        ip = container_ip(podman, "named-srv", net)
        wait_http(f"http://{ip}:8080/index.html")
        res = podman(
            "run",
            "--rm",
            "--network",
            net.name,
            *ULIMITS,
            IMAGE,
            "wget",
            "-q",
            "-O",
            "-",
            "http://named-srv:8080/index.html",
        )
        assert (res.returncode, res.stdout) == (0, "vmpod says hello from dnswww\n"), res.stderr
    finally:
        podman("rm", "--force", "--time", "0", "named-srv")


def test_network_none_has_loopback_only(podman: NetPodman, net: Net) -> None:
    script = (
        "ip -o link; (echo over-lo | nc -l -p 9000 127.0.0.1 &); "
        "for i in 1 2 3 4 5 6 7 8 9 10; do nc 127.0.0.1 9000 </dev/null && break; sleep 0.2; done"
    )
    res = podman("run", "--rm", "--network", "none", *ULIMITS, IMAGE, "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    links = [line for line in lines if re.match(r"\d+: ", line)]
    assert len(links) == 1 and links[0].startswith("1: lo: "), res.stdout
    assert ",UP" in links[0], f"lo is not up: {links[0]}"
    assert "over-lo" in lines, res.stdout


def test_network_host_is_refused(podman: NetPodman, net: Net) -> None:
    res = podman("run", "--rm", "--network", "host", *ULIMITS, IMAGE, "true")
    assert res.returncode != 0
    assert "cannot share the host's" in res.stderr, res.stderr


def test_qemu_killed_while_serving(podman: NetPodman, net: Net, tmp_path: Path) -> None:
    """kill -9 of the VM in the middle of a download: the container ends (137), the
    client is not left hanging forever, `podman rm` works, and the network is clean
    (the fixture checks)."""
    www, _ = make_www(tmp_path / "killwww", BIG_MB)
    port = free_port()
    serve(podman, "victim", net, www, "-p", f"127.0.0.1:{port}:8080")
    try:
        wait_http(f"http://127.0.0.1:{port}/index.html")
        got = 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/big", timeout=5) as resp:
            got += len(resp.read(1 << 20))
            os.kill(qemu_of(podman, "victim"), signal.SIGKILL)
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                while chunk := resp.read(1 << 20):
                    got += len(chunk)
        assert 0 < got < BIG_MB << 20
        state = wait_exited(podman, "victim")
        assert state == ["exited", "137"]
        podman.ok("rm", "victim")
    finally:
        podman("rm", "--force", "--time", "0", "victim")
