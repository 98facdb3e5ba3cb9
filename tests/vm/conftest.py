"""Fixtures for tests that boot real VMs (QEMU; TCG on hosts without usable KVM).

In the spirit of Firecracker's test framework:

* **Own cache home and run dir per session** (``paths``), so leak checks see only
  this session's work. The home is seeded from the normal cache (``VMPOD_HOME``,
  else /var/lib/vmpod) with hard links of ``kernels/`` and ``guest/`` (reflink or
  plain copies when the two are on different file systems); the normal cache is
  only read. Whatever it lacks (an empty cache on a fresh machine, a guest image
  for changed agent sources, another kernel) is built into the test home.
* **``vm_factory`` owns the VMs of one test**: it makes ``VmpodRunner``s that share
  the test's own run dir, tracks the processes they start, and at teardown kills
  what is still running (its ``vmpod`` processes, then any process whose argv names
  its run dir: QEMU, virtiofsd), by pid with SIGKILL, and checks that nothing is
  left (QEMU, sandbox dirs, mounts, temp dirs). ``vmpod`` is ``vm_factory()``.
* **Dimensions as fixtures**: a test that takes ``guest_kernel`` runs once per
  kernel in ``KERNELS``, one that takes ``guest_runtime`` once per runtime in
  ``GUEST_RUNTIMES``; it hands them to ``vm_factory(kernel=..., guest_runtime=...)``.
* **Logs of failed tests**: every test runs with ``VMPOD_KEEP_LOGS`` set to its own
  directory, ``<basetemp>/vm-logs/<test>/`` (module- and session-scoped fixtures get
  ``<basetemp>/vm-logs/_shared/``). The sandbox code honours it: when a sandbox
  stops (normally or not, before its state dir goes) it copies ``console.log`` and
  ``qemu.log`` into ``$VMPOD_KEEP_LOGS/<sandbox id>/``, best effort, creating the
  directories. When a test fails, the tails of its sandboxes' logs (kept ones, and
  those of sandboxes still running) are added to its report; a passing test's
  directory is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vmpod.guest.assets import GuestAssets, ensure_assets
from vmpod.guest.kernel import DEFAULT_KERNEL
from vmpod.paths import Paths, default_paths
from vmpod.proc import descendant_named

REPO = Path(__file__).resolve().parents[2]
VMPOD = [sys.executable, "-m", "vmpod.cli"]

KEEP_LOGS = "VMPOD_KEEP_LOGS"  # env: where a stopping sandbox copies its logs
SANDBOX_LOGS = ("console.log", "qemu.log")
SEEDED = ("kernels", "guest")  # cache dirs the test home gets from the normal one
UNSHARED_DIRS = "guest/tree-*/opt/vmpod"  # rewritten for a new guest image: copied, not linked
KERNELS = (DEFAULT_KERNEL, "6.12")  # the guest_kernel dimension
GUEST_RUNTIMES = ("runc", "crun")  # the guest_runtime dimension
TAIL_LINES = 40


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session", autouse=True)
def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "VM tests need root (guest asset builds use mknod/chroot); run ./scripts/test.sh with sudo"
        )


# -- the session's own cache home and run dir ---------------------------------------


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """Hold the normal cache's build lock (shared) so no build renames files while we
    link them; opened read-only, and not created: the normal cache is never written."""
    try:
        fd = os.open(cache / ".build.lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def seed_home(cache: Path, home: Path) -> list[str]:
    """Give ``home`` the guest assets already built in ``cache`` (kernels/, guest/),
    without building or changing anything in ``cache``; returns what was seeded.

    Same file system: hard links (no space, no time). Otherwise ``cp --reflink=auto``
    (copy-on-write where the file system can, a plain copy where it cannot). Links
    are safe because vmpod never rewrites a cached asset in place (builds write under
    tmp/ and rename; metadata goes through atomic_write); the parts it does rewrite
    (the agent dir of a guest tree, for a new guest image) and the JSON metadata are
    real copies all the same, so no writer in the test home can reach the cache.
    """
    # tmp/ as a built cache has it (rootfs.ensure_image assumes it exists)
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    names = [n for n in SEEDED if (cache / n).is_dir() and not (home / n).exists()]
    if not names:
        return []
    how = "--link" if cache.stat().st_dev == home.stat().st_dev else "--reflink=auto"
    with _cache_lock(cache):
        for name in names:
            subprocess.run(["cp", "-a", how, "--", str(cache / name), str(home / name)], check=True)
        for agent in home.glob(UNSHARED_DIRS):
            shutil.rmtree(agent)
            shutil.copytree(cache / agent.relative_to(home), agent, symlinks=True)
    for meta in [home / "kernels/aliases.json", *home.glob("kernels/*/kernel.json")]:
        if meta.is_file() and meta.stat().st_nlink > 1:
            data = meta.read_bytes()
            meta.unlink()
            meta.write_bytes(data)
    return names


@pytest.fixture(scope="session")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    """The session's cache home (seeded from the normal cache) and run dir."""
    home = tmp_path_factory.mktemp("home")
    seed_home(default_paths().home, home)
    return Paths(home=home, run=tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def assets(paths: Paths) -> GuestAssets:
    """The default kernel's guest assets, from the seeded cache or built now."""
    return ensure_assets(paths)


@pytest.fixture(scope="session")
def busybox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("busybox") / "rootfs"
    subprocess.run([str(REPO / "scripts/busybox-rootfs.sh"), str(root)], check=True)
    return root


# -- dimensions ---------------------------------------------------------------------


@dataclass(frozen=True)
class GuestKernel:
    """One value of the kernel dimension: the name `vmpod run --kernel` takes and the
    assets it boots with (fetched and built before the test, not under its timeout)."""

    name: str
    assets: GuestAssets

    @property
    def release(self) -> str:
        """What `uname -r` prints in the guest."""
        return self.assets.kernel.release


@pytest.fixture(scope="session", params=KERNELS)
def guest_kernel(request: pytest.FixtureRequest, paths: Paths, assets: GuestAssets) -> GuestKernel:
    name = str(request.param)
    return GuestKernel(name, assets if name == DEFAULT_KERNEL else ensure_assets(paths, name))


@pytest.fixture(params=GUEST_RUNTIMES)
def guest_runtime(request: pytest.FixtureRequest) -> str:
    """One value of the guest runtime dimension (`vmpod run --guest-runtime`)."""
    return str(request.param)


# -- processes, mounts, leftovers -----------------------------------------------------


def pids_where(match: Callable[[list[str]], bool]) -> list[int]:
    """Pids of other processes whose argv satisfies ``match``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if match(argv):
            pids.append(int(d.name))
    return pids


def _below(marker: str) -> str:
    """``marker`` as a directory prefix: run dir t1 must not match t10."""
    return marker.rstrip("/") + "/"


def qemu_pids(marker: str) -> list[int]:
    """QEMU processes whose command line mentions ``marker`` (a run dir); QEMU
    itself, not the bubblewrap jail around it (whose argv holds QEMU's)."""
    below = _below(marker)
    return pids_where(
        lambda argv: os.path.basename(argv[0]).startswith("qemu-system") and below in " ".join(argv)
    )


def qemu_below(pid: int) -> list[int]:
    """The QEMU below ``pid`` (a monitor's VM; jailed, QEMU is a grandchild, under
    bwrap and its pid-1 reaper), as a list: empty when there is none."""
    found = descendant_named(pid, "qemu-system")
    return [found] if found is not None else []


def netns_prefix(paths: Paths) -> str:
    """The network namespace name prefix of a test's vmpod (unique per run dir)."""
    return "vmpodt" + hashlib.sha256(str(paths.run).encode()).hexdigest()[:6] + "-"


def virtiofsd_pids(marker: str) -> list[int]:
    """virtiofsd processes serving a directory below ``marker`` (a run dir)."""
    below = _below(marker)
    return pids_where(lambda argv: "virtiofsd" in " ".join(argv) and below in " ".join(argv))


def mounts_under(*roots: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [line for line in text.splitlines() if any(f" {r}" in line for r in roots)]


def leftovers(paths: Paths) -> list[str]:
    """What a finished test must not leave behind in ``paths``, described."""
    found = []
    if qemu := qemu_pids(str(paths.run)):
        found.append(f"stray QEMU process(es): {qemu}")
    if fsd := virtiofsd_pids(str(paths.run)):
        found.append(f"stray virtiofsd process(es): {fsd}")
    if paths.sandboxes.exists() and (left := sorted(p.name for p in paths.sandboxes.iterdir())):
        found.append(f"sandbox state left behind: {left}")
    if paths.shared.exists() and (shared := sorted(p.name for p in paths.shared.iterdir())):
        found.append(f"shared directories left behind: {shared}")
    if mounts := mounts_under(paths.run, paths.home):
        found.append(f"mounts left behind: {mounts}")
    cni = paths.run / "cni"
    if cni.is_dir() and (attached := sorted(p.stem for p in cni.glob("*.json"))):
        found.append(f"network attachments left behind: {attached}")
    if cni.is_dir() and (leases := sorted(p.name for p in cni.glob("ipam/*/*") if p.name[0].isdigit())):
        found.append(f"IP leases left behind: {leases}")
    if paths.tmp.exists() and (tmp := sorted(p.name for p in paths.tmp.iterdir())):
        found.append(f"temp dirs left behind in {paths.tmp}: {tmp}")
    return found


def assert_nothing_left(paths: Paths) -> None:
    problems = leftovers(paths)
    assert problems == [], "; ".join(problems)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_gone(find: Callable[[], list[int]], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := find()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


# -- running the CLI --------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode()

    @property
    def err(self) -> str:
        return self.stderr.decode()


class VmpodRunner:
    """Runs the real `vmpod` CLI in a subprocess against one cache home and run dir.

    ``run_args`` go after ``run`` in :meth:`run` (a test's dimensions, e.g.
    ``--kernel 6.12``); ``env`` is added to every call's environment.
    """

    def __init__(
        self, paths: Paths, *, run_args: tuple[str, ...] = (), env: Mapping[str, str] | None = None
    ) -> None:
        self.paths = paths
        self.run_args = run_args
        self.env = {
            **os.environ,
            "VMPOD_HOME": str(paths.home),
            "VMPOD_RUN": str(paths.run),
            # the test's own CNI config (its lease directory lives in its run dir)
            # and network namespace names (vmpodt<N>-…)
            "VMPOD_CNI_CONF_DIR": str(paths.home / "net.d"),
            "VMPOD_CNI_NETNS_PREFIX": netns_prefix(paths),
            **(env or {}),
        }
        self.started: list[subprocess.Popen[bytes]] = []

    def __call__(
        self, *args: str, input: bytes | None = None, timeout: float = 180, env: dict[str, str] | None = None
    ) -> Result:
        proc = subprocess.run(
            [*VMPOD, *args],
            input=input,
            capture_output=True,
            timeout=timeout,
            env={**self.env, **(env or {})},
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def run(
        self, *args: str, input: bytes | None = None, timeout: float = 180, env: dict[str, str] | None = None
    ) -> Result:
        """``vmpod run`` with this runner's dimensions, then ``args``."""
        return self("run", *self.run_args, *args, input=input, timeout=timeout, env=env)

    def popen(self, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
        """Start ``vmpod ARGS`` and leave it running; the factory reaps it if the test
        does not."""
        proc: subprocess.Popen[bytes] = subprocess.Popen([*VMPOD, *args], env=self.env, **kw)
        self.started.append(proc)
        return proc


# -- logs of failed tests -----------------------------------------------------------------

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
_LOGS = pytest.StashKey["SandboxLogs"]()
_KEPT: list[tuple[str, Path]] = []  # (test, log dir) of failed tests, for the summary


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        data = path.read_bytes()[-256 * 1024 :]
    except OSError as err:
        return f"(unreadable: {err})"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:]) or "(empty)"


def _sandbox_logs(sandboxes: Path) -> list[Path]:
    """console.log / qemu.log of each ``sandboxes/<id>/`` dir (kept or live)."""
    if not sandboxes.is_dir():
        return []
    return [d / name for d in sorted(sandboxes.iterdir()) for name in SANDBOX_LOGS if (d / name).is_file()]


@dataclass
class SandboxLogs:
    """Where one test's sandbox logs end up, and which of them its report has shown."""

    keep: Path  # this test's VMPOD_KEEP_LOGS
    shared: Path  # VMPOD_KEEP_LOGS of module/session-scoped fixtures
    shared_before: frozenset[str]
    live: list[Path]  # `sandboxes` dirs whose running sandboxes count as this test's
    shown: set[tuple[str, str]] = field(default_factory=set)  # (sandbox id, log name)

    def files(self) -> list[Path]:
        new_shared = (
            [d for d in sorted(self.shared.iterdir()) if d.name not in self.shared_before]
            if self.shared.is_dir()
            else []
        )
        found = _sandbox_logs(self.keep)
        for d in new_shared:
            found += [d / n for n in SANDBOX_LOGS if (d / n).is_file()]
        for sandboxes in self.live:
            found += _sandbox_logs(sandboxes)
        return found

    def sections(self) -> list[tuple[str, str]]:
        """Report sections with the tails of logs not shown yet."""
        out = []
        for f in self.files():
            if (f.parent.name, f.name) not in self.shown:
                self.shown.add((f.parent.name, f.name))
                out.append((f"{f.name} of sandbox {f.parent.name} (last {TAIL_LINES} lines; {f})", _tail(f)))
        return out


def _failed(item: pytest.Item) -> bool:
    return any(r.failed for r in item.stash.get(_REPORTS, {}).values())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    logs = item.stash.get(_LOGS, None)
    if logs is not None:
        if report.failed:
            report.sections.extend(logs.sections())
        if report.when == "teardown":
            if not _failed(item):
                shutil.rmtree(logs.keep, ignore_errors=True)
            elif logs.keep.is_dir() and any(logs.keep.iterdir()):
                _KEPT.append((item.nodeid, logs.keep))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _KEPT:
        terminalreporter.section("VM logs kept for failed tests")
        for nodeid, where in _KEPT:
            terminalreporter.write_line(f"{nodeid}: {where}")


def _log_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "vm-logs"


@pytest.fixture(scope="session", autouse=True)
def _shared_keep_logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """VMPOD_KEEP_LOGS for VMs of module- and session-scoped fixtures (set before they
    copy the environment)."""
    shared = _log_root(tmp_path_factory) / "_shared"
    shared.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEEP_LOGS, str(shared))
        yield shared


@pytest.fixture(autouse=True)
def _test_keep_logs(
    request: pytest.FixtureRequest,
    paths: Paths,
    _shared_keep_logs: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    """This test's own VMPOD_KEEP_LOGS (also in os.environ, for in-process sandboxes)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid.removeprefix("tests/vm/"))[:150]
    keep = _log_root(tmp_path_factory) / name
    keep.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv(KEEP_LOGS, str(keep))
    request.node.stash[_LOGS] = SandboxLogs(
        keep=keep,
        shared=_shared_keep_logs,
        shared_before=frozenset(p.name for p in _shared_keep_logs.iterdir()),
        live=[paths.sandboxes],
    )
    return keep


# -- the factory ------------------------------------------------------------------------

_TEST_RUNS = itertools.count(1)


class VmFactory:
    """Makes ``VmpodRunner``s for one test and owns the cleanup of all they start.

    Every runner shares the test's run dir (``paths.run``, below the session's) and
    log dir (``logs``, its VMPOD_KEEP_LOGS); call it with the test's dimensions::

        def test_x(vm_factory, busybox, guest_runtime):
            vmpod = vm_factory(guest_runtime=guest_runtime)
            r = vmpod.run("--rootfs", str(busybox), "--", "true")
    """

    def __init__(self, paths: Paths, logs: Path) -> None:
        self.paths = paths
        self.logs = logs
        self.runners: list[VmpodRunner] = []

    def __call__(
        self,
        *,
        kernel: str | None = None,
        guest_runtime: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> VmpodRunner:
        run_args: tuple[str, ...] = ()
        if kernel is not None:
            run_args += ("--kernel", kernel)
        if guest_runtime is not None:
            run_args += ("--guest-runtime", guest_runtime)
        runner = VmpodRunner(self.paths, run_args=run_args, env={KEEP_LOGS: str(self.logs), **(env or {})})
        self.runners.append(runner)
        return runner

    def running(self) -> list[int]:
        """Pids of what this test started that still runs: its `vmpod` processes, and
        any process whose argv names its run dir (QEMU, virtiofsd)."""
        own = [p.pid for r in self.runners for p in r.started if p.poll() is None]
        below = _below(str(self.paths.run))
        return own + [pid for pid in pids_where(lambda argv: below in " ".join(argv)) if pid not in own]

    def keep_live_logs(self) -> None:
        """Copy the logs of sandboxes still in the run dir to ``logs/<id>/``."""
        for f in _sandbox_logs(self.paths.sandboxes):
            dest = self.logs / f.parent.name / f.name
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(OSError):
                    shutil.copyfile(f, dest)

    def close(self, test_failed: bool) -> None:
        """Kill what is still running (by pid, SIGKILL), then check nothing is left."""
        problems = []
        strays = self.running()
        if strays or test_failed:
            self.keep_live_logs()  # before the kill: a live owner would remove them
        if strays:
            problems.append(f"still running at teardown, killed: {self._describe(strays)}")
            _kill(strays)
            for r in self.runners:
                for p in r.started:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(10)
            if alive := _wait_gone(self.running):
                _kill(alive)
                problems.append(f"survived SIGKILL: {alive}")
        problems += leftovers(self.paths)
        # Scratch dirs would fail every later test too (never delete through a mount).
        if self.paths.tmp.exists() and not mounts_under(self.paths.tmp):
            for scratch in self.paths.tmp.iterdir():
                shutil.rmtree(scratch, ignore_errors=True)
        if problems:
            pytest.fail("VM test left things behind: " + "; ".join(problems), pytrace=False)

    @staticmethod
    def _describe(pids: list[int]) -> str:
        out = []
        for pid in pids:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                argv = "?"
            out.append(f"{pid} ({argv[:120].strip()})")
        return ", ".join(out)


@pytest.fixture
def vm_factory(
    request: pytest.FixtureRequest, paths: Paths, assets: GuestAssets, _test_keep_logs: Path
) -> Iterator[VmFactory]:
    """Runners for this test's VMs, with cleanup owned (see :class:`VmFactory`)."""
    run = paths.run / f"t{next(_TEST_RUNS)}"
    run.mkdir()
    factory = VmFactory(Paths(home=paths.home, run=run), _test_keep_logs)
    logs = request.node.stash.get(_LOGS, None)
    if logs is not None:
        logs.live.append(factory.paths.sandboxes)
    yield factory
    factory.close(test_failed=_failed(request.node))


@pytest.fixture
def vmpod(vm_factory: VmFactory) -> VmpodRunner:
    """A runner with the default kernel and guest runtime."""
    return vm_factory()
