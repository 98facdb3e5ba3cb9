"""The confined QEMU: what a process that runs guest code may see and do.

QEMU parses everything a hostile guest sends to its devices; a QEMU escape must
land in a process that can do as little as possible (Firecracker's jailer and
Kata's hardening are the models). Each layer and what it stops:

- **bubblewrap** (``bwrap``) builds a mount namespace on an empty tmpfs that
  holds only /usr read-only (QEMU, its libraries and firmware), the loader's
  cache, a minimal /dev, its own /proc, and read-only binds of the kernel, the
  initramfs and the disk images this VM boots. No /etc, /home, /root, /var, /run
  or /tmp of the host, no other sandbox's files, no sockets: QEMU gets its
  sockets, taps and console as inherited file descriptors (see driver.py), so it
  needs no writable path at all.
- New **pid, ipc, uts, net and cgroup namespaces**: no host process to signal or
  ptrace, no SysV IPC or abstract unix sockets of the host, no network but the
  tap it was handed. ``--die-with-parent``: it dies with the VM's owner.
- **An unprivileged uid**, one per sandbox (so two QEMUs cannot touch each
  other's files or processes), with no capabilities (bounding set empty),
  ``no_new_privs``, and no supplementary groups but /dev/kvm's when KVM is used.
  ``setpriv`` (util-linux) makes the switch inside the namespaces.
- **seccomp** by QEMU's own filter (``-sandbox``): no obsolete system calls, no
  set*id, no fork/exec, no scheduler/resource changes.

The jail needs root (to build namespaces and switch uids); vmpod runs as root.
``VMPOD_QEMU_JAIL=off`` turns the namespaces and the uid switch off (seccomp
stays): for debugging only, ``vmpod doctor`` says when it is off.
"""

from __future__ import annotations

import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

from vmpod.errors import HypervisorError

JAIL_ENV = "VMPOD_QEMU_JAIL"
# One uid (and gid) per sandbox, from a block far above any real user or
# subordinate-id range; a collision only makes two sandboxes' QEMUs share a uid.
UID_BASE = 0xF0000000
UID_SPAN = 1 << 24

SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
_SEARCH = ("/usr/bin", "/bin", "/usr/sbin", "/sbin")


@dataclass(frozen=True)
class Jail:
    """How one QEMU is confined: its uid/gid, extra groups and what it may open."""

    uid: int
    gid: int
    readable: tuple[Path, ...]  # files bound read-only at the same path
    writable: tuple[Path, ...] = ()  # files bound read-write (writable disks)
    devices: tuple[Path, ...] = ()  # device nodes (/dev/kvm, /dev/vhost-vsock)
    groups: tuple[int, ...] = ()  # supplementary groups (the devices' groups)


def jail_enabled() -> bool:
    """Whether QEMU runs jailed: root, and not turned off with ``VMPOD_QEMU_JAIL``."""
    value = os.environ.get(JAIL_ENV, "on").strip().lower()
    if value in ("0", "off", "no", "false"):
        return False
    if value not in ("1", "on", "yes", "true", ""):
        raise HypervisorError(f"{JAIL_ENV} must be 'on' or 'off', not {value!r}")
    return os.geteuid() == 0


def sandbox_uid(state_dir: Path) -> int:
    """The uid (and gid) of the QEMU of the sandbox kept in ``state_dir``."""
    return UID_BASE + zlib.crc32(str(state_dir).encode()) % UID_SPAN


def find_tool(name: str) -> str | None:
    for d in _SEARCH:
        cand = os.path.join(d, name)
        if os.access(cand, os.X_OK):
            return cand
    return shutil.which(name)


def missing_tools() -> list[str]:
    """The jail's tools this host lacks (Debian packages: bubblewrap, util-linux)."""
    return [t for t in ("bwrap", "setpriv") if find_tool(t) is None]


def make_jail(
    state_dir: Path,
    readable: tuple[Path, ...],
    writable: tuple[Path, ...] = (),
    devices: tuple[Path, ...] = (),
) -> Jail:
    """The jail of one sandbox's QEMU; every file must be usable by its uid."""
    uid = sandbox_uid(state_dir)
    for path in readable:
        _check_access(path, uid, write=False)
    for path in writable:
        _check_access(path, uid, write=True)
    groups = tuple(sorted({os.stat(d).st_gid for d in devices if os.path.exists(d)}))
    return Jail(uid, uid, readable, writable, devices, groups)


def _check_access(path: Path, uid: int, write: bool) -> None:
    """The unprivileged QEMU must be able to open ``path`` through the mode bits
    (other, since the uid owns nothing): say which file, not QEMU's EACCES."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise HypervisorError(f"cannot use {path} for the VM: {err.strerror}") from err
    need = 0o006 if write else 0o004
    if st.st_uid != uid and st.st_mode & need != need:
        what = "read-write" if write else "readable"
        raise HypervisorError(
            f"{path} is not {what} by the VM's unprivileged QEMU (mode {st.st_mode & 0o777:o})",
            hint=f"make it world-{'writable' if write else 'readable'}, or set {JAIL_ENV}=off to debug",
        )


def wrap_argv(jail: Jail, argv: list[str]) -> list[str]:
    """``argv`` (QEMU's) run inside ``jail``: bwrap builds the namespaces and the
    file view, setpriv drops to the jail's uid, no capabilities, no_new_privs.
    Both keep inherited fds open, so the caller's ``pass_fds`` reach QEMU."""
    bwrap, setpriv = find_tool("bwrap"), find_tool("setpriv")
    if bwrap is None or setpriv is None:
        raise HypervisorError(
            f"cannot confine QEMU: {', '.join(missing_tools())} not installed",
            hint=f"run the README set-up command (apt-get install bubblewrap), or set {JAIL_ENV}=off",
        )
    out = [
        bwrap,
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-net",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",  # no TIOCSTI into a terminal it never had anyway
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin",
        "--ro-bind",
        "/usr",
        "/usr",
        *_root_links(),
        "--ro-bind-try",
        "/etc/ld.so.cache",
        "/etc/ld.so.cache",
        "--proc",
        "/proc",  # its own pid namespace's: /dev/fd/N is how it opens the console
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
    ]
    # bwrap makes missing parents 0700 (root's): the unprivileged QEMU must
    # traverse them, and they hold nothing but the binds below
    for parent in _parents((*jail.readable, *jail.writable)):
        out += ["--perms", "0755", "--dir", str(parent)]
    for dev in jail.devices:
        out += ["--dev-bind-try", str(dev), str(dev)]
    for path in jail.readable:
        out += ["--ro-bind", str(path), str(path)]
    for path in jail.writable:
        out += ["--bind", str(path), str(path)]
    groups = ",".join(str(g) for g in jail.groups)
    out += [
        "--",
        setpriv,
        f"--reuid={jail.uid}",
        f"--regid={jail.gid}",
        f"--groups={groups}" if groups else "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
        *argv,
    ]
    return out


def _parents(paths: tuple[Path, ...]) -> list[Path]:
    """Every directory above ``paths`` that the jail's own tree does not have,
    outermost first."""
    have = {Path("/"), Path("/usr"), Path("/proc"), Path("/dev"), Path("/tmp")}
    found: set[Path] = set()
    for path in paths:
        found.update(p for p in path.parents if p not in have and not p.is_relative_to("/usr"))
    return sorted(found, key=lambda p: (len(p.parts), str(p)))


def _root_links() -> list[str]:
    """/bin, /lib, /lib64, /sbin as on the host: symlinks into /usr on a merged-/usr
    system (Debian 12), read-only binds where they are real directories."""
    out: list[str] = []
    for top in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(top):
            out += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            out += ["--ro-bind", top, top]
    return out
