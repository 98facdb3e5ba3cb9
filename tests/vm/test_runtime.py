"""vmpod-runtime against the OCI runtime spec, through the real binary, on real VMs.

Written from the runtime spec (runtime.md: state, lifecycle, operations, errors)
because the upstream runtime-tools validation programs are not packaged here.
One long-running container is shared by the tests that only exec, signal or
inspect it; lifecycle tests make their own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.conftest import qemu_below
from tests.vm.test_runtime_support import (
    ConsoleSocket,
    Reaped,
    Runtime,
    assert_runtime_clean,
    fresh_dir,
    make_bundle,
    runtime_env,
)
from vmpod.guest.assets import GuestAssets
from vmpod.paths import Paths

LOOP = [
    "sh",
    "-c",
    "echo up; trap 'echo bye; exit 9' TERM; trap 'echo hup' HUP; while true; do sleep 0.2; done",
]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rt")


@pytest.fixture(scope="module")
def rt(paths: Paths, assets: GuestAssets, work: Path) -> Iterator[Runtime]:
    runtime = Runtime(work / "root", runtime_env(paths, work / "runtime.json"), work / "log.json")
    yield runtime
    for cid in runtime("list", "--quiet").stdout.decode().split():
        runtime("delete", "--force", cid)
    assert_runtime_clean(paths, runtime.root)


@pytest.fixture
def clean(rt: Runtime, paths: Paths) -> Iterator[None]:
    """For tests that make their own containers: nothing of theirs may remain."""
    before = set(os.listdir(rt.root)) if rt.root.exists() else set()
    yield
    after = set(os.listdir(rt.root)) if rt.root.exists() else set()
    for cid in after - before:
        rt("delete", "--force", cid)
    assert after <= before, f"left behind: {after - before}"


def _wait_for(path: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path}: {path.read_text() if path.exists() else ''}")


@pytest.fixture(scope="module")
def shared(rt: Runtime, busybox: Path, work: Path) -> Iterator[Reaped]:
    bundle = make_bundle(work / "shared", busybox, LOOP)
    ctr = rt.create("shared", bundle, work)
    ctr.wait_created()
    rt("start", "shared", check=True)
    _wait_for(ctr.out, "up\n")
    yield ctr
    rt("delete", "--force", "shared")


# -- lifecycle ---------------------------------------------------------------------


def test_create_start_state_exit_delete(rt: Runtime, busybox: Path, work: Path, clean: None) -> None:
    script = 'read line; echo "got $line"; echo to-stderr >&2; exit 3'
    bundle = make_bundle(work / "life", busybox, ["sh", "-c", script])
    ctr = rt.create("life", bundle, work, stdin=b"hello\n")
    pid = ctr.wait_created()
    st = rt.state("life")
    assert st["status"] == "created" and st["pid"] == pid and st["id"] == "life"
    assert st["bundle"] == str(bundle) and st["ociVersion"]
    assert ctr.output() == ("", "")  # create does not run the process
    rt("start", "life", check=True)
    assert ctr.result() == {"cmd": 0, "pid": pid, "status": 3}  # the monitor's exit = the process's
    assert ctr.output() == ("got hello\n", "to-stderr\n")
    st = rt.state("life")
    assert st["status"] == "stopped" and st["exitStatus"] == 3 and st["pid"] == 0
    res = rt("start", "life")
    assert res.returncode == 1 and b"cannot start a container that has stopped" in res.stderr
    res = rt("kill", "life", "KILL")
    assert res.returncode == 1 and b"container not running" in res.stderr
    assert rt("delete", "life").returncode == 0
    res = rt("state", "life")
    assert res.returncode == 1 and b"container does not exist" in res.stderr
    assert {"level": "error", "msg": "container does not exist"}.items() <= rt.log_entries()[-1].items()


def test_kill_and_delete_of_a_created_container(rt: Runtime, busybox: Path, work: Path, clean: None) -> None:
    bundle = make_bundle(work / "created", busybox, ["true"])
    a = rt.create("created-a", bundle, work)
    b = rt.create("created-b", bundle, work)
    a.wait_created()
    b.wait_created()
    rt("kill", "created-a", "KILL", check=True)
    assert a.result()["signal"] == signal.SIGKILL
    assert rt.state("created-a")["status"] == "stopped"
    rt("delete", "created-a", check=True)
    rt("delete", "created-b", check=True)  # a created container may be deleted
    assert b.result()["signal"] == signal.SIGKILL


def test_duplicate_ids_race(rt: Runtime, busybox: Path, work: Path, clean: None) -> None:
    # Two creates race for one id. As with runc, exactly one wins (which one is the
    # race's choice); the other exits 1 with runc's message, writes no pid file and
    # leaves the winner's container as it was.
    bundle = make_bundle(work / "dup", busybox, ["true"])
    one = rt.create("dup", bundle, fresh_dir(work / "dup1"))
    two = rt.create("dup", bundle, fresh_dir(work / "dup2"))
    created: dict[int, int] = {}
    for i, ctr in enumerate((one, two)):
        try:
            created[i] = ctr.wait_created()
        except AssertionError:
            pass
    assert len(created) == 1, (one.err.read_text(), two.err.read_text())
    [(won, pid)] = created.items()
    winner, loser = (one, two) if won == 0 else (two, one)
    assert loser.result() == {"cmd": 1}
    assert "container with given ID already exists" in loser.err.read_text()
    assert not loser.pid_file.exists()
    st = rt.state("dup")
    assert (st["status"], st["pid"]) == ("created", pid)
    rt("delete", "--force", "dup", check=True)
    assert winner.result() == {"cmd": 0, "pid": pid, "signal": signal.SIGKILL}


def test_signals_and_forced_delete(rt: Runtime, busybox: Path, work: Path, clean: None) -> None:
    bundle = make_bundle(work / "sig", busybox, LOOP)
    ctr = rt.create("sig", bundle, work)
    ctr.wait_created()
    rt("start", "sig", check=True)
    _wait_for(ctr.out, "up\n")
    res = rt("delete", "sig")
    assert res.returncode == 1 and b"cannot delete container sig that is not stopped: running" in res.stderr
    res = rt("start", "sig")
    assert res.returncode == 1 and b"cannot start an already running container" in res.stderr
    rt("kill", "sig", check=True)  # default TERM: the trap runs
    assert ctr.result()["status"] == 9
    assert ctr.output()[0] == "up\nbye\n"
    rt("delete", "sig", check=True)
    forced = rt.create("forced", bundle, work)
    forced.wait_created()
    rt("start", "forced", check=True)
    rt("delete", "--force", "forced", check=True)
    assert forced.result()["signal"] == signal.SIGKILL


def test_killed_monitor_reads_stopped_and_delete_cleans_up(
    rt: Runtime, busybox: Path, work: Path, paths: Paths, clean: None
) -> None:
    bundle = make_bundle(work / "stale", busybox, LOOP)
    ctr = rt.create("stale", bundle, work)
    pid = ctr.wait_created()
    rt("start", "stale", check=True)
    sandbox_dir = Path(str(json.loads((rt.root / "stale/state.json").read_text())["sandbox_dir"]))
    assert sandbox_dir.is_dir() and str(paths.run) in str(sandbox_dir)
    _wait_for(ctr.out, "up\n")
    os.kill(pid, signal.SIGHUP)  # a signal to the monitor reaches the process
    _wait_for(ctr.out, "hup\n")
    os.kill(pid, signal.SIGKILL)
    assert ctr.result()["signal"] == signal.SIGKILL
    assert rt.state("stale")["status"] == "stopped"
    assert b"container not running" in rt("kill", "stale").stderr
    rt("delete", "stale", check=True)
    assert not sandbox_dir.exists()


def test_qemu_killed_reads_stopped_and_delete_cleans_up(
    rt: Runtime, busybox: Path, work: Path, clean: None
) -> None:
    bundle = make_bundle(work / "vmdead", busybox, LOOP)
    ctr = rt.create("vmdead", bundle, work)
    monitor = ctr.wait_created()
    rt("start", "vmdead", check=True)
    _wait_for(ctr.out, "up\n")
    qemu = qemu_below(monitor)
    assert len(qemu) == 1
    os.kill(qemu[0], signal.SIGKILL)
    result = ctr.result()  # the monitor notices and exits
    assert rt.state("vmdead")["status"] == "stopped"
    rt("delete", "vmdead", check=True)
    assert not (rt.root / "vmdead").exists()
    # Every process of the container died with its kernel. As with runc when the
    # container's processes are killed with SIGKILL, the pid in --pid-file (the
    # monitor) must end by SIGKILL, which conmon and containerd's shim report as 137.
    assert result == {"cmd": 0, "pid": monitor, "signal": signal.SIGKILL}, result


# -- on the shared running container ----------------------------------------------


def test_state_of_a_running_container(rt: Runtime, shared: Reaped) -> None:
    st = rt.state("shared")
    assert st["status"] == "running" and st["pid"] == int(shared.pid_file.read_text())
    listed = json.loads(rt("list", "--format", "json", check=True).stdout)
    assert {"id": "shared", "status": "running"}.items() <= next(
        c for c in listed if c["id"] == "shared"
    ).items()


def test_exec_stdio_status_and_options(rt: Runtime, shared: Reaped, work: Path) -> None:
    res = rt("exec", "shared", "sh", "-c", "echo out; echo err >&2; exit 4")
    assert (res.returncode, res.stdout, res.stderr) == (4, b"out\n", b"err\n")
    res = rt(
        "exec",
        "-e",
        "X=1",
        "--cwd",
        "/tmp",
        "-u",
        "1000:50",
        "shared",
        "sh",
        "-c",
        'echo "$X $(pwd) $(id -u):$(id -g)"',
        check=True,
    )
    assert res.stdout == b"1 /tmp 1000:50\n"
    res = rt("exec", "shared", "sh", "-c", "tr a-z A-Z", input=b"piped input\n", check=True)
    assert res.stdout == b"PIPED INPUT\n"
    process = {
        "args": ["sh", "-c", "echo from-file $Y"],
        "env": ["Y=2", "PATH=/bin"],
        "cwd": "/",
        "user": {"uid": 0, "gid": 0},
        "terminal": False,
    }
    (work / "process.json").write_text(json.dumps(process))
    res = rt("exec", "--process", str(work / "process.json"), "shared", check=True)
    assert res.stdout == b"from-file 2\n"
    res = rt("exec", "shared", "nosuchcommand")
    assert res.returncode == 127


def test_exec_detached_relay_exits_with_the_status(rt: Runtime, shared: Reaped, work: Path) -> None:
    out = work / "detached.out"
    ex = Reaped(
        rt,
        "detached",
        work,
        rt.argv(
            "exec",
            "-d",
            "--pid-file",
            str(work / "detached.pid"),
            "shared",
            "sh",
            "-c",
            "sleep 0.5; echo late; exit 5",
        ),
        b"",
    )
    res = ex.result()
    assert res["cmd"] == 0 and res["status"] == 5 and res["pid"] > 0
    assert out.read_text() == "late\n"


def test_ps_pause_resume_events_update(rt: Runtime, shared: Reaped) -> None:
    pids = json.loads(rt("ps", "--format", "json", "shared", check=True).stdout)
    assert isinstance(pids, list) and pids and all(isinstance(p, int) for p in pids)
    assert rt("ps", "shared", check=True).stdout.startswith(b"PID\n")
    rt("pause", "shared", check=True)
    try:
        assert rt.state("shared")["status"] == "paused"
        res = rt("exec", "shared", "true")
        assert res.returncode == 1 and b"paused" in res.stderr
        assert b"already paused" in rt("pause", "shared").stderr
    finally:
        rt("resume", "shared", check=True)
    assert rt.state("shared")["status"] == "running"
    assert b"not paused" in rt("resume", "shared").stderr
    event = json.loads(rt("events", "--stats", "shared", check=True).stdout)
    assert event["type"] == "stats" and event["id"] == "shared"
    assert "memory" in event["data"] and "pids" in event["data"]
    rt("update", "--pids-limit", "77", "shared", check=True)
    res = rt("exec", "shared", "cat", "/sys/fs/cgroup/pids.max", check=True)
    assert res.stdout == b"77\n"
    resources = json.dumps({"memory": {"limit": 300 << 20}}).encode()
    rt("update", "--resources", "-", "shared", input=resources, check=True)
    res = rt("exec", "shared", "cat", "/sys/fs/cgroup/memory.max", check=True)
    assert res.stdout == f"{300 << 20}\n".encode()


def test_kill_all_ends_every_process(rt: Runtime, shared: Reaped, work: Path) -> None:
    # Its stdio is the exec'd process's (as with runc): no pipe we would wait on.
    res = subprocess.run(
        rt.argv("exec", "-d", "shared", "sleep", "300"),
        env=rt.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        timeout=60,
    )
    assert res.returncode == 0
    rt("kill", "--all", "shared", "KILL", check=True)
    assert shared.result()["signal"] == signal.SIGKILL
    assert rt.state("shared")["status"] == "stopped"


# -- terminal, hooks, files, resources, kernels ---------------------------------------


def test_terminal_through_console_socket(rt: Runtime, busybox: Path, work: Path, clean: None) -> None:
    import fcntl
    import struct
    import termios

    bundle = make_bundle(work / "tty", busybox, ["sh"], terminal=True, env=["PATH=/bin", "TERM=xterm"])
    res = rt("create", "--bundle", str(bundle), "notty")
    assert res.returncode == 1 and b"console socket" in res.stderr
    console = ConsoleSocket(work / "console.sock")
    try:
        ctr = rt.create("tty", bundle, work, extra=("--console-socket", str(console.path)))
        ctr.wait_created()
        master = console.wait()
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 77, 0, 0))
        rt("start", "tty", check=True)
        console.read_until(b"# ")
        time.sleep(0.5)  # the size is polled
        os.write(master, b"stty size; echo $((6*7)); exit 4\r")
        buf = console.read_until(b"42\r\n")
        assert b"33 77" in buf
        assert ctr.result()["status"] == 4
        assert ctr.output() == ("", "")  # stdio of create is not the terminal's
        rt("delete", "tty", check=True)
    finally:
        console.close()


def _hooks(work: Path, log: Path, fail: str = "") -> dict[str, object]:
    script = work / "hook.sh"
    script.write_text(
        f'#!/bin/sh\nstate=$(cat)\necho "$1 $state" >> {log}\n'
        f'[ "$1" = "{fail}" ] && {{ echo "hook $1 broke" >&2; exit 2; }}\nexit 0\n'
    )
    script.chmod(0o755)
    kinds = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
    return {k: [{"path": str(script), "args": ["hook.sh", k], "timeout": 10}] for k in kinds}


def _hook_log(log: Path) -> list[tuple[str, dict[str, object]]]:
    out = []
    for line in log.read_text().splitlines():
        kind, _, state = line.partition(" ")
        out.append((kind, json.loads(state)))
    return out


def test_hooks_run_on_the_host_in_order(rt: Runtime, busybox: Path, work: Path, clean: None) -> None:
    log = work / "hooks.log"
    bundle = make_bundle(
        work / "hooks", busybox, ["sh", "-c", "exit 0"], hooks=_hooks(work, log), annotations={"a": "b"}
    )
    ctr = rt.create("hooked", bundle, work)
    pid = ctr.wait_created()
    rt("start", "hooked", check=True)
    assert ctr.result()["status"] == 0
    rt("delete", "hooked", check=True)
    calls = _hook_log(log)
    assert [k for k, _ in calls] == [
        "prestart",
        "createRuntime",
        "createContainer",
        "startContainer",
        "poststart",
        "poststop",
    ]
    states = dict(calls)
    for kind in ("prestart", "createRuntime", "createContainer"):
        assert states[kind]["status"] == "creating" and states[kind]["pid"] == pid
    assert states["startContainer"]["status"] == "created"
    assert states["poststart"]["status"] == "running"
    assert states["poststop"]["status"] == "stopped"
    assert all(
        s["id"] == "hooked" and s["bundle"] == str(bundle) and s["annotations"] == {"a": "b"}
        for s in states.values()
    )


def test_failing_create_hook_fails_create_and_cleans_up(
    rt: Runtime, busybox: Path, work: Path, clean: None
) -> None:
    log = work / "hooks-fail.log"
    bundle = make_bundle(
        work / "hooks-fail", busybox, ["true"], hooks=_hooks(work, log, fail="createRuntime")
    )
    ctr = rt.create("hookfail", bundle, work)
    res = ctr.result()
    assert res == {"cmd": 1}
    assert "createRuntime hook #0" in ctr.err.read_text()
    assert "hook createRuntime broke" in ctr.err.read_text()
    assert [k for k, _ in _hook_log(log)] == ["prestart", "createRuntime", "poststop"]
    assert not (rt.root / "hookfail").exists()
    assert b"does not exist" in rt("state", "hookfail").stderr


def test_rootfs_and_bind_mounts_are_the_hosts(rt: Runtime, busybox: Path, work: Path, clean: None) -> None:
    """runc's contract: the bundle rootfs is the container's root, and bind mounts are
    the host's files, both ways (read-only ones refused on write), of any size."""
    host = fresh_dir(work / "userdata")
    (host / "hosts").write_text("10.1.2.3 myhost\n")
    big = bytes(range(256)) * 4096 * 2  # 2 MiB: far beyond one agent message
    (host / "secret").write_bytes(big)
    (host / "volume").mkdir()
    (host / "volume" / "old").write_text("from the host\n")
    (host / "ro").mkdir()
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/etc/hosts",
            "type": "bind",
            "source": str(host / "hosts"),
            "options": ["bind", "rprivate"],
        },
        {
            "destination": "/run/secrets/s",
            "type": "bind",
            "source": str(host / "secret"),
            "options": ["bind", "ro"],
        },
        {"destination": "/data", "type": "bind", "source": str(host / "volume"), "options": ["rbind"]},
        {"destination": "/ro", "type": "bind", "source": str(host / "ro"), "options": ["rbind", "ro"]},
    ]
    script = (
        "cat /etc/hosts; md5sum /run/secrets/s | cut -d' ' -f1; cat /data/old; "
        "echo from-the-guest > /data/new; echo written > /in-rootfs; "
        "(echo >> /run/secrets/s) 2>/dev/null || echo secret-ro; "
        "(touch /ro/x) 2>/dev/null || echo volume-ro; sync"
    )
    bundle = make_bundle(work / "files", busybox, ["sh", "-c", script], mounts=mounts)
    ctr = rt.create("files", bundle, work)
    ctr.wait_created()
    rt("start", "files", check=True)
    assert ctr.result()["status"] == 0, ctr.output()
    import hashlib

    out = ctr.output()[0].splitlines()
    assert out == [
        "10.1.2.3 myhost",
        hashlib.md5(big).hexdigest(),
        "from the host",
        "secret-ro",
        "volume-ro",
    ]
    assert (host / "volume" / "new").read_text() == "from-the-guest\n"
    assert (bundle / "rootfs" / "in-rootfs").read_text() == "written\n"
    assert list((host / "ro").iterdir()) == []
    rt("delete", "files", check=True)
    assert (host / "volume" / "old").exists() and (host / "secret").read_bytes() == big


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        ({"destination": "/dev/x", "type": "bind", "source": "/dev/null", "options": ["bind"]}, "devices"),
        ({"destination": "/x", "type": "bind", "source": "/tmp", "options": ["rbind", "rshared"]}, "rshared"),
        ({"destination": "/x", "type": "nfs", "source": "srv:/x", "options": []}, "'nfs'"),
    ],
)
def test_mounts_the_vm_cannot_honour_are_refused(
    rt: Runtime, busybox: Path, work: Path, clean: None, mount: dict[str, object], message: str
) -> None:
    bundle = make_bundle(work / "refused", busybox, ["true"], mounts=[mount])
    res = rt("create", "--bundle", str(bundle), "refused")
    assert res.returncode != 0
    assert message in res.stderr.decode(), res.stderr
    assert not (rt.root / "refused").exists()


def test_resources_size_the_vm(rt: Runtime, busybox: Path, work: Path, clean: None) -> None:
    cpus = min(2, os.cpu_count() or 1)
    linux = {
        "resources": {"cpu": {"quota": 100000 * cpus, "period": 100000}, "memory": {"limit": 1 << 30}},
        "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")],
    }
    script = "nproc; grep MemTotal /proc/meminfo; cat /sys/fs/cgroup/memory.max"
    bundle = make_bundle(work / "sized", busybox, ["sh", "-c", script], linux=linux)
    ctr = rt.create("sized", bundle, work)
    ctr.wait_created()
    rt("start", "sized", check=True)
    assert ctr.result()["status"] == 0, ctr.output()
    lines = ctr.output()[0].splitlines()
    assert lines[0] == str(cpus)
    mem_mb = int(lines[1].split()[1]) // 1024
    assert 1024 < mem_mb <= 1024 + 256  # limit + the documented overhead
    assert lines[2] == str(1 << 30)
    rt("delete", "sized", check=True)


def test_kernel_annotation_needs_the_allow_list(
    rt: Runtime, busybox: Path, work: Path, paths: Paths, clean: None
) -> None:
    from vmpod.guest.kernel import ensure_kernel

    bundle = make_bundle(work / "kernel", busybox, ["uname", "-r"], annotations={"org.vmpod.kernel": "6.12"})
    res = rt("create", "--bundle", str(bundle), "k")
    assert res.returncode == 1 and b"org.vmpod.kernel is not enabled" in res.stderr
    kernel = ensure_kernel(paths, "6.12")  # from the cache, or Debian's archive
    config = Path(rt.env["VMPOD_RUNTIME_CONFIG"])
    config.write_text(json.dumps({"enable_annotations": ["org.vmpod.kernel"], "kernels": ["6.12"]}))
    try:
        ctr = rt.create("k", bundle, work)
        ctr.wait_created()
        rt("start", "k", check=True)
        assert ctr.result()["status"] == 0
        assert ctr.output()[0].strip() == kernel.release
        rt("delete", "k", check=True)
        bad = make_bundle(work / "kernel-bad", busybox, ["true"], annotations={"org.vmpod.kernel": "6.1-rt"})
        res = rt("create", "--bundle", str(bad), "k2")
        assert res.returncode == 1 and b"'6.1-rt'" in res.stderr and b"not allowed" in res.stderr
    finally:
        config.unlink()


def test_kernel_modules_annotation(rt: Runtime, busybox: Path, work: Path, clean: None) -> None:
    annotations = {"org.vmpod.kernel_modules": "dummy=numdummies=2; loop"}
    bundle = make_bundle(
        work / "mods", busybox, ["sh", "-c", "ls /sys/class/net; cat /proc/modules"], annotations=annotations
    )
    res = rt("create", "--bundle", str(bundle), "mods")
    assert res.returncode == 1 and b"org.vmpod.kernel_modules is not enabled" in res.stderr
    config = Path(rt.env["VMPOD_RUNTIME_CONFIG"])
    config.write_text(json.dumps({"enable_annotations": ["org.vmpod.kernel_modules"]}))
    try:
        ctr = rt.create("mods", bundle, work)
        ctr.wait_created()
        rt("start", "mods", check=True)
        assert ctr.result()["status"] == 0
        out = ctr.output()[0]
        assert "dummy1" in out and "loop " in out, out
        rt("delete", "mods", check=True)
        bad = make_bundle(
            work / "mods-bad", busybox, ["true"], annotations={"org.vmpod.kernel_modules": "no_such_mod"}
        )
        res = rt("create", "--bundle", str(bad), "mods2")
        assert res.returncode == 1 and b"no_such_mod" in res.stderr
        assert not (rt.root / "mods2").exists()
    finally:
        config.unlink()


def test_boot_failure_fails_create_cleanly(rt: Runtime, busybox: Path, work: Path, clean: None) -> None:
    config = Path(rt.env["VMPOD_RUNTIME_CONFIG"])
    config.write_text(json.dumps({"boot_timeout": 0.2}))
    try:
        bundle = make_bundle(work / "noboot", busybox, ["true"])
        res = rt("create", "--bundle", str(bundle), "noboot")
        assert res.returncode == 1
        assert b"did not answer within 0.2s" in res.stderr and b"boot_timeout" in res.stderr
        assert not (rt.root / "noboot").exists()
    finally:
        config.unlink()
