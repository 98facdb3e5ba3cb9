"""Out-of-tree module builds against one kernel's headers (kbuild ``M=``), in a
bubblewrap sandbox.

A module's Makefile is foreign code (a pull request the matrix tests in CI). It
runs as uid/gid 65534 with no capabilities and no_new_privs, in its own mount,
pid, ipc, uts, net and cgroup namespaces: the toolchain (/usr) and the headers
are read-only, /tmp is private, and only the build dir is writable. Killing
bwrap ends its pid namespace, so nothing the Makefile left in the background
outlives the build (or holds the log pipe).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from vmpod.errors import ConfigError
from vmpod.matrix.capped import CappedOutput

BUILD_TIMEOUT = 600.0
SANDBOX_ID = 65534  # nobody/nogroup: owns nothing on the host
_LOG_HEAD = 512 << 10  # the first errors are what the report shows
_LOG_TAIL = 512 << 10
_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/tmp",
    "LC_ALL": "C",  # first_error() reads gcc's English ": error:"
    "TMPDIR": "/tmp",
}
# Host files the toolchain reads besides /usr (awk etc. are alternatives links).
_ETC = ("/etc/alternatives", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d")
_READ_ONLY_HINT = (
    "vmpod: the build tried to write outside its build dir; the headers and the "
    "toolchain are read-only in the build sandbox (see build.log)"
)


@dataclass(frozen=True)
class BuildResult:
    ok: bool
    modules: tuple[Path, ...]  # built .ko files
    log: str
    seconds: float


def require_bwrap() -> str:
    """bwrap's path, or the one-line error that says how to get it."""
    found = shutil.which("bwrap")
    if found is None:
        raise ConfigError(
            "vmpod matrix builds modules in a bubblewrap sandbox, and bwrap is not installed",
            hint="apt-get install bubblewrap",
        )
    return found


def headers_root(headers: Path) -> Path:
    """The tree to mount for ``headers``: Debian's kbuild dir includes its
    ``-common`` sibling and links into ``usr/lib/linux-kbuild-*``, so a cached
    ``PREFIX/usr/src/linux-headers-REL`` needs all of PREFIX."""
    headers = headers.resolve()
    if headers.parent.name == "src" and headers.parent.parent.name == "usr":
        prefix = headers.parent.parent.parent
        if prefix != Path("/"):  # the host's /usr is mounted anyway
            return prefix
    return headers


_INCLUDE = re.compile(r"^\s*-?include\s+(/\S+)", re.MULTILINE)


def headers_roots(headers: Path) -> list[Path]:
    """Every tree the build reads headers from: ``headers`` and the trees its
    Makefile includes by absolute path (a cached Debian kernel's includes its
    ``-common`` dir wherever the cache was when it was unpacked)."""
    roots = [headers_root(headers)]
    try:
        text = (headers / "Makefile").read_text(errors="replace")[:65536]
    except OSError:
        text = ""
    for found in _INCLUDE.findall(text):
        parent = Path(found).parent
        if parent.is_dir():
            root = headers_root(parent)
            if not any(root == r or r in root.parents for r in roots):
                roots.append(root)
    return [r for r in roots if not _in_usr(r)]  # /usr is mounted whole


def _in_usr(path: Path) -> bool:
    return path == Path("/usr") or Path("/usr") in path.parents


def sandbox_argv(bwrap: str, argv: list[str], *, work: Path, headers: Path) -> list[str]:
    """``argv`` inside bubblewrap: see the module docstring for what it may touch."""
    out = [bwrap, "--die-with-parent", "--new-session"]
    out += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--unshare-cgroup-try"]
    out += ["--hostname", "vmpod-build"]
    out += ["--ro-bind", "/usr", "/usr"]
    for link in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        top = Path("/", link)
        if top.is_symlink():  # merged /usr: /lib -> usr/lib
            out += ["--symlink", os.readlink(top), str(top)]
        elif top.is_dir():
            out += ["--ro-bind", str(top), str(top)]
    etc = [Path(p) for p in _ETC if os.path.exists(p)]
    tops = headers_roots(headers)
    out += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
    # bwrap makes missing parents 0700: uid 65534 could not reach the mounts.
    parents = {d for p in (*etc, *tops, work) for d in p.parents if not _in_usr(d)}
    for d in sorted(str(d) for d in parents if str(d) not in ("/", "/tmp")):
        out += ["--perms", "0755", "--dir", d]
    for path in (*etc, *tops):
        out += ["--ro-bind", str(path), str(path)]
    out += ["--bind", str(work), str(work), "--chdir", str(work)]
    out += ["--clearenv"] + [x for k, v in _ENV.items() for x in ("--setenv", k, v)]
    if os.geteuid() == 0:
        # bwrap needs root to mount; setpriv then leaves uid 0 for good (the
        # kernel clears every capability on that change) before the Makefile runs.
        out += ["--", "setpriv", f"--reuid={SANDBOX_ID}", f"--regid={SANDBOX_ID}", "--clear-groups"]
        out += ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    else:
        out[1:1] = ["--unshare-user", "--uid", str(SANDBOX_ID), "--gid", str(SANDBOX_ID)]
        out += ["--"]
    return out + argv


def _prepare(src: Path, work: Path) -> None:
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(
        src,
        work,
        symlinks=True,
        ignore=shutil.ignore_patterns("*.ko", "*.o", "*.mod*", ".*.cmd", "Module.symvers"),
    )
    if os.geteuid() == 0:
        for path in (work, *work.rglob("*")):
            os.chown(path, SANDBOX_ID, SANDBOX_ID, follow_symlinks=False)


async def build_module(
    src: Path, headers: Path, work: Path, *, timeout: float = BUILD_TIMEOUT, sandbox: bool = True
) -> BuildResult:
    """Copy ``src`` into ``work`` and run ``make -C headers M=work modules`` in the sandbox.

    A compiler error is this kernel's build failure, not an error of the run.
    ``sandbox=False`` is for bench/matrix_ratio.py's measurement of its cost only.
    """
    bwrap = require_bwrap() if sandbox else ""
    t0 = time.monotonic()
    _prepare(src, work)
    argv = ["make", "-C", str(headers), f"M={work}", f"-j{os.cpu_count() or 1}", "modules"]
    full = sandbox_argv(bwrap, argv, work=work, headers=headers) if sandbox else argv
    proc = await asyncio.create_subprocess_exec(
        *full,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    out = CappedOutput(_LOG_HEAD, _LOG_TAIL, what="build output")
    assert proc.stdout is not None
    reader = asyncio.ensure_future(_drain(proc.stdout, out))
    timed_out = False
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        timed_out = True
    finally:
        _kill(proc)
        await proc.wait()
    # Everything in the sandbox died with bwrap; without it (bench only) a
    # leftover may hold the pipe: read what is there, never wait for it.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(reader), 2.0)
    reader.cancel()
    log = " ".join(argv) + "\n" + out.getvalue().decode(errors="replace")
    if timed_out:
        return BuildResult(False, (), log + f"\nbuild timed out after {timeout:g}s", time.monotonic() - t0)
    found = sorted(work.rglob("*.ko"))
    # Only regular files: a .ko symlink made in the sandbox would have vmpod
    # (root, outside it) ship a host file such as /etc/shadow into the guest.
    modules = tuple(p for p in found if stat.S_ISREG(p.lstat().st_mode))
    if len(modules) != len(found):
        log += "\nvmpod: ignored .ko files that are not regular files (symlinks): " + ", ".join(
            str(p.relative_to(work)) for p in found if p not in modules
        )
    ok = proc.returncode == 0 and bool(modules)
    if proc.returncode == 0 and not modules:
        log += "\nvmpod: the build produced no .ko file (is obj-m set in Kbuild/Makefile?)"
    if not ok and "Read-only file system" in log:
        log += "\n" + _READ_ONLY_HINT
    return BuildResult(ok, modules, log, time.monotonic() - t0)


async def _drain(stream: asyncio.StreamReader, out: CappedOutput) -> None:
    while chunk := await stream.read(65536):
        out.write(chunk)


def _kill(proc: asyncio.subprocess.Process) -> None:
    """End bwrap's whole process group; its pid namespace goes with it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def first_error(log: str, work: Path | None = None) -> str:
    """The first compiler error, preferring one in the module's own sources (with
    the build dir stripped), for the summary table."""
    errors = [ln.strip() for ln in log.splitlines() if ": error:" in ln]
    if work is not None:
        own = [ln.replace(f"{work}/", "") for ln in errors if ln.startswith(str(work))]
        errors = own or errors
    if errors:
        return errors[0][:200]
    lines = log.strip().splitlines()
    return lines[-1][:200] if lines else "build failed"
