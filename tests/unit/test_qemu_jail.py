"""The QEMU jail with real bubblewrap and setpriv, a shell standing in for QEMU:
what the confined process is, sees and can reach (QEMU's seccomp filter is
checked on a real QEMU by tests/vm/test_qemu_jail.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmpod.errors import HypervisorError
from vmpod.hypervisor.qemu import jail as jail_mod
from vmpod.hypervisor.qemu.jail import Jail, jail_enabled, make_jail, sandbox_uid, wrap_argv

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root (namespaces, a uid switch)"),
    pytest.mark.skipif(bool(jail_mod.missing_tools()), reason="no bubblewrap (scripts/setup.sh)"),
]

PROBE = r"""
set -u
echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"
grep -E '^(CapEff|CapBnd|CapPrm|NoNewPrivs):' /proc/self/status | tr -s '\t ' ' '
echo "pid=$$"
echo "ifaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\n' ' ')"
cat "$RO" >/dev/null && echo "ro-read=ok"
(echo x >> "$RO") 2>/dev/null && echo "ro-write=ok" || echo "ro-write=denied"
(echo x >> "$RW") 2>/dev/null && echo "rw-write=ok" || echo "rw-write=denied"
for p in /etc/shadow /etc/passwd /root /home /var/lib /run "$HIDDEN"; do
    [ -e "$p" ] && echo "visible=$p"
done
echo fd-works > "/dev/fd/$FD"  # as QEMU opens its console
kill -0 1 2>/dev/null && echo "init=signalable"
echo done
"""


def _probe(jail: Jail, tmp_path: Path, **env: str) -> dict[str, list[str]]:
    r, w = os.pipe()
    os.fchown(w, jail.uid, jail.gid)  # as the driver does for the console pipe
    argv = wrap_argv(jail, ["/bin/sh", "-c", PROBE])
    # the probe's variables: bwrap clears the environment, so pass them in argv
    setenv = [f"{k}={v}" for k, v in {**env, "FD": str(w)}.items()]
    at = argv.index("--", argv.index("--") + 1) + 1  # setpriv's "--": the command follows
    argv[at:at] = ["/usr/bin/env", *setenv]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, pass_fds=(w,))
    finally:
        os.close(w)
    with os.fdopen(r) as fh:
        fd_out = fh.read()
    assert proc.returncode == 0, proc.stderr
    out: dict[str, list[str]] = {"fd": fd_out.split()}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        out.setdefault(key.split(":")[0].strip(), []).append(value or line)
    return out


def test_confined_process_identity_and_view(tmp_path: Path) -> None:
    ro, rw, hidden = tmp_path / "kernel", tmp_path / "disk", tmp_path / "other-sandbox"
    ro.write_text("vmlinux")
    rw.write_text("disk")
    hidden.mkdir()
    ro.chmod(0o644)
    rw.chmod(0o666)
    state = tmp_path / "sandbox"
    jail = make_jail(state, readable=(ro,), writable=(rw,))
    out = _probe(jail, tmp_path, RO=str(ro), RW=str(rw), HIDDEN=str(hidden))
    uid = sandbox_uid(state)
    assert out["uid"] == [f"{uid} gid={uid} groups={uid}"]
    caps = {ln.split()[0]: ln.split()[1] for ln in _status_lines(out)}
    assert caps["CapEff:"] == caps["CapPrm:"] == caps["CapBnd:"] == "0000000000000000"
    assert caps["NoNewPrivs:"] == "1"
    assert out["pid"] != ["1"] and int(out["pid"][0]) < 10  # its own pid namespace
    assert out["ifaces"] == ["lo "]  # its own network namespace: loopback only
    assert out["ro-read"] == ["ok"] and out["ro-write"] == ["denied"]
    assert out["rw-write"] == ["ok"]
    assert "visible" not in out, out["visible"]  # host files and other sandboxes
    assert "init" not in out  # pid 1 (bwrap's reaper) is root's: not signalable
    assert out["fd"] == ["fd-works"]  # inherited fds (console, taps, sockets) pass through


def _status_lines(out: dict[str, list[str]]) -> list[str]:
    return [v for k, vs in out.items() if k.startswith(("Cap", "NoNewPrivs")) for v in vs]


def test_every_file_must_be_usable_by_the_unprivileged_uid(tmp_path: Path) -> None:
    private = tmp_path / "initramfs.cpio"
    private.write_text("x")
    private.chmod(0o600)
    with pytest.raises(HypervisorError, match=r"initramfs.cpio is not readable .*mode 600"):
        make_jail(tmp_path / "sb", readable=(private,))
    disk = tmp_path / "disk"
    disk.write_text("x")
    disk.chmod(0o644)
    with pytest.raises(HypervisorError, match="is not read-write"):
        make_jail(tmp_path / "sb", readable=(), writable=(disk,))
    with pytest.raises(HypervisorError, match="cannot use .*missing"):
        make_jail(tmp_path / "sb", readable=(tmp_path / "missing",))


def test_uid_per_sandbox_and_switch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    a, b = sandbox_uid(tmp_path / "a"), sandbox_uid(tmp_path / "b")
    assert a != b and min(a, b) >= jail_mod.UID_BASE
    monkeypatch.setenv(jail_mod.JAIL_ENV, "off")
    assert jail_enabled() is False
    monkeypatch.setenv(jail_mod.JAIL_ENV, "on")
    assert jail_enabled() is True
    monkeypatch.setenv(jail_mod.JAIL_ENV, "maybe")
    with pytest.raises(HypervisorError, match="must be 'on' or 'off'"):
        jail_enabled()


def test_missing_bwrap_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(jail_mod, "find_tool", lambda name: None)
    with pytest.raises(HypervisorError, match="bwrap, setpriv not installed") as err:
        wrap_argv(Jail(1, 1, ()), ["qemu"])
    assert "bubblewrap" in err.value.hint
