"""docker-like lifecycle of `vmpod` on real VMs: run -d, ps, exec, logs, cp, stop,
rm (refused while running), a killed monitor, and `vmpod-runtime run`.

One detached container serves most asserts (VMs are slow under TCG)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.vm.conftest import VMPOD, VmFactory, VmpodRunner, qemu_pids
from tests.vm.test_runtime_support import Runtime, make_bundle, runtime_env

SCRIPT = "echo hello; echo oops >&2; while true; do sleep 0.2; done"


def _ps(vmpod: VmpodRunner, *args: str) -> list[dict[str, object]]:
    r = vmpod("ps", "--format", "json", *args)
    assert r.returncode == 0, r.err
    rows = json.loads(r.out)
    assert isinstance(rows, list)
    return rows


def _states(vmpod: VmpodRunner) -> dict[str, str]:
    return {str(row["name"]): str(row["status"]) for row in _ps(vmpod, "-a")}


def _wait(pred: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_detached_container_lifecycle(vm_factory: VmFactory, busybox: Path, tmp_path: Path) -> None:
    vmpod = vm_factory()
    volume = tmp_path / "vol" / "data"  # missing: made like docker does
    r = vmpod.run(
        "-d", "--name", "web", "-v", f"{volume}:/data", "--rootfs", str(busybox), "--", "sh", "-c", SCRIPT
    )
    assert r.returncode == 0, r.err
    cid = r.out.strip()
    assert len(cid) == 64 and volume.is_dir()
    assert _states(vmpod) == {"web": "Running"}
    assert [row["id"] for row in _ps(vmpod)] == [cid]
    assert qemu_pids(str(vmpod.paths.run))

    r = vmpod("exec", "web", "sh", "-c", "echo $((6*7)) > /data/answer; echo out; exit 3")
    assert (r.returncode, r.out) == (3, "out\n")
    assert (volume / "answer").read_text() == "42\n"
    r = vmpod("exec", cid[:6], "cat", "/data/answer")  # an id prefix works too
    assert r.out == "42\n"

    _wait(lambda: "oops" in vmpod("logs", "web").err)
    r = vmpod("logs", "web")
    assert (r.returncode, r.out, r.err) == (0, "hello\n", "oops\n")
    pipe = subprocess.run(
        f"{' '.join(map(shlex.quote, [*VMPOD, 'logs', 'web']))} | head -1",
        shell=True,  # a closed pipe: `vmpod logs web | head -1`
        capture_output=True,
        env=vmpod.env,
        timeout=60,
    )
    assert (pipe.returncode, pipe.stdout, pipe.stderr) == (0, b"hello\n", b"oops\n")

    r = vmpod("rm", "web")
    assert r.returncode != 0 and "stop it first or use rm -f" in r.err
    assert _states(vmpod) == {"web": "Running"}

    big = tmp_path / "big"
    big.write_bytes(os.urandom(20 << 20))
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    assert vmpod("cp", str(big), "web:/tmp/").returncode == 0
    r = vmpod("exec", "web", "sha256sum", "/tmp/big")
    assert r.out.split()[0] == digest
    back = tmp_path / "back"
    r = vmpod("cp", "web:/tmp/big", str(back))
    assert r.returncode == 0, r.err
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest

    info = json.loads(vmpod("inspect", "web").out)[0]
    assert info["state"]["status"] == "running" and info["state"]["vm_pid"] > 0
    assert info["mounts"] == [{"source": str(volume), "destination": "/data", "mode": "rw"}]

    t0 = time.monotonic()
    r = vmpod("stop", "-t", "1", "web")  # sh as PID 1 ignores SIGTERM: killed after 1 s
    assert r.returncode == 0, r.err
    assert time.monotonic() - t0 < 30
    assert _states(vmpod) == {"web": "Exited (137)"}
    assert _ps(vmpod) == []
    assert not qemu_pids(str(vmpod.paths.run))

    r = vmpod("rm", "web")
    assert r.returncode == 0, r.err
    assert _ps(vmpod, "-a") == []
    assert (volume / "answer").read_text() == "42\n"  # volumes are never removed
    assert not (vmpod.paths.home / "containers" / cid).exists()


def test_killed_monitor_then_ps_rm_and_runtime_run(
    vm_factory: VmFactory, busybox: Path, tmp_path: Path
) -> None:
    vmpod = vm_factory()
    r = vmpod.run("-d", "--name", "k", "--rootfs", str(busybox), "--", "sleep", "1000")
    assert r.returncode == 0, r.err
    r = vmpod("run", "-d", "--name", "k", "--rootfs", str(busybox), "--", "true")
    assert r.returncode == 125 and "already in use" in r.err
    monitor = json.loads(vmpod("inspect", "k").out)[0]["state"]["monitor_pid"]
    os.kill(monitor, signal.SIGKILL)
    _wait(lambda: not qemu_pids(str(vmpod.paths.run)))  # QEMU dies with its monitor
    assert _states(vmpod) == {"k": "Exited (137)"}  # as if SIGKILLed: its VM died with it
    assert vmpod("rm", "k").returncode == 0
    assert _ps(vmpod, "-a") == []

    # vmpod-runtime run: create + start + wait + delete, the container's status is ours
    bundle = make_bundle(tmp_path / "b", busybox, ["sh", "-c", "echo ran; exit 7"])
    rt = Runtime(tmp_path / "root", runtime_env(vmpod.paths, tmp_path / "none.json"), tmp_path / "log.json")
    res = rt("run", "--bundle", str(bundle), "--pid-file", str(tmp_path / "pid"), "r1", timeout=180)
    assert (res.returncode, res.stdout) == (7, b"ran\n"), res.stderr
    assert rt("list", "--quiet").stdout == b""
    assert not qemu_pids(str(vmpod.paths.run))


def test_init_reaps_zombies_and_rm_leaves_nothing(vm_factory: VmFactory, busybox: Path) -> None:
    vmpod = vm_factory()
    # the orphaned grandchild's parent exits at once: PID 1 must reap it
    script = (
        "(sleep 0.3 &); sleep 1.5; cat /proc/1/cmdline | tr '\\0' ' '; echo; "
        "ps -o stat,comm | grep -c '^Z' || true"
    )
    r = vmpod.run("--rm", "--init", "--rootfs", str(busybox), "--", "sh", "-c", script)
    assert r.returncode == 0, r.err
    first, zombies = r.out.splitlines()
    assert first.startswith("/run/vmpod-init -- sh -c"), first
    assert zombies == "0", r.out
    assert _states(vmpod) == {}
    assert not qemu_pids(str(vmpod.paths.run))


def test_nested_file_and_symlinked_volumes(vm_factory: VmFactory, busybox: Path, tmp_path: Path) -> None:
    vmpod = vm_factory()
    outer, inner, real = tmp_path / "outer", tmp_path / "inner", tmp_path / "real"
    for d in (outer, inner, real):
        d.mkdir()
    (tmp_path / "conf").write_text("setting=1\n")
    (tmp_path / "link").symlink_to(real)  # the kernel's bind follows it, as docker's does
    script = "echo in > /data/sub/f; echo out > /data/f; cat /etc/app.conf; echo via-link > /l/f"
    r = vmpod.run(
        "--rm",
        *("-v", f"{inner}:/data/sub"),  # given first: still mounted on top of /data
        *("-v", f"{outer}:/data"),
        *("-v", f"{tmp_path / 'conf'}:/etc/app.conf:ro"),
        *("-v", f"{tmp_path / 'link'}:/l"),
        *("--rootfs", str(busybox), "--", "sh", "-c", script),
    )
    assert (r.returncode, r.out) == (0, "setting=1\n"), r.err
    assert (inner / "f").read_text() == "in\n" and (outer / "f").read_text() == "out\n"
    assert (real / "f").read_text() == "via-link\n"
    assert (tmp_path / "link").is_symlink() and (tmp_path / "conf").read_text() == "setting=1\n"
