"""Fixtures for tests that boot real VMs (QEMU; TCG on hosts without usable KVM).

Guest assets live in the normal cache (built once, reused across runs); each test
session gets its own runtime dir so leftovers are attributable. Every test that
uses ``vmpod`` is checked afterwards for stray QEMU processes, sandbox dirs,
mounts and temp dirs.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmpod.guest.assets import GuestAssets, ensure_assets
from vmpod.paths import Paths, default_paths

REPO = Path(__file__).resolve().parents[2]
VMPOD = [sys.executable, "-m", "vmpod.cli"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session", autouse=True)
def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("VM tests need root (guest asset builds use mknod/chroot); "
                    "run ./scripts/test.sh with sudo")


@pytest.fixture(scope="session")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    return Paths(home=default_paths().home, run=tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def assets(paths: Paths) -> GuestAssets:
    return ensure_assets(paths)


@pytest.fixture(scope="session")
def busybox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("busybox") / "rootfs"
    subprocess.run([str(REPO / "scripts/busybox-rootfs.sh"), str(root)], check=True)
    return root


def pids_where(match: Callable[[list[str]], bool]) -> list[int]:
    """Pids of other processes whose argv satisfies ``match``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if match(argv):
            pids.append(int(d.name))
    return pids


def qemu_pids(marker: str) -> list[int]:
    """QEMU processes whose command line mentions ``marker`` (our run dir)."""
    return pids_where(lambda argv: "qemu-system" in " ".join(argv) and marker in " ".join(argv))


def mounts_under(*roots: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [line for line in text.splitlines() if any(f" {r}" in line for r in roots)]


def assert_nothing_left(paths: Paths) -> None:
    assert qemu_pids(str(paths.run)) == [], "stray QEMU process"
    leftovers = list(paths.sandboxes.iterdir()) if paths.sandboxes.exists() else []
    assert leftovers == [], f"sandbox state left behind: {leftovers}"
    assert mounts_under(paths.run, paths.home) == []
    tmp = list(paths.tmp.iterdir()) if paths.tmp.exists() else []
    assert tmp == [], f"temp dirs left behind: {tmp}"


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode()

    @property
    def err(self) -> str:
        return self.stderr.decode()


@pytest.fixture
def vmpod(paths: Paths, assets: GuestAssets) -> Iterator[VmpodRunner]:
    runner = VmpodRunner(paths)
    yield runner
    assert_nothing_left(paths)


class VmpodRunner:
    """Runs the real `vmpod` CLI in a subprocess against the session's dirs."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.env = {**os.environ, "VMPOD_HOME": str(paths.home), "VMPOD_RUN": str(paths.run)}

    def __call__(self, *args: str, input: bytes | None = None, timeout: float = 180,
                 env: dict[str, str] | None = None) -> Result:
        proc = subprocess.run([*VMPOD, *args], input=input, capture_output=True,
                              timeout=timeout, env={**self.env, **(env or {})},
                              stdin=None if input is not None else subprocess.DEVNULL)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def popen(self, *args: str, **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*VMPOD, *args], env=self.env, **kw)  # type: ignore[call-overload]
