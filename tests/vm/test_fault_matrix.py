"""Fault matrix (issue 11): a component killed (SIGKILL) at each stage of a
container's life, QEMU frozen for 30 s, a guest kernel panic.

After each fault, three things must hold:
  * the state reported is the truth (``rt_truth``): what `vmpod-runtime state` and
    `list` (or `vmpod ps -a`) say matches the processes that really run — a live
    status has its monitor, its QEMU and its file server, a stopped or missing
    container has none of them;
  * after the clean-up an engine would do (`delete --force`, `vmpod rm`), nothing
    is left behind (``assert_clean``: processes, sandbox and shared dirs, mounts,
    network attachments and namespaces, cgroups, temp dirs of the cache, the
    runtime's state);
  * the next command works: a container of the same id (or name) is made, runs
    and goes.

Already covered elsewhere, so not repeated here: `vmpod run` with its QEMU or
itself killed while running (test_faults.py), vmpod-runtime with its monitor or
QEMU killed while running (test_runtime.py), a failed start after the network
was attached (test_network_vmpod.py).

Each case boots its own VM (a fault may leave a VM unusable), plus one for the
next command. The right moment is found by polling a condition, never by
sleeping: QEMU appearing (boot), a blocking createRuntime hook (create), the
container's first output line (running), the exec'd process's first line
(exec), the delete command holding a connection to a frozen monitor (delete),
the image tool appearing in the cache's tmp/ (unpack).

Host resources are named after the container (cgroupsPath /vmpod-faults/<id>;
the bridge cases' own CNI network, namespace prefix and subnet), so the
"nothing left" checks see only this test's.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import TypeVar

import pytest
from bench.soak import (
    argv_of,
    cgroups_named,
    fd_count,
    mounts_below,
    netns_named,
    pids_naming,
    remove_cgroup_parents,
)

from tests.vm.conftest import VmFactory, VmpodRunner, leftovers, netns_prefix, qemu_pids, virtiofsd_pids
from tests.vm.test_runtime_support import Runtime, make_bundle, runtime_env
from vmpod.network import cni
from vmpod.paths import Paths

T = TypeVar("T")

LOOP = ["sh", "-c", "echo up; while true; do sleep 0.2; done"]
ALIVE = ("creating", "created", "running", "paused")
SETTLE = 30.0  # seconds a fault's consequences (teardowns, PDEATHSIG) may take
CGROUP_PARENT = "vmpod-faults"  # the containers' host cgroups: /vmpod-faults/<id>
FREEZE = 30.0  # how long QEMU stays SIGSTOPped: the fault itself, not a synchronisation


def wait_until(what: str, cond: Callable[[], T], timeout: float = 120) -> T:
    """Poll ``cond`` until it returns something true; fail saying ``what`` if it never does."""
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return got


def vm_pids(run: Path) -> list[int]:
    """The QEMU processes serving below ``run`` themselves, not the jail (bwrap)
    around them, whose argv names QEMU and the run dir too."""
    return [
        p for p in qemu_pids(str(run)) if Path(argv_of(p).split(" ", 1)[0]).name.startswith("qemu-system")
    ]


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    if pid <= 0:  # (kill(0) would signal our own group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead (its parent may reap it late)
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- the shared "nothing left behind" checker -------------------------------------------


def what_is_left(paths: Paths, roots: tuple[Path, ...], token: str) -> list[str]:
    """Everything a fault may leave behind, described (empty: nothing)."""
    found = leftovers(paths)  # QEMU, virtiofsd, sandbox/shared dirs, mounts, CNI, cache tmp
    if procs := pids_naming(paths.run, *roots):
        found.append(f"processes naming the run dir or runtime root: {procs}")
    for root in roots:
        if left := [e.name for e in root.iterdir()] if root.is_dir() else []:
            found.append(f"runtime state left in {root}: {left}")
    if mounts := mounts_below(*roots):
        found.append(f"mounts below the runtime root: {mounts}")
    if cgroups := cgroups_named(token):
        found.append(f"cgroups left behind: {cgroups}")
    if netns := netns_named(token):
        found.append(f"network namespaces left behind: {netns}")
    return found


def assert_clean(paths: Paths, roots: tuple[Path, ...], token: str) -> None:
    """Nothing left behind, once the fault's consequences had SETTLE seconds to end."""
    deadline = time.monotonic() + SETTLE
    while (left := what_is_left(paths, roots, token)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], "left behind: " + "; ".join(left)


# -- vmpod-runtime --------------------------------------------------------------------


@dataclass
class RtCase:
    """One container of a vmpod-runtime case, its files in ``work``."""

    rt: Runtime
    paths: Paths
    work: Path
    cid: str

    def create(self, bundle: Path) -> subprocess.Popen[bytes]:
        """`create` as conmon runs it: its stdio (files here) become the container's."""
        with (
            open(self.work / f"{self.cid}.out", "wb") as out,
            open(self.work / f"{self.cid}.err", "wb") as err,
        ):
            return subprocess.Popen(
                self.rt.argv("create", "--bundle", str(bundle), "--pid-file", str(self.pid_file), self.cid),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.rt.env,
            )

    def bundle(
        self, name: str, busybox: Path, args: list[str], hooks: dict[str, object] | None = None
    ) -> Path:
        """make_bundle's, with a host cgroup named after the container (podman's way)."""
        made = make_bundle(self.work / name, busybox, args, hooks=hooks or {})
        spec = json.loads((made / "config.json").read_text())
        spec["linux"]["cgroupsPath"] = f"/{CGROUP_PARENT}/{self.cid}"
        (made / "config.json").write_text(json.dumps(spec))
        return made

    @property
    def pid_file(self) -> Path:
        return self.work / f"{self.cid}.pid"

    def output(self) -> str:
        return (self.work / f"{self.cid}.out").read_text()

    def created(self, proc: subprocess.Popen[bytes]) -> int:
        proc.wait(180)
        assert proc.returncode == 0, (self.work / f"{self.cid}.err").read_text()
        return int(self.pid_file.read_text())

    def running(self, bundle: Path) -> int:
        """Create and start a LOOP container; its monitor's pid once it printed."""
        monitor = self.created(self.create(bundle))
        self.rt("start", self.cid, check=True)
        wait_until("the container's first line", lambda: "up\n" in self.output())
        return monitor

    def monitor(self) -> int:
        try:
            pid = int(json.loads((self.rt.root / self.cid / "state.json").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return 0
        return pid if pid > 0 and alive(pid) else 0

    def helpers(self) -> list[int]:
        run = str(self.paths.run)
        return [p for p in qemu_pids(run) + virtiofsd_pids(run) if alive(p)]

    def vm_up(self) -> bool:
        """One QEMU and its file server (virtiofsd: a process or two) run."""
        run = str(self.paths.run)
        return len([p for p in vm_pids(self.paths.run) if alive(p)]) == 1 and any(
            alive(p) for p in virtiofsd_pids(run)
        )


def rt_truth(case: RtCase) -> str:
    """Wait until what `state` and `list` say is what runs (bounded); the status."""
    deadline = time.monotonic() + SETTLE
    seen = ""
    while True:
        res = case.rt("state", case.cid)
        listed = json.loads(case.rt("list", "--format", "json", check=True).stdout or b"[]")
        in_list = {c["id"]: c["status"] for c in listed}
        if res.returncode != 0:
            assert b"does not exist" in res.stderr, res.stderr
            status = ""
        else:
            st = json.loads(res.stdout)
            status = str(st["status"])
        helpers = case.helpers()
        if in_list.get(case.cid, "") != status:  # (it changed between the two: look again)
            ok = False
            seen = f"state says {status or 'gone'}, list says {in_list.get(case.cid, 'gone')}"
        elif status in ALIVE:
            monitor = int(st["pid"])
            # a live container has its monitor, its QEMU and its file server
            ok = alive(monitor) and case.vm_up()
            seen = f"{status}: monitor {monitor} alive={alive(monitor)}, helpers {helpers}"
        else:
            ok = not helpers and not case.monitor()
            seen = f"{status or 'gone'}: helpers {helpers}, monitor {case.monitor()}"
        if ok:
            break
        assert time.monotonic() < deadline, f"the reported state is not the truth after {SETTLE}s: {seen}"
        time.sleep(0.1)
    if status == "running":  # and it works
        res = case.rt("exec", case.cid, "echo", "still-here", timeout=60)
        assert (res.returncode, res.stdout) == (0, b"still-here\n"), res.stderr
    return status


def rt_recover_and_reuse(case: RtCase, busybox: Path) -> None:
    """What an engine does after a failure (delete --force), nothing left, then the
    same id again: create, start, exit 0, delete."""
    res = case.rt("delete", "--force", case.cid)
    assert res.returncode == 0, res.stderr
    assert_clean(case.paths, (case.rt.root,), case.cid)
    again = RtCase(case.rt, case.paths, case.work / "again", case.cid)
    again.work.mkdir()
    bundle = again.bundle("bundle", busybox, ["sh", "-c", "echo again"])
    proc = again.create(bundle)
    again.created(proc)
    case.rt("start", case.cid, check=True)
    wait_until("the container to stop", lambda: case.rt.state(case.cid)["status"] == "stopped", 60)
    assert again.output() == "again\n"
    assert case.rt.state(case.cid).get("exitStatus") == 0
    case.rt("delete", case.cid, check=True)
    assert_clean(case.paths, (case.rt.root,), case.cid)


@pytest.fixture
def rtcase(vm_factory: VmFactory, tmp_path: Path) -> Iterator[RtCase]:
    paths = vm_factory.paths
    root = paths.run / "rtroot"  # below the run dir: the factory reaps what a case leaves
    rt = Runtime(root, runtime_env(paths, tmp_path / "runtime.json"), tmp_path / "log.json")
    case = RtCase(rt, paths, tmp_path, "fm-" + secrets.token_hex(4))
    yield case
    for cid in rt("list", "--quiet").stdout.decode().split():
        rt("delete", "--force", cid)
    remove_cgroup_parents(CGROUP_PARENT)


def _target(case: RtCase, target: str, cli: subprocess.Popen[bytes] | None) -> int:
    if target == "cli":
        assert cli is not None and cli.poll() is None, "the command ended before the fault"
        return cli.pid
    if target == "monitor":
        return wait_until("the monitor", case.monitor, 10)
    if target == "qemu":
        [qemu] = vm_pids(case.paths.run)
        return qemu
    # virtiofsd serves from a sandboxed child of the process the monitor started:
    # the worker is the file server that crashes
    pids = virtiofsd_pids(str(case.paths.run))
    workers = [p for p in pids if _ppid(p) in pids]
    assert len(workers) == 1 or len(pids) == 1, f"virtiofsd: {pids}"
    return workers[0] if workers else pids[0]


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _hooks(work: Path) -> tuple[dict[str, object], Path, Path]:
    """A createRuntime hook that says it runs (``mark``) and blocks until ``go`` exists."""
    mark, go = work / "hook-runs", work / "hook-go"
    script = work / "hook.sh"
    script.write_text(f"#!/bin/sh\ntouch {mark}\nwhile [ ! -e {go} ]; do sleep 0.05; done\n")
    script.chmod(0o755)
    return {"createRuntime": [{"path": str(script), "args": ["hook.sh"], "timeout": 300}]}, mark, go


RUNTIME_MATRIX = [
    ("boot", "cli"),
    ("boot", "monitor"),
    ("boot", "qemu"),
    ("boot", "virtiofsd"),
    ("create", "cli"),
    ("create", "monitor"),
    ("create", "qemu"),
    ("create", "virtiofsd"),
    ("running", "virtiofsd"),
    ("exec", "cli"),
    ("exec", "monitor"),
    ("exec", "qemu"),
    ("exec", "virtiofsd"),
    ("delete", "cli"),
    ("delete", "monitor"),
    ("delete", "qemu"),
]


@pytest.mark.parametrize(("stage", "target"), RUNTIME_MATRIX, ids=[f"{s}-{t}" for s, t in RUNTIME_MATRIX])
def test_runtime_component_killed(rtcase: RtCase, busybox: Path, stage: str, target: str) -> None:
    """vmpod-runtime: ``target`` (the command of that stage — create, exec, delete —,
    the monitor, QEMU, virtiofsd) gets SIGKILL at ``stage``."""
    case = rtcase
    hooks, mark, go = _hooks(case.work)
    bundle = case.bundle("bundle", busybox, LOOP, hooks=hooks if stage == "create" else {})
    cli: subprocess.Popen[bytes] | None = None
    frozen = 0
    if stage in ("boot", "create"):
        cli = case.create(bundle)
        if stage == "boot":
            # QEMU (and its file server) run, the agent has not answered yet
            wait_until("QEMU", lambda: case.vm_up() and not case.pid_file.exists())
        else:
            wait_until("the createRuntime hook", mark.exists)
    else:
        case.running(bundle)
        if stage == "exec":
            out = case.work / "exec.out"
            with open(out, "wb") as fh:
                cli = subprocess.Popen(
                    case.rt.argv("exec", case.cid, "sh", "-c", "echo in-exec; exec sleep 600"),
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.DEVNULL,
                    env=case.rt.env,
                )
            wait_until("the exec'd process", lambda: "in-exec" in out.read_text())
        elif stage == "delete":
            # a frozen monitor holds delete in its request: the moment to strike
            frozen = case.monitor()
            os.kill(frozen, signal.SIGSTOP)
            cli = subprocess.Popen(
                case.rt.argv("delete", "--force", case.cid),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=case.rt.env,
            )
            pid = cli.pid
            wait_until(
                "delete's connection to the monitor",
                lambda: any(link.startswith("socket:") for link in _fd_links(pid)),
            )
    victim = _target(case, target, cli)
    kill9(victim)
    go.touch()  # a blocked hook may go on (its create was killed, or failed)
    if frozen and alive(frozen):
        os.kill(frozen, signal.SIGCONT)
    if cli is not None and target != "cli":
        # the command in progress ends (with an error or not), it does not hang
        try:
            cli.wait(120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{stage}: the command hung after {target} was killed") from None
        if stage == "delete":
            assert cli.returncode == 0, cli.stderr.read() if cli.stderr else ""  # --force never fails
        elif stage == "boot":
            assert cli.returncode != 0, "create succeeded although its VM was killed"
    elif cli is not None:
        cli.wait(10)
        if stage == "boot":  # its monitor boots on, finds create gone, and ends the container
            monitor = case.monitor()
            wait_until("the monitor to notice create went away", lambda: not alive(monitor))
    if target in ("monitor", "qemu", "virtiofsd"):  # the container ends: noticed, and said
        wait_until(
            f"the container to end after {target} died", lambda: _status(case) in ("stopped", ""), SETTLE
        )
    status = rt_truth(case)
    if target in ("monitor", "qemu", "virtiofsd") or stage == "boot":
        assert status in ("stopped", ""), f"{target} killed at {stage}: the container is {status}"
    elif stage == "exec":  # the exec command's death is no concern of the container
        assert status == "running", status
    rt_recover_and_reuse(case, busybox)


def _status(case: RtCase) -> str:
    res = case.rt("state", case.cid)
    return str(json.loads(res.stdout)["status"]) if res.returncode == 0 else ""


def _fd_links(pid: int) -> list[str]:
    """What ``pid``'s open fds point to (fds closed meanwhile are skipped)."""
    links = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for fd in fds:
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return links


def test_runtime_qemu_frozen_for_30s(rtcase: RtCase, busybox: Path) -> None:
    """QEMU SIGSTOPped for 30 s, then SIGCONT: the runtime keeps answering meanwhile,
    and afterwards the container runs on (exec works) or ended cleanly."""
    case = rtcase
    case.running(case.bundle("bundle", busybox, LOOP))
    [qemu] = vm_pids(case.paths.run)
    monitor = case.monitor()
    fds = fd_count(monitor)
    os.kill(qemu, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        # the commands that do not need the guest answer while it is frozen
        assert case.rt.state(case.cid)["status"] == "running"
        assert case.cid in case.rt("list", "--quiet", check=True).stdout.decode().split()
        time.sleep(max(0.0, FREEZE - (time.monotonic() - t0)))
    finally:
        os.kill(qemu, signal.SIGCONT)
    status = rt_truth(case)
    assert status in ("running", "stopped"), status
    if status == "running":
        assert fd_count(monitor) == fds, "the monitor's fds changed across the freeze"
    rt_recover_and_reuse(case, busybox)


def test_runtime_guest_kernel_panic(rtcase: RtCase, busybox: Path) -> None:
    """A privileged container panics the guest kernel (sysrq c): the container ends
    as SIGKILLed (137, as runc's would with its kernel gone), nothing is left."""
    case = rtcase
    script = "echo up; echo c > /proc/sysrq-trigger; sleep 600"
    bundle = case.bundle("bundle", busybox, ["sh", "-c", script])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"].pop("readonlyPaths", None)  # /proc/sysrq-trigger writable, as --privileged
    spec["linux"].pop("maskedPaths", None)
    (bundle / "config.json").write_text(json.dumps(spec))
    monitor = case.created(case.create(bundle))
    case.rt("start", case.cid, check=True)
    wait_until("the monitor to end", lambda: not alive(monitor), 120)
    assert rt_truth(case) == "stopped"
    assert case.rt.state(case.cid).get("exitStatus") == 128 + signal.SIGKILL
    rt_recover_and_reuse(case, busybox)


# -- vmpod ----------------------------------------------------------------------------


def _vmpod_clean(vmpod: VmpodRunner, token: str) -> None:
    assert_clean(vmpod.paths, (vmpod.paths.run / "runtime",), token)


def test_vmpod_run_killed_while_unpacking(vmpod: VmpodRunner, busybox: Path, tmp_path: Path) -> None:
    """`vmpod run --rootfs` killed while its image tool (mkfs.erofs) builds the root
    image in the cache's tmp/: the tool goes with vmpod (it is frozen first, so
    only its death can end it), no half image is taken for a whole one, and the
    next run works and collects the temp dir."""
    rootfs = tmp_path / "rootfs"
    subprocess.run(["cp", "-a", f"{busybox}/.", str(rootfs)], check=True)
    with open(rootfs / "bulk", "wb") as fh:  # incompressible: the image build takes a while
        for _ in range(64):
            fh.write(os.urandom(1 << 20))
    tmp, disks = vmpod.paths.tmp, vmpod.paths.images / "disks"
    disks_before = set(disks.glob("*.erofs"))  # (not the hidden use records of the pruner)
    proc = vmpod.popen(
        "run", "--network", "none", "--rootfs", str(rootfs), "--", "true", stdout=subprocess.DEVNULL
    )
    [tool] = wait_until("the image tool working in the cache's tmp/", lambda: pids_naming(tmp))
    os.kill(tool, signal.SIGSTOP)
    proc.kill()
    proc.wait(30)
    deadline = time.monotonic() + 5
    while alive(tool) and time.monotonic() < deadline:
        time.sleep(0.05)
    orphan = argv_of(tool)[:80] if alive(tool) else ""
    if orphan:  # (ended here, so the rest is checked all the same)
        os.kill(tool, signal.SIGKILL)
    half = set(disks.glob("*.erofs")) - disks_before  # checked last, as the orphan
    r = vmpod.run("--network", "none", "--rootfs", str(rootfs), "--", "sh", "-c", "wc -c < /bulk")
    assert r.returncode == 0, r.err
    assert r.out.strip() == str(64 << 20)
    _vmpod_clean(vmpod, "fm-none")
    assert not half, f"a half-built image is in the cache: {half}"
    assert not orphan, f"the image tool outlived the vmpod that ran it: {orphan}"


@pytest.mark.parametrize("target", ["vmpod", "qemu"])
def test_vmpod_run_killed_while_booting(vmpod: VmpodRunner, busybox: Path, target: str) -> None:
    """`vmpod run` or its QEMU killed while the VM boots: no QEMU outlives vmpod,
    a killed QEMU is one error line, and the next run works (and collects)."""
    proc = vmpod.popen(
        "run",
        "--network",
        "none",
        "--rootfs",
        str(busybox),
        "--",
        "true",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    [qemu] = wait_until("QEMU", lambda: vm_pids(vmpod.paths.run))
    kill9(proc.pid if target == "vmpod" else qemu)
    _, err = proc.communicate(timeout=120)
    if target == "qemu":
        assert proc.returncode == 125, err
        lines = [ln for ln in err.decode().splitlines() if ln.startswith("vmpod: error:")]
        assert len(lines) == 1, err
    wait_until("QEMU to go", lambda: not qemu_pids(str(vmpod.paths.run)), 10)
    r = vmpod.run("--network", "none", "--rootfs", str(busybox), "--", "echo", "next")
    assert (r.returncode, r.out) == (0, "next\n"), r.err
    _vmpod_clean(vmpod, "fm-none")


def _ps(vmpod: VmpodRunner, name: str) -> dict[str, object] | None:
    r = vmpod("ps", "-a", "--format", "json")
    assert r.returncode == 0, r.err
    rows = [row for row in json.loads(r.out) if row["name"] == name]
    return rows[0] if rows else None


@pytest.mark.parametrize(("stage", "target"), [("boot", "vmpod"), ("running", "monitor"), ("exec", "vmpod")])
def test_vmpod_named_container_killed(vmpod: VmpodRunner, busybox: Path, stage: str, target: str) -> None:
    """A named container (`vmpod run -d --name`): `vmpod run -d` killed while the VM
    boots, its monitor killed while it runs, `vmpod exec` killed while its process
    runs. `vmpod ps -a` tells the truth, `vmpod rm` leaves nothing, and the name
    can be used again."""
    name = "fm-" + secrets.token_hex(4)
    try:
        _named_case(vmpod, busybox, stage, name)
    finally:  # a failed case must not leave its mounts to the next tests' checks
        vmpod("rm", "-f", name)


def _named_case(vmpod: VmpodRunner, busybox: Path, stage: str, name: str) -> None:
    args = ("run", "-d", "--name", name, "--network", "none", "--rootfs", str(busybox))
    if stage == "boot":
        proc = vmpod.popen(*args, "--", "sleep", "600", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until("QEMU", lambda: qemu_pids(str(vmpod.paths.run)))
        kill9(proc.pid)
        proc.wait(30)
    else:
        r = vmpod(*args, "--", "sleep", "600")
        assert r.returncode == 0, r.err
        if stage == "running":
            info = json.loads(vmpod("inspect", name).out)[0]
            kill9(int(info["state"]["monitor_pid"]))
        else:
            proc = vmpod.popen(
                "exec", name, "sh", "-c", "echo in-exec; exec sleep 600", stdout=subprocess.PIPE
            )
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"in-exec\n"
            kill9(proc.pid)
            proc.wait(30)
    # the truth: a live status has its VM, an exited one none
    deadline = time.monotonic() + SETTLE
    while True:
        row = _ps(vmpod, name)
        assert row is not None, f"{name} is not listed"
        helpers = qemu_pids(str(vmpod.paths.run))
        if row["state"] in ("running", "created") and helpers or row["state"] == "exited" and not helpers:
            break
        assert time.monotonic() < deadline, f"ps says {row['state']} with QEMU {helpers}"
        time.sleep(0.1)
    if stage == "running":
        assert row["state"] == "exited" and row["exit_code"] == 128 + signal.SIGKILL, row
    if stage == "exec":
        assert row["state"] == "running", row
        r = vmpod("exec", name, "echo", "still-here")
        assert (r.returncode, r.out) == (0, "still-here\n"), r.err
    r = vmpod("rm", "-f", name)
    assert r.returncode == 0, r.err
    assert _ps(vmpod, name) is None
    _vmpod_clean(vmpod, name)
    r = vmpod("run", "--name", name, "--network", "none", "--rootfs", str(busybox), "--", "echo", "again")
    assert (r.returncode, r.out) == (0, "again\n"), r.err
    assert vmpod("rm", name).returncode == 0
    _vmpod_clean(vmpod, name)


@pytest.fixture
def bridged(vmpod: VmpodRunner) -> Iterator[tuple[VmpodRunner, str]]:
    """``vmpod`` on a CNI bridge network of this test's own (its subnet and bridge
    tell its iptables rules apart from other vmpods'); the subnet's prefix."""
    prefix = netns_prefix(vmpod.paths)
    n = int(hashlib.sha256(str(vmpod.paths.run).encode()).hexdigest()[:4], 16) % 250 + 1
    bridge, subnet = prefix.rstrip("-")[:15], f"10.252.{n}."
    network = cni.BridgeNetwork(
        data_dir=vmpod.paths.run / "cni" / "ipam", bridge=bridge, subnet=IPv4Network(subnet + "0/24")
    )
    conf = vmpod.paths.home / "net.d"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / cni.CONF_NAME).write_text(json.dumps(network.conflist()))
    try:
        yield vmpod, subnet
    finally:
        (conf / cni.CONF_NAME).unlink()
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)


def _rules(subnet: str) -> list[str]:
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if subnet in line and "-A" in line]


@pytest.mark.parametrize("target", ["vmpod", "qemu"])
def test_vmpod_run_on_a_network_killed_while_booting(
    bridged: tuple[VmpodRunner, str], busybox: Path, target: str
) -> None:
    """`vmpod run --network bridge` or its QEMU killed while the VM boots, with the
    network attached: the next run works, and afterwards no namespace, tap, lease,
    attachment or iptables rule of the killed run is left."""
    vmpod, subnet = bridged
    proc = vmpod.popen(
        "run", "--rootfs", str(busybox), "--", "true", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    [qemu] = wait_until("QEMU", lambda: vm_pids(vmpod.paths.run))
    assert netns_named(netns_prefix(vmpod.paths)), "the VM boots without its network namespace"
    kill9(proc.pid if target == "vmpod" else qemu)
    proc.communicate(timeout=120)
    wait_until("QEMU to go", lambda: not qemu_pids(str(vmpod.paths.run)), 10)
    r = vmpod.run("--rootfs", str(busybox), "--", "echo", "next")
    assert (r.returncode, r.out) == (0, "next\n"), r.err
    _vmpod_clean(vmpod, netns_prefix(vmpod.paths))
    assert _rules(subnet) == [], "iptables rules left behind"
