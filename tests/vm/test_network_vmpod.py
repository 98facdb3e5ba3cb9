"""`vmpod run --network bridge|none -p`: the VM on vmpod's CNI bridge network, real
plugins and real traffic on loopback only; nothing left behind (netns, leases,
iptables rules, attachments)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.conftest import VmFactory, VmpodRunner, netns_prefix
from vmpod.network import cni


def _subnet(runner: VmpodRunner) -> str:
    """The test's own /24 (other vmpods may run meanwhile): "10.253.N." """
    n = int(hashlib.sha256(str(runner.paths.run).encode()).hexdigest()[:4], 16) % 250 + 1
    return f"10.253.{n}."


def _netns(prefix: str) -> set[str]:
    """This test's network namespaces (others' vmpods may run meanwhile)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith(prefix)}


def _rules(subnet: str) -> list[str]:
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if subnet in line and "-A" in line]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def vmpod(vm_factory: VmFactory) -> Iterator[VmpodRunner]:
    runner = vm_factory()
    prefix, subnet = netns_prefix(runner.paths), _subnet(runner)
    # the test's own vmpod network: its subnet and bridge tell its rules apart
    bridge = prefix.rstrip("-")[:15]
    network = cni.BridgeNetwork(
        data_dir=runner.paths.run / "cni" / "ipam",
        bridge=bridge,
        subnet=ipaddress.IPv4Network(subnet + "0/24"),
    )
    conf = runner.paths.home / "net.d"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / cni.CONF_NAME).write_text(json.dumps(network.conflist()))
    try:
        yield runner
        assert _netns(prefix) == set(), "network namespaces left behind"
        assert _rules(subnet) == [], "iptables rules left behind"
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def _get(url: str, timeout: float = 60) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                data: bytes = resp.read()
                return data
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_bridge_by_default_with_an_address_and_a_route(vmpod: VmpodRunner, busybox: Path) -> None:
    r = vmpod.run("--rootfs", str(busybox), "--", "sh", "-c", "ip -4 -o addr show eth0; ip route")
    assert r.returncode == 0, r.err
    assert f"inet {_subnet(vmpod)}" in r.out and f"default via {_subnet(vmpod)}1" in r.out, r.out


def test_published_port_serves_the_host(vmpod: VmpodRunner, busybox: Path, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello through the VM\n")
    big = bytes(range(256)) * (20 * 4096)  # 20 MiB
    (www / "big").write_bytes(big)
    port = _free_port()
    r = vmpod.run(
        "-d",
        "--name",
        "web",
        *("-p", f"127.0.0.1:{port}:8080", "-v", f"{www}:/www:ro"),
        *("--rootfs", str(busybox), "--", "httpd", "-f", "-p", "8080", "-h", "/www"),
    )
    assert r.returncode == 0, r.err
    try:
        assert _get(f"http://127.0.0.1:{port}/index.html") == b"hello through the VM\n"
        got = _get(f"http://127.0.0.1:{port}/big")
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(big).hexdigest()
        # the port is taken while the container exists: a second one is refused clearly
        r = vmpod.run("-p", f"127.0.0.1:{port}:80", "--rootfs", str(busybox), "--", "true")
        assert r.returncode != 0 and f"{port}" in r.err, r.err
    finally:
        assert vmpod("rm", "-f", "web").returncode == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)


def test_none_has_loopback_only_and_host_is_refused(vmpod: VmpodRunner, busybox: Path) -> None:
    r = vmpod.run("--network", "none", "--rootfs", str(busybox), "--", "ip", "-o", "link")
    assert r.returncode == 0, r.err
    links = [line.split(":")[1].strip() for line in r.out.splitlines()]
    assert links == ["lo"] and "UP" in r.out
    r = vmpod.run("--network", "host", "--rootfs", str(busybox), "--", "true")
    assert r.returncode == 125 and "cannot share the host's" in r.err
    r = vmpod.run("--network", "none", "-p", "8080:80", "--rootfs", str(busybox), "--", "true")
    assert r.returncode == 125 and "-p needs a network" in r.err
    r = vmpod.run("-p", "99999:80", "--rootfs", str(busybox), "--", "true")
    assert r.returncode == 125 and "99999" in r.err


def test_a_killed_vmpod_leaves_an_attachment_the_next_run_collects(vmpod: VmpodRunner, busybox: Path) -> None:
    proc = vmpod.popen(
        "run",
        "--rootfs",
        str(busybox),
        "--",
        "sh",
        "-c",
        "echo up; sleep 600",
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    proc.kill()  # SIGKILL: no detach ran
    proc.wait()
    assert list((vmpod.paths.run / "cni").glob("*.json")), "the attachment should still be recorded"
    r = vmpod.run("--network", "bridge", "--rootfs", str(busybox), "--", "true")
    assert r.returncode == 0, r.err
    assert not list((vmpod.paths.run / "cni").glob("*.json"))


def test_vmpod_pod_is_one_vm_with_published_ports(vmpod: VmpodRunner, busybox: Path) -> None:
    port = _free_port()
    r = vmpod("pod", "create", "-p", f"127.0.0.1:{port}:8080", "shop")
    assert r.returncode == 0, r.err
    try:
        script = "cat /proc/sys/kernel/random/boot_id > /tmp/i; httpd -f -p 8080 -h /tmp"
        r = vmpod.run(
            "-d", "--pod", "shop", "--name", "srv", "--rootfs", str(busybox), "--", "sh", "-c", script
        )
        assert r.returncode == 0, r.err
        served = _get(f"http://127.0.0.1:{port}/i").decode().strip()
        r = vmpod.run(
            *("--pod", "shop", "--rootfs", str(busybox), "--"),
            *("sh", "-c", "cat /proc/sys/kernel/random/boot_id; wget -q -O- 127.0.0.1:8080/i"),
        )
        assert r.returncode == 0, r.err
        assert r.out.split() == [served, served], "one VM: one boot id, localhost shared"
        r = vmpod("pod", "ls", "--format", "json")
        [pod] = json.loads(r.out)
        assert pod["name"] == "shop" and pod["status"] == "running" and "srv" in pod["containers"]
        r = vmpod.run("--pod", "shop", "-p", "9:9", "--rootfs", str(busybox), "--", "true")
        assert r.returncode == 125 and "publish ports on the pod" in r.err
        r = vmpod("pod", "rm", "shop")
        assert r.returncode == 125 and "srv" in r.err and "-f" in r.err
    finally:
        assert vmpod("pod", "rm", "-f", "shop").returncode == 0
    assert vmpod("ps", "-aq").out == ""
    r = vmpod.run("--pod", "shop", "--rootfs", str(busybox), "--", "true")
    assert r.returncode == 125 and "no such pod" in r.err


def test_a_failed_start_leaves_no_network_behind(vmpod: VmpodRunner, busybox: Path) -> None:
    # attached first, then the boot fails: the attachment goes (the fixture counts
    # namespaces and rules; leftovers() the records and leases)
    r = vmpod.run(
        "--boot-timeout", "0.2", "-p", f"127.0.0.1:{_free_port()}:80", "--rootfs", str(busybox), "--", "true"
    )
    assert r.returncode != 0 and "did not answer" in r.err, r.err
    assert not list((vmpod.paths.run / "cni").glob("*.json"))
