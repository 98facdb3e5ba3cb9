"""`vmpod matrix`: one kernel module, many kernels, one report."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from vmpod.cli.common import guarded, progress
from vmpod.errors import ConfigError
from vmpod.fsutil import meminfo

if TYPE_CHECKING:
    from rich.console import Console

    from vmpod.matrix.run import KernelResult

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
@click.option("--jobs", type=int, default=0, help="Kernels in parallel (default: cores/memory).")
@click.option("--junit", type=click.Path(path_type=Path), help="Write JUnit XML here.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write JSON here.")
@click.option(
    "--logs",
    type=click.Path(path_type=Path),
    default=Path("vmpod-matrix-logs"),
    show_default=True,
    help="Per-kernel logs (build, load, test, dmesg, console).",
)
@click.option("--boot-timeout", type=float, default=90.0, show_default=True)
@click.option("--test-timeout", type=float, default=300.0, show_default=True)
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
    from rich.console import Console

    from vmpod.guest.assets import ensure_assets
    from vmpod.guest.headers import ensure_headers
    from vmpod.hypervisor.accel import choose_accel
    from vmpod.images import resolve_image, resolve_rootfs
    from vmpod.matrix.image import busybox_rootfs
    from vmpod.matrix.report import ProgressView
    from vmpod.matrix.run import KernelTarget, MatrixConfig, read_script, run_matrix
    from vmpod.paths import default_paths
    from vmpod.storage.erofs import rootfs_disk

    names = _check_args(kernels, module_src, test_script)
    paths = default_paths()
    choice = choose_accel(accel)
    targets: list[KernelTarget] = []
    for name in names:
        assets = ensure_assets(paths, name, progress)
        progress(f"headers of {assets.kernel.release}")
        targets.append(KernelTarget(name, assets, ensure_headers(paths, assets.kernel)))
    if image:
        source = resolve_image(image)
    else:
        source = resolve_rootfs(busybox_rootfs(paths, targets[0].assets.tree / "bin/busybox"))
    cfg = MatrixConfig(
        module_src=module_src.resolve(),
        test_script=read_script(test_script),
        image_disk=rootfs_disk(paths, source, progress),
        image_config=source.config,
        logs=logs.resolve(),
        accel=choice,
        jobs=jobs or default_jobs(),
        memory_mb=_VM_MEMORY_MB,
        boot_timeout=boot_timeout,
        test_timeout=test_timeout,
    )
    # Off a terminal (CI logs) rich would wrap the table at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    progress(f"{len(targets)} kernels, {cfg.jobs} at a time, accel {choice.accel}")
    with ProgressView([t.name for t in targets], console) as view:
        results = asyncio.run(run_matrix(paths, cfg, targets, view.update))
    _report(console, results, junit, json_out, cfg.logs)
    failed = [r.kernel for r in results if not r.passed]
    if failed:
        click.echo(f"vmpod: {len(failed)} of {len(results)} kernels failed: {', '.join(failed)}", err=True)
        sys.exit(1)


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
    from vmpod.matrix.report import results_table, write_json, write_junit

    console.print(results_table(results))
    if junit:
        write_junit(results, junit)
    if json_out:
        write_json(results, json_out)
    console.print(f"logs: {logs}")
