"""`vmpod doctor`'s networking checks: the real probes on this host (root, a kernel
with tun/ingress/u32/mirred), and the CNI and firewall checks on made-up trees."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from vmpod.network import doctor
from vmpod.network.rtnl import named_netns


def _probe_links() -> set[str]:
    """Host links named like the probe's devices (other tests may add other links meanwhile)."""
    return {n for _, n in socket.if_nameindex() if "vmpod-probe" in n or n.endswith("_vmpod")}


def test_probes_pass_here_and_leave_nothing_behind() -> None:
    namespaces, threads = set(named_netns()), threading.active_count()
    fds = set(os.listdir("/proc/self/fd"))
    checks = {c.name: c for c in doctor.host_checks()}
    assert list(checks) == ["tun", "tc mirroring", "CNI plugins", "firewall tool"]
    assert checks["tun"].ok, checks["tun"].detail
    assert checks["tc mirroring"].ok, checks["tc mirroring"].detail
    assert not any(c.required for c in checks.values())
    # the probe's namespace was anonymous (gone with its thread and socket), its
    # devices were made there and not on the host
    assert _probe_links() == set() and threading.active_count() == threads
    assert not {n for n in set(named_netns()) - namespaces if "probe" in n}
    assert set(os.listdir("/proc/self/fd")) == fds


def _plugins(where: Path, names: tuple[str, ...]) -> None:
    where.mkdir(parents=True)
    for name in names:
        (where / name).write_text("#!/bin/sh\n")
        (where / name).chmod(0o755)


def test_cni_check_names_the_missing_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib, opt = tmp_path / "lib", tmp_path / "opt"
    monkeypatch.setattr(doctor, "CNI_DIRS", (lib, opt))
    check = doctor._cni_check()
    assert not check.ok and "containernetworking-plugins" in check.detail

    _plugins(lib, ("bridge", "loopback"))
    _plugins(opt, doctor.CNI_PLUGINS[:-1])  # all but "tuning": the fuller one is reported
    check = doctor._cni_check()
    assert not check.ok and check.detail == f"{opt} lacks tuning"

    (opt / "tuning").write_text("")
    (opt / "tuning").chmod(0o755)
    check = doctor._cni_check()
    assert check.ok and str(opt) in check.detail


def test_firewall_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(doctor, "_SBIN", ())
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not doctor._firewall_check().ok
    (tmp_path / "nft").write_text("#!/bin/sh\n")
    (tmp_path / "nft").chmod(0o755)
    check = doctor._firewall_check()
    assert check.ok and check.detail == str(tmp_path / "nft")
