"""`vmpod matrix`: one kernel module, many kernels, one report."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vmpod.cli.common import guarded, progress
from vmpod.errors import ConfigError
from vmpod.fsutil import meminfo

if TYPE_CHECKING:
    from rich.console import Console

    from vmpod.matrix.run import KernelResult
    from vmpod.paths import Paths

_VM_MEMORY_MB = 512


def default_jobs() -> int:
    """As many VMs as cores, bounded by memory (each VM + QEMU ≈ 0.75 GiB)."""
    avail_kb = meminfo().get("MemAvailable", 0)
    by_memory = max(1, avail_kb // ((_VM_MEMORY_MB + 256) * 1024))
    return max(1, min(os.cpu_count() or 1, by_memory))


@click.command()
@click.option("--kernels", required=True, help="Comma-separated kernels (see `vmpod kernel`).")
@click.option(
    "--module-src",
    required=True,
    type=click.Path(path_type=Path),
    help="Directory with the module's sources and Kbuild/Makefile.",
)
@click.option(
    "--test",
    "test_script",
    required=True,
    type=click.Path(path_type=Path),
    help="Shell script run in a container in each VM with the module loaded.",
)
@click.option("--image", default="", help="Image for the test container (default: busybox).")
@click.option(
    "--jobs", type=click.IntRange(min=0), default=0, help="Kernels in parallel (default: cores/memory)."
)
@click.option("--junit", type=click.Path(path_type=Path), help="Write JUnit XML here.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write JSON here.")
@click.option(
    "--logs",
    type=click.Path(path_type=Path),
    default=Path("vmpod-matrix-logs"),
    show_default=True,
    help="Per-kernel logs (build, load, test, dmesg, console).",
)
@click.option("--boot-timeout", type=click.FloatRange(min=0, min_open=True), default=90.0, show_default=True)
@click.option("--test-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True)
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto")
@guarded
def matrix(
    kernels: str,
    module_src: Path,
    test_script: Path,
    image: str,
    jobs: int,
    junit: Path | None,
    json_out: Path | None,
    logs: Path,
    boot_timeout: float,
    test_timeout: float,
    accel: str,
) -> None:
    """Build, load and test one kernel module on many kernels, each in its own VM.

    Exits non-zero when any kernel fails (build, boot, load, test, unload, or a
    kernel log with an oops, BUG, WARN, lockup or panic).
    """
    # imported here: rich and the matrix machinery would slow every `vmpod run`
    from vmpod.matrix.build import require_bwrap
    from vmpod.matrix.run import logs_lock, read_script
    from vmpod.paths import default_paths

    names = _check_args(kernels, module_src, test_script)
    require_bwrap()  # builds run in its sandbox: say so before any download
    script = read_script(test_script)  # before any download or build: a bad script fails fast
    opts = _Options(
        module_src, image, jobs, junit, json_out, logs.resolve(), boot_timeout, test_timeout, accel
    )
    with logs_lock(opts.logs):  # before kernels are fetched: a second matrix fails fast
        _run(default_paths(), names, script, opts)


@dataclass(frozen=True)
class _Options:
    module_src: Path
    image: str
    jobs: int
    junit: Path | None
    json_out: Path | None
    logs: Path
    boot_timeout: float
    test_timeout: float
    accel: str


def _run(paths: Paths, names: list[str], script: str, opts: _Options) -> None:
    from rich.console import Console

    from vmpod.guest.assets import ensure_assets
    from vmpod.guest.headers import ensure_headers
    from vmpod.hypervisor.accel import choose_accel
    from vmpod.images import resolve_image, resolve_rootfs
    from vmpod.matrix.image import busybox_rootfs
    from vmpod.matrix.report import ProgressView
    from vmpod.matrix.run import KernelTarget, MatrixConfig, dedupe_targets, run_matrix
    from vmpod.storage.erofs import rootfs_disk

    choice = choose_accel(opts.accel)
    targets: list[KernelTarget] = []
    for name in names:
        assets = ensure_assets(paths, name, progress)
        progress(f"headers of {assets.kernel.release}")
        targets.append(KernelTarget(name, assets, ensure_headers(paths, assets.kernel)))
    targets, notes = dedupe_targets(targets)
    for note in notes:
        click.echo(f"vmpod: note: {note}", err=True)
    if opts.image:
        source = resolve_image(opts.image)
    else:
        source = resolve_rootfs(busybox_rootfs(paths, targets[0].assets.tree / "bin/busybox"))
    cfg = MatrixConfig(
        module_src=opts.module_src.resolve(),
        test_script=script,
        image_disk=rootfs_disk(paths, source, progress),
        image_config=source.config,
        logs=opts.logs,
        accel=choice,
        jobs=opts.jobs or default_jobs(),
        memory_mb=_VM_MEMORY_MB,
        boot_timeout=opts.boot_timeout,
        test_timeout=opts.test_timeout,
    )
    # Off a terminal (CI logs) rich would wrap the table at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    progress(f"{len(targets)} kernels, {cfg.jobs} at a time, accel {choice.accel}")
    with ProgressView([t.name for t in targets], console) as view:
        results, signum = run_interruptible(lambda: run_matrix(paths, cfg, targets, view.update))
    _report(console, results, opts.junit, opts.json_out, cfg.logs)
    if signum:
        done = sum(not any(v == "interrupted" for v in r.steps.values()) for r in results)
        name = signal.Signals(signum).name
        click.echo(
            f"vmpod: interrupted by {name}: partial results ({done} of {len(results)} kernels ran)", err=True
        )
        sys.exit(128 + signum)
    failed = [r.kernel for r in results if not r.passed]
    if failed:
        click.echo(f"vmpod: {len(failed)} of {len(results)} kernels failed: {', '.join(failed)}", err=True)
        sys.exit(1)


def run_interruptible(
    start: Callable[[], Coroutine[Any, Any, list[KernelResult]]],
) -> tuple[list[KernelResult], int]:
    """Run the matrix; the first SIGINT/SIGTERM cancels it (every VM is stopped
    and every build killed before it returns) and it returns the partial results
    and the signal (0 when none came). Later signals wait for that clean-up."""
    got: list[int] = []

    async def main() -> list[KernelResult]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(signum: int) -> None:
            if not got:
                got.append(signum)
                task.cancel(signal.Signals(signum).name)

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await start()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    results = asyncio.run(main())
    return results, got[0] if got else 0


def _check_args(kernels: str, module_src: Path, test_script: Path) -> list[str]:
    """The kernel names, once the module source and test script are known to exist."""
    names = [k.strip() for k in kernels.split(",") if k.strip()]
    if not names or len(set(names)) != len(names):
        raise ConfigError("--kernels needs distinct kernel names, e.g. 6.1,6.12-generic")
    if not (module_src / "Kbuild").is_file() and not (module_src / "Makefile").is_file():
        raise ConfigError(
            f"{module_src} has no Kbuild or Makefile",
            hint="point --module-src at the module's source directory",
        )
    if not test_script.is_file():
        raise ConfigError(f"test script {test_script} not found")
    return names


def _report(
    console: Console, results: list[KernelResult], junit: Path | None, json_out: Path | None, logs: Path
) -> None:
    # imported here, like the rest of the matrix machinery (start-up time of `vmpod`)
    from rich.markup import escape

    from vmpod.matrix.report import results_table, write_json, write_junit

    # Machine reports first: whatever happens to the table, CI gets its files.
    if junit:
        write_junit(results, junit)
    if json_out:
        write_json(results, json_out)
    console.print(results_table(results))
    console.print(escape(f"logs: {logs}"), highlight=False)
