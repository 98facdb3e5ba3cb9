"""podman 4.3 checkpoints a vmpod-runtime container (CRIU in its VM) and restores
it into a new VM: ``podman container checkpoint --export`` writes a standard
archive, ``podman container restore --import`` brings the process tree back.

One container is shared by every step (each VM boot and CRIU run is slow under
TCG). It counts only in its shell's memory and appends each count to a file it
keeps open. podman takes the rootfs diff after the runtime's dump, so with
--leave-running the file can hold counts the dumped memory had not reached yet
(runc under podman has the same race); the offsets are checked on the archive of
a checkpoint that stopped the container. ``vmpod forensics capture`` pauses the
container across diff and dump: its archive agrees with itself either way.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.vm.conftest import qemu_below
from tests.vm.test_podman import IMAGE, ULIMITS, Podman, private_podman
from tests.vm.test_runtime_support import BINARY, runtime_env
from vmpod.forensics.archive import verify
from vmpod.guest.assets import GuestAssets
from vmpod.paths import Paths

# the count lives only in the shell's memory; fd 3 stays open (O_APPEND) all along
COUNTER = "i=0; exec 3>>/data.log; while true; do i=$((i+1)); echo $i >&3; echo n=$i; sleep 0.3; done"


@pytest.fixture(scope="module")
def podman(
    paths: Paths, assets: GuestAssets, busybox: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RuntimePodman]:
    with private_podman(paths, busybox, tmp_path_factory.mktemp("podman-cr")) as (base, rt_root):
        log_argv(Path(base[base.index("--runtime") + 1]))
        yield RuntimePodman(base, rt_root)


class RuntimePodman(Podman):
    def __init__(self, base: list[str], rt_root: Path) -> None:
        super().__init__(base)
        self.rt_root = rt_root  # vmpod-runtime's --root under this podman


def log_argv(wrapper: Path) -> None:
    """The wrapper also notes each argv podman and conmon give the runtime."""
    first, rest = wrapper.read_text().split("\n", 1)
    note = f'printf "%s\\n" "$*" >> {wrapper}.argv\n'
    wrapper.write_text(f"{first}\n{note}{rest}")


def calls(podman: Podman, command: str) -> list[list[str]]:
    """The argv (after the wrapper's own) of each ``command`` the runtime was given."""
    wrapper = Path(podman.base[podman.base.index("--runtime") + 1])
    lines = Path(f"{wrapper}.argv").read_text().splitlines()
    return [words for words in (line.split() for line in lines) if words and words[0] == command]


def _wait(pred: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def _counts(podman: Podman, name: str) -> list[int]:
    r = podman("logs", name)
    assert r.returncode == 0, r.stderr
    return [int(line[2:]) for line in r.stdout.splitlines() if line.startswith("n=")]


def _state(podman: Podman, name: str) -> str:
    return podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()


def _qemu(podman: Podman, name: str) -> int:
    monitor = int(podman("inspect", "--format", "{{.State.Pid}}", name).stdout)
    found = qemu_below(monitor)
    assert found, f"no QEMU below the monitor {monitor} of {name}"
    return found[0]


def _runtime(podman: RuntimePodman, *args: str) -> str:
    """vmpod-runtime itself, on the state podman's containers live in."""
    wrapper = podman.base[podman.base.index("--runtime") + 1]
    r = subprocess.run([wrapper, "--root", str(podman.rt_root), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        out = {}
        for info in tar:
            fh = tar.extractfile(info) if info.isreg() else None
            out[info.name.removeprefix("./")] = fh.read() if fh is not None else b""
        return out


def _data_log(members: dict[str, bytes]) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(members["rootfs-diff.tar"])) as diff:
        fh = diff.extractfile("data.log")
        assert fh is not None
        return fh.read().decode().split()


def test_checkpoint_export_and_restore_import(
    podman: RuntimePodman, paths: Paths, tmp_path: Path, busybox: Path
) -> None:
    r = podman("run", "-d", "--name", "counter", *ULIMITS, IMAGE, "sh", "-c", COUNTER)
    assert r.returncode == 0, r.stderr
    first_qemu = _qemu(podman, "counter")
    _wait(lambda: len(_counts(podman, "counter")) >= 3)

    # 1. --leave-running: a standard archive, and the original goes on counting
    live = tmp_path / "live.tar"
    t0 = time.monotonic()
    r = podman(
        "container",
        "checkpoint",
        "--leave-running",
        "--compress",
        "none",
        "--export",
        str(live),
        "counter",
        timeout=900,
    )
    print(f"podman checkpoint --leave-running --export: {time.monotonic() - t0:.1f}s")
    assert r.returncode == 0, r.stderr
    members = _members(live)
    for want in ("checkpoint/inventory.img", "config.dump", "spec.dump", "rootfs-diff.tar", "stats-dump"):
        assert want in members, sorted(members)
    assert any(n.startswith("checkpoint/pages-") for n in members)
    lines = _data_log(members)
    assert lines and lines == [str(i) for i in range(1, len(lines) + 1)]
    assert b"counter" in members["config.dump"] and b"/data.log" in members["spec.dump"]
    assert _state(podman, "counter") == "running"
    assert _qemu(podman, "counter") == first_qemu
    cid = podman("inspect", "--format", "{{.Id}}", "counter").stdout.strip()
    userdata = podman("inspect", "--format", "{{.StaticDir}}", "counter").stdout.strip()
    # what podman 4.3 passes (no global flags to a runtime not named runc/crun)
    assert calls(podman, "checkpoint") == [
        ["checkpoint", "--help"],
        [
            *("checkpoint", "--image-path", f"{userdata}/checkpoint", "--work-path", userdata),
            *("--leave-running", "--leave-running", cid),
        ],
    ]
    _wait(lambda: max(_counts(podman, "counter")) >= len(lines) + 3)

    # 1b. vmpod's evidence archive of the same container, through the same monitor:
    # paused while the diff (podman's overlay upper dir) is read and CRIU dumps
    evidence = tmp_path / "evidence.tar"
    t0 = time.monotonic()
    r = subprocess.run(
        [str(BINARY.parent / "vmpod"), "forensics", "capture", "--runtime-root", str(podman.rt_root), cid]
        + ["-o", str(evidence)],
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
        env=runtime_env(paths, tmp_path / "runtime.json"),
    )
    capture_s = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(evidence) and "still running" in r.stderr
    verdict = verify(evidence)
    assert verdict.ok and verdict.manifest.container["id"] == cid
    members = _members(evidence)
    assert "checkpoint/inventory.img" in members and "vmpod-manifest.json" in members
    in_file = _data_log(members)
    assert in_file == [str(i) for i in range(1, len(in_file) + 1)] and len(in_file) > len(lines)
    assert json.loads(members["config.dump"])["vmpod"]["runtime_root"] == str(podman.rt_root)
    assert members["spec.dump"] == Path(userdata, "config.json").read_bytes()
    print(f"vmpod forensics capture --runtime-root: {capture_s:.1f}s ({r.stderr.strip()})")
    assert _state(podman, "counter") == "running"
    _wait(lambda: max(_counts(podman, "counter")) >= len(in_file) + 2)

    # 2. without it: the container stops once dumped, its VM goes
    stopped = tmp_path / "stopped.tar"
    t0 = time.monotonic()
    r = podman(
        "container",
        *("checkpoint", "--print-stats", "--compress", "none", "--export", str(stopped), "counter"),
        timeout=900,
    )
    checkpoint_s = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)["container_statistics"][0]  # read from CRIU's stats-dump
    assert stats["criu_statistics"]["freezing_time"] > 0 and stats["runtime_checkpoint_duration"] > 0
    assert _state(podman, "counter") == "exited"
    _wait(lambda: not os.path.exists(f"/proc/{first_qemu}"), timeout=30)
    captured = _data_log(_members(stopped))
    assert len(captured) > len(lines)

    # 2b. restored in place (podman's own checkpoint directory) in a new VM
    r = podman("container", "restore", "counter", timeout=900)
    assert r.returncode == 0, r.stderr
    assert _state(podman, "counter") == "running"
    assert _qemu(podman, "counter") != first_qemu
    _wait(lambda: max(_counts(podman, "counter")) >= len(captured) + 2)
    counts = _counts(podman, "counter")
    assert counts == list(range(1, len(counts) + 1))  # one log, no restart
    state = json.loads(_runtime(podman, "state", cid))
    assert state["status"] == "running"
    assert state["pid"] == int(podman("inspect", "--format", "{{.State.Pid}}", "counter").stdout)

    # 3. restored in a new VM: memory, the open file's offset, exec, then rm -f
    t0 = time.monotonic()
    r = podman("container", "restore", "--import", str(stopped), "--name", "clone", timeout=900)
    restore_s = time.monotonic() - t0
    print(f"podman checkpoint --export {checkpoint_s:.1f}s, restore --import {restore_s:.1f}s")
    assert r.returncode == 0, r.stderr
    assert _state(podman, "clone") == "running"
    qemu = _qemu(podman, "clone")
    assert qemu != first_qemu
    _wait(lambda: max(_counts(podman, "clone"), default=0) >= len(captured) + 3)
    counts = _counts(podman, "clone")
    # the memory came back: the count goes on from the captured value, without a
    # restart (podman's archive carries the original's log: that part comes first)
    assert counts[0] in (1, len(captured) + 1) and len(captured) + 1 in counts
    assert counts == list(range(counts[0], counts[0] + len(counts)))
    r = podman("exec", "clone", "cat", "/data.log")
    assert r.returncode == 0, r.stderr
    now = r.stdout.split()
    # appended through the restored fd at the captured offset: no gap, no overwrite
    assert now[: len(captured)] == captured and now == [str(i) for i in range(1, len(now) + 1)]
    assert len(now) > len(captured)
    assert podman("ps", "--format", "{{.Names}} {{.Status}}").stdout.count("clone Up") == 1
    # conmon's: restore --bundle B --pid-file P --detach --image-path I --work-path W ID
    restores = calls(podman, "restore")
    assert len(restores) == 2
    for argv in restores:
        flags = [w for w in argv if w.startswith("--")]
        assert flags == ["--bundle", "--pid-file", "--detach", "--image-path", "--work-path"], argv
        assert argv[argv.index("--image-path") + 1] == argv[argv.index("--work-path") + 1] + "/checkpoint"

    assert podman("rm", "-f", "-t", "0", "clone").returncode == 0
    _wait(lambda: not os.path.exists(f"/proc/{qemu}"), timeout=30)
    assert podman("rm", "-f", "-t", "0", "counter").returncode == 0

    # 4. podman's own archive restored by `vmpod forensics restore`: unverified (no
    # manifest), podman's bind mounts (/etc/hosts, /dev/shm...) as empty placeholders
    def vmpod(*args: str) -> subprocess.CompletedProcess[str]:
        env = runtime_env(paths, tmp_path / "runtime.json")
        cmd = [str(BINARY.parent / "vmpod"), *args]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=900, env=env, stdin=subprocess.DEVNULL
        )

    r = vmpod("forensics", "restore", str(stopped), "--rootfs", str(busybox), "--name", "frompodman")
    assert r.returncode == 0, r.stderr
    assert (
        "nothing was verified" in r.stderr and "empty placeholders: " in r.stderr and "/etc/hosts" in r.stderr
    )
    try:
        _wait(lambda: f"n={len(captured) + 2}" in vmpod("logs", "frompodman").stdout)
        r = vmpod("exec", "frompodman", "cat", "/data.log")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[: len(captured)] == captured
        assert vmpod("exec", "frompodman", "ls", "/sys/class/net").stdout.split() == ["lo"]
    finally:
        assert vmpod("rm", "-f", "frompodman").returncode == 0
