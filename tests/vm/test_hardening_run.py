"""`vmpod run` under hostile use (issue 10: defects 1, 2, 3 and 9): group signals
from a terminal, a reader that goes away, a closed stdout, a flooded console."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.vm.conftest import VMPOD, VmpodRunner, qemu_pids, virtiofsd_pids
from vmpod.guest.assets import GuestAssets
from vmpod.hypervisor.qemu import console
from vmpod.images import resolve_rootfs
from vmpod.paths import Paths
from vmpod.runspec import ProcessOptions, build_spec
from vmpod.sandbox import ContainerSpec, Output, Sandbox, SandboxSpec, prepare
from vmpod.storage.erofs import rootfs_disk


def _wait_no_helpers(vmpod: VmpodRunner, timeout: float = 10) -> list[int]:
    run_dir = str(vmpod.paths.run)
    deadline = time.monotonic() + timeout
    while (left := qemu_pids(run_dir) + virtiofsd_pids(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_ctrl_c_to_the_foreground_group_reaches_the_container(vmpod: VmpodRunner, busybox: Path) -> None:
    """A terminal's ^C signals the whole foreground process group: vmpod (its own
    session here, as a shell's job) must forward it, and QEMU must not get it."""
    proc = vmpod.popen(
        "run",
        "--rootfs",
        str(busybox),
        "--",
        "sh",
        "-c",
        'trap "echo got-int; exit 3" INT; echo up; sleep 600 & wait',
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err.decode()
    assert b"got-int" in out, err.decode()
    assert not _wait_no_helpers(vmpod)


def test_sigterm_ends_a_run_whose_guest_hangs(vmpod: VmpodRunner, busybox: Path) -> None:
    """A guest that never answers (its QEMU frozen) cannot take the signal, nor
    SIGKILL after the grace: vmpod gives up on it, says so, exits 137 and its
    teardown kills the VM."""
    proc = vmpod.popen(
        "run",
        "--rootfs",
        str(busybox),
        "--",
        "sh",
        "-c",
        "echo up; sleep 600",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    (qemu,) = qemu_pids(str(vmpod.paths.run))
    os.kill(qemu, signal.SIGSTOP)
    try:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(qemu, signal.SIGCONT)
    assert proc.returncode == 137, err.decode()
    assert b"its VM does not answer; the VM was killed" in err, err.decode()
    assert not _wait_no_helpers(vmpod)


@pytest.mark.parametrize("named", [(), ("--name", "yes")], ids=["ephemeral", "named"])
def test_yes_into_a_closed_pipe_ends_like_sigpipe(
    vmpod: VmpodRunner, busybox: Path, named: tuple[str, ...]
) -> None:
    """`vmpod run [--name N] IMAGE -- yes | head -1`: the reader closes the pipe;
    vmpod stops the container and exits 141 (128+SIGPIPE) instead of running the
    VM forever. A named run goes through vmpod-runtime's monitor, whose output
    relay must do the same, and the record must say so."""
    proc = vmpod.popen(
        "run",
        *named,
        "--rootfs",
        str(busybox),
        "--",
        "yes",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"y\n"
    proc.stdout.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()  # (the fixture reaps it and its VM)
        raise
    err = proc.stderr.read().decode()
    assert proc.returncode == 141, err
    # silent, as a shell is about SIGPIPE (a cold cache's progress lines aside)
    assert not [ln for ln in err.splitlines() if not ln.startswith("vmpod: making ")], err
    assert not _wait_no_helpers(vmpod)
    if named:
        r = vmpod("ps", "-a", "--format", "json")
        assert [(c["name"], c["state"], c["exit_code"]) for c in json.loads(r.out)] == [
            ("yes", "exited", 141)
        ], r.out
        assert vmpod("rm", "yes").returncode == 0


@pytest.mark.parametrize(
    "redirect,named",
    [(">&-", ()), (">&- <&-", ()), (">&-", ("--rm", "--name", "closed"))],
    ids=["stdout", "stdout-and-stdin", "named"],
)
def test_closed_stdout(vmpod: VmpodRunner, busybox: Path, redirect: str, named: tuple[str, ...]) -> None:
    """`vmpod run … >&-` (and with stdin closed too): the run works (its effects may be the point, as with
    docker), its status is the container's, stderr still shows, and vmpod says the
    output is discarded instead of blaming the agent channel or saying nothing."""
    proc = subprocess.run(
        ["sh", "-c", f'exec "$@" {redirect}', "sh", *VMPOD, "run", *named, "--rootfs", str(busybox), "--"]
        + ["sh", "-c", "echo to-nowhere; echo to-stderr >&2; exit 7"],
        stderr=subprocess.PIPE,
        env=vmpod.env,
        timeout=180,
        check=False,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 7, err
    assert "to-stderr" in err and "to-nowhere" not in err
    assert "stdout is closed: the container's output is discarded" in err
    assert "agent" not in err.lower()


def test_a_flooded_console_stays_under_the_cap(paths: Paths, assets: GuestAssets, busybox: Path) -> None:
    """A privileged container writes 30 MB to the guest's serial console: the host's
    console log stays under the cap (it lives in /run, RAM on most hosts) and its
    tail is the latest output, for error messages."""
    mb = 30
    script = (
        f"yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {mb * 1024 * 1024} > /dev/ttyS0"
        " && echo flood-done > /dev/ttyS0"
    )
    disk = rootfs_disk(paths, resolve_rootfs(busybox))
    oci = build_spec(
        resolve_rootfs(busybox).config, ProcessOptions(args=("sh", "-c", script), privileged=True)
    )

    async def scenario() -> tuple[int, int, str]:
        sandbox = Sandbox(paths, prepare(paths, SandboxSpec(rootfs=(disk,))))
        async with sandbox:
            container = await sandbox.create_container(ContainerSpec(id="flood", oci=oci, rootfs=disk))
            proc = await container.start(Output(lambda _b: None, lambda _b: None), stdin=False)
            exit_ = await asyncio.wait_for(proc.wait(), 400)
            log = sandbox.state_dir / "console.log"
            on_disk = sum(p.stat().st_size for p in (log, log.with_name("console.log.1")) if p.exists())
            # the drain may trail the guest by a pipe's worth
            deadline = time.monotonic() + 10
            while "flood-done" not in sandbox.console_tail(3) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            return exit_.status, on_disk, sandbox.console_tail(3)

    status, on_disk, tail = asyncio.run(scenario())
    assert status == 0
    assert console.DEFAULT_CAP // 2 <= on_disk <= console.DEFAULT_CAP < mb * 1024 * 1024, on_disk
    assert "flood-done" in tail


def test_boot_failure_still_quotes_the_console_tail(vmpod: VmpodRunner, busybox: Path) -> None:
    """The console now reaches its log through a pipe: a boot that fails still
    shows the guest's last console lines in the error."""
    r = vmpod.run("--console", "--boot-timeout", "1.5", "--rootfs", str(busybox), "--", "true")
    assert r.returncode == 125, r.err
    assert "guest console" in r.err, r.err
    quoted = r.err.split("guest console", 1)[1].strip().splitlines()
    assert len(quoted) >= 3, r.err
