"""containerd 1.6 (io.containerd.runc.v2 shim) running containers in VMs through
vmpod-runtime: `ctr run --runc-binary vmpod-runtime`.

A private containerd (own --root/--state/--address, CRI disabled) and an image
imported from a docker-save archive of the busybox rootfs.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.oci import make_docker_archive
from tests.vm.conftest import mounts_under, pids_where
from tests.vm.test_runtime_support import (
    assert_runtime_clean,
    run_text,
    runtime_env,
    wrapper_script,
)
from vmpod.guest.assets import GuestAssets
from vmpod.paths import Paths

IMAGE = "docker.io/library/vmpod-busybox:latest"


class Ctr:
    def __init__(self, address: Path, runtime: Path, rt_root: Path) -> None:
        self.base = ["ctr", "--address", str(address)]
        self.run_flags = ["--runc-binary", str(runtime), "--runc-root", str(rt_root)]

    def __call__(
        self, *args: str, input: bytes | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        return run_text([*self.base, *args], input, timeout)


@pytest.fixture(scope="module")
def ctr(
    paths: Paths, assets: GuestAssets, busybox: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Ctr]:
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.skip("containerd not installed")
    tmp = tmp_path_factory.mktemp("ctd")
    address = tmp / "containerd.sock"
    (tmp / "config.toml").write_text(
        f'version = 2\nroot = "{tmp}/root"\nstate = "{tmp}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{address}"\n[ttrpc]\n  address = "{address}.ttrpc"\n'
    )
    with open(tmp / "containerd.log", "wb") as log:
        daemon = subprocess.Popen(
            ["containerd", "--config", str(tmp / "config.toml")], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while not address.exists():
            assert daemon.poll() is None, (tmp / "containerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd did not start"
            time.sleep(0.05)
        rt_root = tmp / "rtroot"
        wrapper = wrapper_script(tmp / "vmpod-runtime", runtime_env(paths, tmp / "rt.json"))
        c = Ctr(address, wrapper, rt_root)
        make_docker_archive(busybox, tmp / "image.tar", repo_tag=IMAGE)
        res = c("images", "import", str(tmp / "image.tar"))
        assert res.returncode == 0, res.stderr
        yield c
        for name in c("containers", "list", "--quiet").stdout.split():
            c("task", "kill", "--signal", "KILL", name)
            time.sleep(0.5)
            c("task", "delete", name)
            c("containers", "delete", name)
        assert_runtime_clean(paths, rt_root / "default")  # the shim adds the namespace
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        for pid in pids_where(lambda argv: str(address) in "\0".join(argv)):  # shims of this containerd only
            os.kill(pid, signal.SIGKILL)
    assert mounts_under(tmp) == []


def test_ctr_run_output_and_exit_status(ctr: Ctr) -> None:
    res = ctr(
        "run",
        "--rm",
        *ctr.run_flags,
        IMAGE,
        "once",
        "sh",
        "-c",
        "echo hi from $(uname -r); echo err >&2; exit 6",
    )
    assert res.returncode == 6, res.stderr
    assert res.stdout.startswith("hi from ") and os.uname().release not in res.stdout
    assert "err" in res.stderr


def test_ctr_task_exec_ps_pause_kill(ctr: Ctr) -> None:
    loop = "echo up; trap 'echo bye; exit 9' TERM; while true; do sleep 0.2; done"
    fg = subprocess.Popen(
        [*ctr.base, "run", "--rm", *ctr.run_flags, IMAGE, "svc", "sh", "-c", loop],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert fg.stdout is not None
        ready, _, _ = select.select([fg.stdout], [], [], 120)
        assert ready and fg.stdout.readline() == b"up\n"
        assert "RUNNING" in ctr("task", "list").stdout
        res = ctr("task", "exec", "--exec-id", "e1", "svc", "sh", "-c", "echo in-exec; exit 2")
        assert (res.returncode, res.stdout) == (2, "in-exec\n")
        ps = ctr("task", "ps", "svc").stdout.split()
        assert ps[:2] == ["PID", "INFO"] and len(ps) >= 4
        assert ctr("task", "pause", "svc").returncode == 0
        assert "PAUSED" in ctr("task", "list").stdout
        assert ctr("task", "resume", "svc").returncode == 0
        assert ctr("task", "kill", "svc").returncode == 0  # SIGTERM: the trap runs
        assert fg.wait(120) == 9
        assert fg.stdout.read() == b"bye\n"
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.wait()


def test_ctr_tty(ctr: Ctr) -> None:
    from tests.vm.test_podman import _pty_run

    code, out = _pty_run(
        [*ctr.base, "run", "-t", "--rm", *ctr.run_flags, IMAGE, "tty", "sh"],
        b"stty size; echo $((6*7)); exit 3\r",
        b"42",
    )
    assert code == 3
    assert b"31 97" in out
