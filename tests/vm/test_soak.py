"""The soak of issue 11 in CI: bench/soak.py's cycles, 20 of them, two at a time,
through the real vmpod-runtime; every resource it measures must leak nothing."""

from __future__ import annotations

from pathlib import Path

from bench.soak import SoakEnv, soak

from tests.vm.conftest import VmFactory

CYCLES = 20


def test_twenty_cycles_leak_nothing(vm_factory: VmFactory, busybox: Path, tmp_path: Path) -> None:
    paths = vm_factory.paths
    env = SoakEnv(home=paths.home, run=paths.run, work=tmp_path, rootfs=busybox)
    report = soak(env, cycles=CYCLES, parallel=2, progress=lambda _m: None)
    print(report.text())  # shown with -s, and in the report when it fails
    assert report.clean, report.text()
