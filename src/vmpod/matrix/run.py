"""One matrix run: for each kernel build the module, boot a VM with it, load it,
run the test in a container, judge the kernel log, unload; kernels in parallel."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vmpod.errors import ConfigError, VmpodError
from vmpod.fsutil import LockTimeout, lock_file
from vmpod.guest.assets import GuestAssets
from vmpod.guest.modules import ModuleLoad
from vmpod.hypervisor.accel import AccelChoice
from vmpod.images import ImageConfig
from vmpod.matrix.build import build_module, first_error
from vmpod.matrix.capped import CappedOutput
from vmpod.matrix.klog import KernelLogTap
from vmpod.paths import Paths
from vmpod.runspec import ProcessOptions, build_spec
from vmpod.sandbox import (
    CommandResult,
    ContainerSpec,
    Output,
    Sandbox,
    SandboxConfig,
    SandboxSpec,
    prepare,
)

MAX_SCRIPT = 48 * 1024
STEPS = ("build", "boot", "load", "test", "unload")
LOCK_NAME = ".vmpod-matrix.lock"


@dataclass(frozen=True)
class KernelTarget:
    """A kernel ready for the matrix: assets to boot it and headers to build for it."""

    name: str
    assets: GuestAssets
    headers: Path


@dataclass(frozen=True)
class MatrixConfig:
    module_src: Path
    test_script: str
    image_disk: Path
    image_config: ImageConfig
    logs: Path
    accel: AccelChoice
    jobs: int = 2
    memory_mb: int = 512
    boot_timeout: float = 90.0
    test_timeout: float = 300.0


@dataclass(frozen=True)
class KernelResult:
    kernel: str
    release: str
    steps: dict[str, str] = field(default_factory=dict)  # step -> ok|fail|skip|pass
    dmesg: str = "-"  # verdict status
    findings: tuple[str, ...] = ()
    detail: str = ""  # first reason of failure
    seconds: float = 0.0
    logs: Path = Path()
    notes: tuple[str, ...] = ()  # what the report should know (e.g. output truncated)

    @property
    def passed(self) -> bool:
        return all(self.steps.get(s) in ("ok", "pass") for s in STEPS) and self.dmesg == "clean"


Progress = Callable[[str, str, str], None]  # (kernel, step, state)


async def run_matrix(
    paths: Paths, cfg: MatrixConfig, targets: list[KernelTarget], progress: Progress
) -> list[KernelResult]:
    # Separate slots for builds and VMs: a kernel's build overlaps the VMs of
    # others instead of holding a VM slot while the compiler runs.
    slots = _Slots(asyncio.Semaphore(max(1, cfg.jobs)), asyncio.Semaphore(max(1, cfg.jobs)))
    runs: dict[str, _Run] = {}
    done: dict[str, KernelResult] = {}

    async def one(t: KernelTarget) -> None:
        done[t.name] = await run_kernel(paths, cfg, t, progress, slots, runs)

    with logs_lock(cfg.logs):
        tasks = [asyncio.ensure_future(one(t)) for t in targets]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError as err:
            # Cancelled (the CLI's SIGINT/SIGTERM). gather gives up at the first
            # cancelled kernel: wait for every kernel's clean-up (VMs stopped,
            # builds killed), then report what finished and mark the rest.
            why = str(err.args[0]) if err.args and err.args[0] else "a signal"
            for task in tasks:
                task.cancel(why)
            await asyncio.wait(tasks)
            for t in targets:
                if t.name not in done and t.name in runs:
                    runs[t.name].interrupt(why)
                    done[t.name] = runs[t.name].result()
        return [done[t.name] for t in targets if t.name in done]


@contextlib.contextmanager
def logs_lock(logs: Path) -> Iterator[None]:
    """Hold the matrix lock of the log directory: two matrices writing the same
    per-kernel build dirs would report each other's half-built trees as failures."""
    logs = logs.resolve()
    if logs in _HELD:  # the CLI took it before downloading kernels; run_matrix again
        yield
        return
    logs.mkdir(parents=True, exist_ok=True)
    try:
        fd = lock_file(logs / LOCK_NAME)
    except LockTimeout:
        raise ConfigError(
            f"another vmpod matrix runs with its logs in {logs}",
            hint="wait for it, or give this one its own --logs directory",
        ) from None
    _HELD.add(logs)
    try:
        yield
    finally:
        _HELD.discard(logs)
        os.close(fd)


_HELD: set[Path] = set()  # log dirs this process holds the matrix lock of


def dedupe_targets(targets: list[KernelTarget]) -> tuple[list[KernelTarget], list[str]]:
    """Drop kernels that resolve to one already in the list; notes say which."""
    seen: dict[Path, str] = {}
    kept: list[KernelTarget] = []
    notes: list[str] = []
    for t in targets:
        key = t.assets.kernel.root.resolve()
        if key in seen:
            notes.append(
                f"kernel {t.name!r} is the same kernel as {seen[key]!r} "
                f"({t.assets.kernel.release}): running it once"
            )
            continue
        seen[key] = t.name
        kept.append(t)
    return kept, notes


@dataclass(frozen=True)
class _Slots:
    builds: asyncio.Semaphore
    vms: asyncio.Semaphore


class _Run:
    """Mutable record of one kernel's run; frozen into a KernelResult at the end."""

    def __init__(self, target: KernelTarget, logs: Path, progress: Progress) -> None:
        self.target, self.logs, self.progress = target, logs, progress
        self.steps = {s: "skip" for s in STEPS}
        self.detail = ""
        self.dmesg = "-"
        self.findings: tuple[str, ...] = ()
        self.notes: list[str] = []
        self.cancelled = False
        self.t0 = time.monotonic()

    def step(self, name: str, state: str, detail: str = "") -> None:
        self.steps[name] = state
        if state == "fail" and not self.detail:
            self.detail = detail
        self.progress(self.target.name, name, state)

    def running(self) -> str | None:
        return next((s for s, v in self.steps.items() if v == "running"), None)

    def vm_failed(self, why: str) -> None:
        """The guest died or stopped answering: the step that ran fails; between
        steps none does (the kernel log's verdict then says what is known)."""
        step = self.running()
        if step is not None:
            self.step(step, "fail", f"VM failed: {why}")
        elif not self.detail:
            self.detail = f"VM failed: {why}"

    def interrupt(self, signame: str) -> None:
        step = self.running()
        if step is not None:
            self.step(step, "interrupted")
        self.detail = self.detail or f"interrupted by {signame}"

    def judge(self, tap: KernelLogTap | None, console: str) -> None:
        if tap is not None:
            (self.logs / "dmesg.log").write_bytes(tap.text.getvalue())
        if console or self.steps["boot"] == "fail":
            (self.logs / "console.log").write_text(console or "(the guest printed nothing)\n")
        if self.steps["boot"] != "ok" or tap is None:
            return
        verdict = tap.verdict(console)
        self.notes += tap.notes()
        self.dmesg, self.findings = verdict.status, verdict.findings
        if verdict.clean and not tap.complete and self.cancelled:
            self.dmesg = "-"
        elif verdict.clean and not tap.complete:
            # nothing bad seen, but not all seen either: never "clean"
            self.dmesg = "unknown"
            self.detail = self.detail or "kernel log unavailable: the guest stopped answering"
        if not self.detail and verdict.findings:
            self.detail = f"dmesg: {verdict.findings[0]}"

    def result(self) -> KernelResult:
        return KernelResult(
            kernel=self.target.name,
            release=self.target.assets.kernel.release,
            steps=dict(self.steps),
            dmesg=self.dmesg,
            findings=self.findings,
            detail=self.detail,
            seconds=time.monotonic() - self.t0,
            logs=self.logs,
            notes=tuple(self.notes),
        )


async def run_kernel(
    paths: Paths,
    cfg: MatrixConfig,
    t: KernelTarget,
    progress: Progress,
    slots: _Slots | None = None,
    runs: dict[str, _Run] | None = None,
) -> KernelResult:
    """One kernel's steps; ``runs`` gets its record (what an interruption reports)."""
    slots = slots or _Slots(asyncio.Semaphore(1), asyncio.Semaphore(1))
    logs = cfg.logs / t.name.replace("/", "_").replace(":", "_")
    logs.mkdir(parents=True, exist_ok=True)
    run = _Run(t, logs, progress)
    if runs is not None:
        runs[t.name] = run
    async with slots.builds:
        run.step("build", "running")
        built = await build_module(cfg.module_src, t.headers, logs / "build")
    (logs / "build.log").write_text(built.log)
    if not built.ok:
        run.step("build", "fail", f"build: {first_error(built.log, logs / 'build')}")
        return run.result()
    run.step("build", "ok")
    try:
        config = prepare(
            paths,
            SandboxSpec(
                kernel=t.name,
                accel=cfg.accel.accel,
                memory_mb=cfg.memory_mb,
                boot_timeout=cfg.boot_timeout,
                rootfs=(cfg.image_disk,),
                module_files=tuple(str(k) for k in built.modules),
            ),
        )
    except VmpodError as err:
        run.step("boot", "fail", f"modules: {err}")
        return run.result()
    async with slots.vms:
        await _in_vm(paths, cfg, config, {m.name for m in config.modules if m.file in built.modules}, run)
    return run.result()


async def _in_vm(paths: Paths, cfg: MatrixConfig, config: SandboxConfig, ours: set[str], run: _Run) -> None:
    plan = list(config.modules)
    sandbox = Sandbox(paths, config)
    console = ""
    tap: KernelLogTap | None = None
    try:
        run.step("boot", "running")
        try:
            await sandbox.start()
        except VmpodError as err:
            console = sandbox.console_tail(200)
            last = [ln.strip() for ln in console.splitlines() if ln.strip()]
            run.step("boot", "fail", f"boot: {err.message}" + (f"; console: {last[-1]}" if last else ""))
            return
        run.step("boot", "ok")
        tap = KernelLogTap(sandbox)
        await tap.begin()
        poller = asyncio.ensure_future(tap.poll())
        try:
            if await _load(sandbox, plan, run):
                await _test(sandbox, cfg, run)
                await _unload(sandbox, [m for m in reversed(plan) if m.name in ours], run)
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        await tap.finish()
    except asyncio.CancelledError:
        run.cancelled = True  # what the kernel log lacks is not the guest's fault
        raise
    except VmpodError as err:
        # The guest died under us (panic, out of memory) or stopped answering:
        # its console tells why, and is judged with what the kernel log gave.
        run.vm_failed(err.message)
    finally:
        console = console or sandbox.console_tail(200)
        await sandbox.stop()
        run.judge(tap, console)


async def _load(sandbox: Sandbox, plan: list[ModuleLoad], run: _Run) -> bool:
    logs, step = run.logs, run.step
    step("load", "running")
    lines = []
    for m in plan:
        r = await sandbox.load_module(m)
        lines.append(f"insmod {m.name} {' '.join(m.params)} -> {r.status}\n{r.stdout}{r.stderr}")
        if r.status != 0:
            (logs / "load.log").write_text("\n".join(lines))
            step("load", "fail", f"load {m.name}: {_why(r, 'insmod')}")
            return False
    (logs / "load.log").write_text("\n".join(lines))
    step("load", "ok")
    return True


async def _test(sandbox: Sandbox, cfg: MatrixConfig, run: _Run) -> None:
    t, logs, step = run.target, run.logs, run.step
    step("test", "running")
    env = (f"VMPOD_KERNEL={t.assets.kernel.release}", f"VMPOD_KERNEL_NAME={t.name}")
    spec = build_spec(
        cfg.image_config,
        ProcessOptions(
            args=("/bin/sh", "-c", cfg.test_script, "vmpod-test"), env=env, privileged=True, hostname="matrix"
        ),
    )
    container = await sandbox.create_container(ContainerSpec(id="test", oci=spec, rootfs=cfg.image_disk))
    out = CappedOutput()
    proc = await container.start(Output(out.write, out.write), stdin=False)
    try:
        event = await asyncio.wait_for(proc.wait(), cfg.test_timeout)
    except TimeoutError:
        await proc.signal(9)
        _note_output(run, out)
        (logs / "test.log").write_bytes(out.getvalue())
        step("test", "fail", f"test: timed out after {cfg.test_timeout:g}s")
        return
    _note_output(run, out)
    (logs / "test.log").write_bytes(
        out.getvalue() + (f"\n{event.message}".encode() if event.message else b"")
    )
    if event.status == 0:
        step("test", "pass")
    else:
        last = out.last_line()
        step("test", "fail", f"test: exit {event.status}" + (f": {last}" if last else ""))


def _note_output(run: _Run, out: CappedOutput) -> None:
    if out.dropped:
        run.notes.append(out.note())


async def _unload(sandbox: Sandbox, mods: list[ModuleLoad], run: _Run) -> None:
    logs, step = run.logs, run.step
    step("unload", "running")
    lines = []
    for m in mods:
        r = await sandbox.unload_module(m.name)
        lines.append(f"rmmod {m.name} -> {r.status}\n{r.stdout}{r.stderr}")
        if r.status != 0:
            (logs / "unload.log").write_text("\n".join(lines))
            step("unload", "fail", f"unload {m.name}: {_why(r)}")
            return
    (logs / "unload.log").write_text("\n".join(lines))
    step("unload", "ok")


def _why(r: CommandResult, tool: str = "rmmod") -> str:
    """A helper command's failure in one line, also when it printed nothing."""
    text = (r.stderr or r.stdout).strip()
    if text:
        return text.splitlines()[-1][:300]
    return f"{tool} killed by signal {-r.status}" if r.status < 0 else f"{tool} exited with status {r.status}"


def read_script(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read test script {path}: {err.strerror or err}") from err
    if len(data) > MAX_SCRIPT:
        raise VmpodError(
            f"test script {path} is larger than {MAX_SCRIPT // 1024} KiB",
            hint="keep the test script small; put data in the image",
        )
    try:
        text = data.decode()
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"test script {path} is not UTF-8 text (byte {err.start})",
            hint="save it as UTF-8; binary data belongs in the image",
        ) from None
    if "\0" in text:
        raise ConfigError(f"test script {path} contains a NUL byte", hint="a shell script is text")
    return text
