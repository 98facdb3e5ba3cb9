"""Out-of-tree module builds against one kernel's headers (kbuild ``M=``)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

BUILD_TIMEOUT = 600.0
_LOG_LIMIT = 1 << 20


@dataclass(frozen=True)
class BuildResult:
    ok: bool
    modules: tuple[Path, ...]  # built .ko files
    log: str
    seconds: float


async def build_module(src: Path, headers: Path, work: Path) -> BuildResult:
    """Copy ``src`` into ``work`` and run ``make -C headers M=work modules``.

    A compiler error is this kernel's build failure, not an error of the run.
    """
    t0 = time.monotonic()
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(
        src,
        work,
        symlinks=True,
        ignore=shutil.ignore_patterns("*.ko", "*.o", "*.mod*", ".*.cmd", "Module.symvers"),
    )
    argv = ["make", "-C", str(headers), f"M={work}", f"-j{os.cpu_count() or 1}", "modules"]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), BUILD_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return BuildResult(False, (), f"build timed out after {BUILD_TIMEOUT:g}s", time.monotonic() - t0)
    log = " ".join(argv) + "\n" + out[-_LOG_LIMIT:].decode(errors="replace")
    modules = tuple(sorted(work.rglob("*.ko")))
    ok = proc.returncode == 0 and bool(modules)
    if proc.returncode == 0 and not modules:
        log += "\nvmpod: the build produced no .ko file (is obj-m set in Kbuild/Makefile?)"
    return BuildResult(ok, modules, log, time.monotonic() - t0)


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
