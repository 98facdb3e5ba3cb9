"""Pods under podman through vmpod-runtime: one VM per pod, its containers side by
side in it (own rootfs and processes, shared network), gone with the pod."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.vm.conftest import qemu_pids
from tests.vm.test_podman import IMAGE, ULIMITS, Podman, podman  # noqa: F401 (the fixture)
from vmpod.paths import Paths

BOOT_ID = "cat /proc/sys/kernel/random/boot_id"


def _vms(paths: Paths) -> list[int]:
    return qemu_pids(str(paths.run))


def _wait(pred: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_pod_is_one_vm(podman: Podman, paths: Paths) -> None:  # noqa: F811
    before = set(_vms(paths))
    assert podman("pod", "create", "--name", "vmpodpod").returncode == 0
    try:
        script = (
            f"{BOOT_ID} > /tmp/boot; echo served > /tmp/index.html; readlink /proc/self/ns/ipc > /tmp/ipc; "
            "readlink /proc/self/ns/uts > /tmp/uts; httpd -f -p 8080 -h /tmp"
        )
        res = podman("run", "-d", "--pod", "vmpodpod", "--name", "srv", *ULIMITS, IMAGE, "sh", "-c", script)
        assert res.returncode == 0, res.stderr
        assert len(set(_vms(paths)) - before) == 1, "the pod and its first member share one VM"
        client = (
            f"{BOOT_ID}; for i in $(seq 50); do wget -q -O- http://127.0.0.1:8080/boot && break; "
            "sleep 0.2; done; wget -q -O- http://127.0.0.1:8080/index.html; "
            "test -e /tmp/boot || echo own-rootfs; "
            "[ $(wget -q -O- 127.0.0.1:8080/ipc) = $(readlink /proc/self/ns/ipc) ] && echo same-ipc; "
            "[ $(wget -q -O- 127.0.0.1:8080/uts) = $(readlink /proc/self/ns/uts) ] && echo same-uts"
        )
        res = podman("run", "--rm", "--pod", "vmpodpod", *ULIMITS, IMAGE, "sh", "-c", client)
        assert res.returncode == 0, res.stderr
        mine, theirs, served, own, *shared = res.stdout.split()
        assert mine == theirs, "both containers see the same guest kernel boot"
        assert (served, own) == ("served", "own-rootfs")
        assert shared == ["same-ipc", "same-uts"], "the pod's members share its IPC and UTS namespaces"
        assert len(set(_vms(paths)) - before) == 1
        # a member gets its own processes: the server is not in the client's pid namespace
        res = podman("exec", "srv", "sh", "-c", "ps -o comm | grep -c httpd")
        assert res.stdout.strip() == "1", res
    finally:
        res = podman("pod", "rm", "--force", "--time", "0", "vmpodpod")
    assert res.returncode == 0, res.stderr
    _wait(lambda: set(_vms(paths)) <= before)


def test_a_member_of_a_dead_pod_vm_ends_and_the_pod_restarts(podman: Podman, paths: Paths) -> None:  # noqa: F811
    before = set(_vms(paths))
    assert podman("pod", "create", "--name", "deadpod").returncode == 0
    try:
        res = podman("run", "-d", "--pod", "deadpod", "--name", "victim", *ULIMITS, IMAGE, "sleep", "600")
        assert res.returncode == 0, res.stderr
        [vm] = set(_vms(paths)) - before
        os.kill(vm, signal.SIGKILL)
        _wait(lambda: "exited" in podman("inspect", "--format", "{{.State.Status}}", "victim").stdout)
        code = podman("inspect", "--format", "{{.State.ExitCode}}", "victim").stdout.strip()
        assert code == "137"
        # podman starts the pod's infra container again: a new VM, which a new member joins
        res = podman("run", "--rm", "--pod", "deadpod", *ULIMITS, IMAGE, "echo", "again")
        assert (res.returncode, res.stdout) == (0, "again\n"), res.stderr
        assert vm not in _vms(paths)
    finally:
        podman("pod", "rm", "--force", "--time", "0", "deadpod")
    assert not subprocess.run(["pgrep", "-f", "deadpod"], capture_output=True).stdout
