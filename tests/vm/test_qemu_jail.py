"""The confined QEMU of a real sandbox (hypervisor/qemu/jail.py): seccomp, no
capabilities, an unprivileged uid of its own, and a view of the host that holds
only what it boots."""

from __future__ import annotations

import os
from pathlib import Path

from tests.vm.conftest import VmFactory
from vmpod.hypervisor.qemu.jail import UID_BASE, sandbox_uid


def _qemu_of(run_dir: Path) -> list[int]:
    """QEMU processes (not their bwrap) of sandboxes below ``run_dir``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if comm.startswith("qemu-system") and any(f"{run_dir}/".encode() in a for a in argv):
            out.append(int(entry.name))
    return sorted(out)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in lines)}


def _sandbox_dir(pid: int) -> Path:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    name = argv[argv.index(b"-name") + 1].decode()
    return Path(name.removeprefix("guest="))


def test_qemu_is_confined(vm_factory: VmFactory, busybox: Path) -> None:
    vmpod = vm_factory()
    for name in ("a", "b"):
        r = vmpod.run("-d", "--name", name, "--rootfs", str(busybox), "--", "sleep", "1000")
        assert r.returncode == 0, r.err
    pids = _qemu_of(vmpod.paths.run)
    assert len(pids) == 2, pids
    uids = set()
    for pid in pids:
        st = _status(pid)
        uid = int(st["Uid"].split()[0])
        uids.add(uid)
        assert uid == sandbox_uid(_sandbox_dir(pid)) >= UID_BASE, st["Uid"]
        assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4
        assert st["Groups"] == ""
        assert st["CapEff"] == st["CapPrm"] == st["CapBnd"] == "0000000000000000"
        assert st["NoNewPrivs"] == "1"
        assert st["Seccomp"] == "2"  # QEMU's -sandbox filter
        for ns in ("net", "pid", "mnt", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        root = Path(f"/proc/{pid}/root")
        # nothing of the host but system software and what it boots
        for hidden in ("etc/shadow", "root", "home", "run", str(vmpod.paths.run).lstrip("/")):
            assert not (root / hidden).exists(), hidden
        home = root / str(vmpod.paths.home).lstrip("/")
        assert sorted(p.name for p in home.iterdir()) == ["guest", "kernels"]
        assert all(f.is_file() for f in (home / "guest").iterdir())  # images, no trees
    assert len(uids) == 2  # one uid per sandbox: no QEMU can touch another's
    # and the containers work through the inherited sockets, console and taps
    r = vmpod("exec", "a", "sh", "-c", "echo ok; ip -o link show eth0 | grep -c UP")
    assert (r.returncode, r.out.split()) == (0, ["ok", "1"]), r.err
    r = vmpod("logs", "a")
    assert r.returncode == 0, r.err
    r = vmpod("rm", "-f", "a", "b")
    assert r.returncode == 0, r.err
    assert _qemu_of(vmpod.paths.run) == []
