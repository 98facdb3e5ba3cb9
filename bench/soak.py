#!/usr/bin/env python3
"""Soak: N create/start/exec/delete cycles through vmpod-runtime, two at a time, and
what they leaked, per resource (issue 11). Not a timed test: it prints counts.

One cycle, on a fresh container id: `create` (a VM boots), `start`, `exec` (its
output checked), `kill KILL`, wait until `state` says stopped, `delete`; and one
`exec` into the *anchor*, a container that lives through the whole soak, so its
long-lived processes (its monitor, its QEMU) see every cycle's exec.

Measured before the cycles (after a warm-up cycle) and after them:
  processes      processes whose argv names the run dir or the runtime root
                 (monitors, QEMU, virtiofsd), the anchor's excepted
  runtime root   entries in the runtime's --root
  sandboxes / shared / run dir   entries in the run dir's sandbox and shared dirs,
                 and in the run dir itself
  mounts         mount points below the run dir, the cache home or the root
  cache tmp / cache disk   entries in the cache's tmp/, bytes of the cache home
  cgroups / netns   cgroup directories and network namespaces named after this
                 soak's container ids
  anchor monitor fds / RSS, anchor QEMU fds   the long-lived processes
Every leak must be 0 (RSS: growth beyond RSS_SLACK_KIB, the allocator's noise);
the script exits 1 when one is not, or when a cycle failed. After the anchor is
deleted, nothing of the soak may remain at all.

The command line gives the soak a private cache home (hard links of the built
guest assets) and run dir in a temporary directory; `soak()` is what the CI's
20-cycle VM test (tests/vm/test_soak.py) calls with its own.

Usage (as root): .venv/bin/python bench/soak.py [--cycles 200] [--parallel 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vmpod.storage.usage import disk_usage

REPO = Path(__file__).resolve().parents[1]
RUNTIME = Path(sys.executable).parent / "vmpod-runtime"
LOOP = ["sh", "-c", "echo up; while true; do sleep 1; done"]
RSS_SLACK_KIB = 4096  # a Python process's RSS moves by this much without leaking
SETTLE = 30.0  # seconds teardowns may take to finish after the last cycle


# -- what is there (shared with the fault matrix, tests/vm/test_fault_matrix.py) --------


def argv_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pids_naming(*markers: Path) -> list[int]:
    """Other processes whose argv names one of ``markers`` or a path below it."""
    names = [str(m).rstrip("/") for m in markers]
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            argv = argv_of(int(d.name)) + " "
            if any(f"{n}/" in argv or f"{n} " in argv for n in names):
                found.append(int(d.name))
    return found


def cgroups_named(token: str) -> list[str]:
    """Cgroup directories (any hierarchy) whose name contains ``token``."""
    found = []
    for dirpath, dirs, _files in os.walk("/sys/fs/cgroup"):
        for d in dirs:
            if token in d:
                found.append(os.path.join(dirpath, d))
    return found


def remove_cgroup_parents(name: str) -> None:
    """rmdir the (empty) cgroups called ``name`` in every hierarchy: the parents the
    containers' cgroupsPath made, which a runtime leaves (as runc does)."""
    for path in cgroups_named(name):
        if os.path.basename(path) == name:
            with contextlib.suppress(OSError):
                os.rmdir(path)


def netns_named(token: str) -> list[str]:
    """Named network namespaces (ip netns) whose name contains ``token``."""
    try:
        return sorted(n for n in os.listdir("/run/netns") if token in n)
    except FileNotFoundError:
        return []


def mounts_below(*roots: Path) -> list[str]:
    """Mount points below (or at) one of ``roots``."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if any(point == str(r) or point.startswith(str(r).rstrip("/") + "/") for r in roots):
            points.append(point)
    return points


def entries(d: Path) -> list[str]:
    try:
        return sorted(os.listdir(d))
    except FileNotFoundError:
        return []


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def descendants(pid: int) -> list[int]:
    """``pid``'s children, theirs, and so on."""
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in descendants(k)]


def qemu_of(pid: int) -> list[int]:
    """The QEMU processes below ``pid`` (through a jail such as bwrap, whose argv
    names QEMU too: the process whose own program is QEMU)."""
    return [d for d in descendants(pid) if Path(argv_of(d).split(" ", 1)[0]).name.startswith("qemu-system")]


# -- the runtime ----------------------------------------------------------------------


@dataclass(frozen=True)
class SoakEnv:
    """Where the soak runs: the cache home and run dir vmpod-runtime gets, its
    --root, and a work dir for the bundle and logs."""

    home: Path
    run: Path
    work: Path
    rootfs: Path  # a busybox tree (shared read-only by every container)

    @property
    def root(self) -> Path:
        return self.work / "rtroot"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "VMPOD_HOME": str(self.home),
            "VMPOD_RUN": str(self.run),
            "VMPOD_RUNTIME_CONFIG": str(self.work / "runtime.json"),  # absent: the defaults
        }

    def rt(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
        """vmpod-runtime ARGS, its output captured. Not for `create`: its monitor
        keeps create's stdio (the container's) open, the pipes would never end."""
        return subprocess.run(
            [*self.argv, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=self.env,
        )

    @property
    def argv(self) -> list[str]:
        return [str(RUNTIME), "--root", str(self.root), "--log", str(self.work / "runtime.log")]

    def checked(self, *args: str, timeout: float = 180) -> bytes:
        res = self.rt(*args, timeout=timeout)
        if res.returncode != 0:
            raise SoakError(f"vmpod-runtime {' '.join(args)}: exit {res.returncode}: {res.stderr.decode()}")
        return res.stdout

    def create(self, bundle: Path, cid: str, timeout: float = 180) -> None:
        """`create`; the container's stdio: /dev/null, and a file for its stderr
        (create's errors land there too)."""
        err = self.work / f"{cid}.err"
        with open(err, "wb") as fh:
            res = subprocess.run(
                [*self.argv, "create", "--bundle", str(bundle), cid],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=fh,
                timeout=timeout,
                env=self.env,
            )
        if res.returncode != 0:
            raise SoakError(f"vmpod-runtime create {cid}: exit {res.returncode}: {err.read_text()}")
        err.unlink()


class SoakError(Exception):
    pass


def make_bundle(env: SoakEnv, cid: str, token: str) -> Path:
    """``cid``'s bundle: the shared read-only root, the loop as its process, and a
    host cgroup of its own (``/<token>/<cid>``, as podman's cgroupfs paths are)."""
    from vmpod.runtime.specgen import default_spec

    bundle = env.work / "bundles" / cid
    bundle.mkdir(parents=True, exist_ok=True)
    spec = default_spec()
    process, linux = spec["process"], spec["linux"]
    assert isinstance(process, dict) and isinstance(linux, dict)
    process.update(args=LOOP, terminal=False)
    linux["cgroupsPath"] = f"/{token}/{cid}"
    spec["root"] = {"path": str(env.rootfs), "readonly": True}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def status_of(env: SoakEnv, cid: str) -> str:
    res = env.rt("state", cid)
    if res.returncode != 0:
        return ""
    return str(json.loads(res.stdout)["status"])


def wait_status(env: SoakEnv, cid: str, want: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (got := status_of(env, cid)) != want:
        if time.monotonic() > deadline:
            raise SoakError(f"{cid}: still {got!r} after {timeout}s, not {want!r}")
        time.sleep(0.05)


def cycle(env: SoakEnv, token: str, cid: str, anchor: str) -> None:
    """create / start / exec / kill / delete of ``cid``, and one exec into the anchor."""
    bundle = make_bundle(env, cid, token)
    env.create(bundle, cid)
    try:
        env.checked("start", cid)
        out = env.checked("exec", cid, "sh", "-c", f"echo exec-{cid}")
        if out != f"exec-{cid}\n".encode():
            raise SoakError(f"{cid}: exec printed {out!r}")
        out = env.checked("exec", anchor, "echo", cid)
        if out != f"{cid}\n".encode():
            raise SoakError(f"anchor: exec printed {out!r}")
        env.checked("kill", cid, "KILL")
        wait_status(env, cid, "stopped")
        env.checked("delete", cid)
    except BaseException:
        env.rt("delete", "--force", cid)
        raise
    finally:
        shutil.rmtree(bundle, ignore_errors=True)


# -- measuring -----------------------------------------------------------------------


@dataclass
class Report:
    before: dict[str, int]
    after: dict[str, int]
    failures: list[str] = field(default_factory=list)
    left_at_end: list[str] = field(default_factory=list)  # after the anchor went too

    def leaks(self) -> dict[str, int]:
        out = {}
        for key, was in self.before.items():
            grew = self.after.get(key, -1) - was
            if key.endswith("RSS KiB"):
                grew = max(0, grew - RSS_SLACK_KIB)
            out[key] = grew
        return out

    @property
    def clean(self) -> bool:
        return not self.failures and not self.left_at_end and not any(self.leaks().values())

    def text(self) -> str:
        lines = [f"{'resource':<28}{'before':>14}{'after':>14}{'leak':>10}"]
        leaks = self.leaks()
        for key, was in self.before.items():
            lines.append(f"{key:<28}{was:>14}{self.after.get(key, -1):>14}{leaks[key]:>10}")
        lines.append(f"(RSS: growth beyond {RSS_SLACK_KIB} KiB counts as a leak)")
        lines += [f"cycle failed: {f}" for f in self.failures]
        lines += [f"left after the soak: {x}" for x in self.left_at_end]
        lines.append("no leaks" if self.clean else "LEAKS OR FAILURES (see above)")
        return "\n".join(lines)


def snapshot(env: SoakEnv, token: str, anchor_pids: tuple[int, int]) -> dict[str, int]:
    monitor, qemu = anchor_pids
    anchor = {monitor, *descendants(monitor)}
    return {
        "processes": len([p for p in pids_naming(env.run, env.root) if p not in anchor]),
        "runtime root entries": len(entries(env.root)),
        "sandbox dirs": len(entries(env.run / "sandboxes")),
        "shared dirs": len(entries(env.run / "shared")),
        "run dir entries": len(entries(env.run)),
        "mounts": len(mounts_below(env.run, env.home, env.root)),
        "cache tmp entries": len(entries(env.home / "tmp")),
        "cache disk bytes": disk_usage(env.home),
        "cgroups": len(cgroups_named(f"{token}-")),  # the containers' (not their parent)
        "netns": len(netns_named(token)),
        "anchor monitor fds": fd_count(monitor),
        "anchor monitor RSS KiB": rss_kib(monitor),
        "anchor QEMU fds": fd_count(qemu),
    }


def leftovers(env: SoakEnv, token: str) -> list[str]:
    """What must not exist once every container of the soak is deleted."""
    checks: list[tuple[str, Callable[[], list[str]]]] = [
        ("processes", lambda: [argv_of(p)[:100] for p in pids_naming(env.run, env.root)]),
        ("runtime root", lambda: entries(env.root)),
        ("sandbox dirs", lambda: entries(env.run / "sandboxes")),
        ("shared dirs", lambda: entries(env.run / "shared")),
        ("mounts", lambda: mounts_below(env.run, env.home, env.root)),
        ("cache tmp", lambda: entries(env.home / "tmp")),
        ("cgroups", lambda: cgroups_named(f"{token}-")),
        ("netns", lambda: netns_named(token)),
    ]
    deadline = time.monotonic() + SETTLE
    while True:
        found = [f"{name}: {what}" for name, fn in checks if (what := fn())]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _settle(env: SoakEnv, token: str, anchor_pids: tuple[int, int], baseline: dict[str, int]) -> None:
    """Wait (bounded) until the last teardowns finished: processes back to the baseline."""
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:
        now = snapshot(env, token, anchor_pids)
        if (
            now["processes"] <= baseline["processes"]
            and now["runtime root entries"] <= baseline["runtime root entries"]
        ):
            return
        time.sleep(0.1)


def soak(
    env: SoakEnv, cycles: int = 200, parallel: int = 2, progress: Callable[[str], None] = print
) -> Report:
    """Run the cycles; returns what each resource leaked (see the module's doc)."""
    token = "soak" + secrets.token_hex(3)
    anchor = f"{token}-anchor"
    env.create(make_bundle(env, anchor, token), anchor)
    try:
        env.checked("start", anchor)
        st = json.loads(env.checked("state", anchor))
        monitor = int(st["pid"])
        qemus = qemu_of(monitor)
        if len(qemus) != 1:
            raise SoakError(f"the anchor's monitor {monitor} has QEMU processes {qemus} below it")
        pids = (monitor, qemus[0])
        cycle(env, token, f"{token}-warm", anchor)  # first exec paths, caches, imports
        before = snapshot(env, token, pids)
        failures: list[str] = []
        t0 = time.monotonic()

        def one(i: int) -> None:
            cid = f"{token}-{i}"
            try:
                cycle(env, token, cid, anchor)
            except (SoakError, subprocess.TimeoutExpired, OSError, ValueError) as err:
                failures.append(f"{cid}: {err}")
            if (i + 1) % 10 == 0:
                progress(f"{i + 1}/{cycles} cycles, {time.monotonic() - t0:.0f}s")

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            list(pool.map(one, range(cycles)))
        _settle(env, token, pids, before)
        after = snapshot(env, token, pids)
    finally:
        env.rt("delete", "--force", anchor)
        remove_cgroup_parents(token)
    return Report(before, after, failures, leftovers(env, token))


# -- command line ----------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    if args.cycles < 1 or args.parallel < 1:
        parser.error("--cycles and --parallel must be at least 1")
    if os.geteuid() != 0:
        print("soak.py: run as root (VMs, mounts)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from tests.vm.conftest import seed_home

    from vmpod.paths import default_paths

    tmp = Path(tempfile.mkdtemp(prefix="vmpod-soak-", dir="/var/tmp"))
    try:
        home, run, work = tmp / "home", tmp / "run", tmp / "work"
        for d in (home, run, work):
            d.mkdir()
        seed_home(default_paths().home, home)
        rootfs = tmp / "busybox"
        subprocess.run([str(REPO / "scripts/busybox-rootfs.sh"), str(rootfs)], check=True)
        env = SoakEnv(home=home, run=run, work=work, rootfs=rootfs)
        print(f"soak: {args.cycles} cycles, {args.parallel} at a time, in {tmp}", flush=True)
        report = soak(env, args.cycles, args.parallel, lambda m: print(m, flush=True))
        print(report.text())
        return 0 if report.clean else 1
    finally:
        if not mounts_below(tmp):  # never delete through a mount
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
