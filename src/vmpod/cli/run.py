"""`vmpod run`: image -> erofs disk -> sandbox -> container, stdio relayed live."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmpod.containers import network as net
from vmpod.errors import ConfigError, VmpodError
from vmpod.guest.kernel import DEFAULT_KERNEL
from vmpod.guest.progress import Progress
from vmpod.images import ImageSource, resolve_image, resolve_rootfs
from vmpod.network.ports import PortMapping
from vmpod.paths import Paths
from vmpod.runspec import ProcessOptions, build_spec, user_of
from vmpod.sandbox import ContainerSpec, Exit, Output, Process, Sandbox, SandboxConfig, SandboxSpec, prepare
from vmpod.sandbox.attach import (
    SIGPIPE_STATUS,
    STOP_SIGNALS,
    Relay,
    SignalForwarder,
    on_reader_gone,
    raw_terminal,
)
from vmpod.sandbox.build import check_resources
from vmpod.stdio import note_discarded_output
from vmpod.storage.erofs import rootfs_disk

log = logging.getLogger(__name__)
STOP_GRACE = 5.0  # seconds between the forwarded signal and SIGKILL
# A process whose output's reader went away dies of SIGPIPE; a shell reports 128+13.


@dataclass(frozen=True)
class RunOptions:
    image: str
    rootfs: str
    process: ProcessOptions
    interactive: bool = False
    kernel: str = DEFAULT_KERNEL
    accel: str = "auto"
    cpus: int = 1
    memory_mb: int = 512
    boot_timeout: float = 60.0
    verbose_console: bool = False
    guest_runtime: str = "runc"
    kernel_modules: tuple[str, ...] = ()  # NAME[=params] from the kernel's own tree
    load_modules: tuple[str, ...] = ()  # FILE.ko[=params] built elsewhere
    network: str = "bridge"  # bridge (CNI, like docker's default) | none (loopback only)
    ports: tuple[PortMapping, ...] = ()  # -p, on the bridge network


def resolve_source(opts: RunOptions, progress: Progress) -> ImageSource:
    if opts.rootfs and opts.image:
        raise ConfigError("give either an IMAGE or --rootfs DIR, not both")
    if opts.rootfs:
        return resolve_rootfs(opts.rootfs)
    if not opts.image:
        raise ConfigError("no image given", hint="use vmpod run IMAGE -- CMD or --rootfs DIR")
    return resolve_image(opts.image, progress=progress)


async def run(paths: Paths, opts: RunOptions, progress: Progress) -> int:
    """Run one container in a fresh sandbox; returns the container's exit status."""
    t0 = time.monotonic()
    check_resources(opts.cpus, opts.memory_mb)  # before any image work
    source = resolve_source(opts, progress)
    oci = build_spec(source.config, opts.process)  # validates before anything boots
    disk = rootfs_disk(paths, source, progress)
    config = prepare(
        paths,
        SandboxSpec(
            kernel=opts.kernel,
            accel=opts.accel,
            cpus=opts.cpus,
            memory_mb=opts.memory_mb,
            boot_timeout=opts.boot_timeout,
            verbose_console=opts.verbose_console,
            rootfs=(disk,),
            kernel_modules=opts.kernel_modules,
            module_files=opts.load_modules,
        ),
        progress,
    )
    sandbox_id = secrets.token_hex(6)
    if opts.network == "none":
        return await _run_in(paths, config, sandbox_id, disk, oci, source, opts, t0)
    with net.owned(paths, sandbox_id):  # our attachment: no other vmpod collects it
        # (pyroute2, under CNI's netns handling, runs an asyncio loop of its own)
        attachment = await asyncio.to_thread(net.attach, paths, sandbox_id, opts.ports)
        try:
            config = dataclasses.replace(config, netns=str(attachment.netns))
            return await _run_in(paths, config, sandbox_id, disk, oci, source, opts, t0)
        finally:
            await asyncio.to_thread(net.detach, paths, sandbox_id)


async def _run_in(
    paths: Paths,
    config: SandboxConfig,
    sandbox_id: str,
    disk: Path,
    oci: dict[str, object],
    source: ImageSource,
    opts: RunOptions,
    t0: float,
) -> int:
    async with Sandbox(paths, config, sandbox_id) as sandbox:
        log.info("sandbox %s: agent ready after %.2fs", sandbox.id, time.monotonic() - t0)
        await sandbox.load_modules()
        container = await sandbox.create_container(
            ContainerSpec(
                id=sandbox.id,
                oci=oci,
                rootfs=disk,
                user=user_of(source.config, opts.process),
                runtime=opts.guest_runtime,
            )
        )
        tty = opts.process.tty
        note_discarded_output()
        relay = Relay()
        reader_gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        gone = on_reader_gone(reader_gone)
        out, err = (relay.writer(fd, owned=False, on_broken=gone) for fd in (1, 2))
        output = Output(out.write, err.write)
        raw = raw_terminal(0) if tty and opts.interactive else contextlib.nullcontext()
        try:
            with raw:
                proc = await container.start(output, stdin=opts.interactive)
                with SignalForwarder(proc, STOP_SIGNALS, grace=STOP_GRACE) as fwd:
                    if tty:
                        relay.watch_size(1 if os.isatty(1) else 0, proc)
                    if opts.interactive:
                        relay.pump(0, proc)
                    exit_ = await _wait_unless_reader_gone(proc, reader_gone, fwd.unresponsive)
        finally:
            await relay.close()
    if reader_gone.done():
        # output the container wrote could not be delivered: end as the process
        # writing it would have, silently, like `yes | head -1`
        return SIGPIPE_STATUS
    if exit_.message:
        print(f"vmpod: {exit_.message}", file=sys.stderr)
    return exit_.status


async def _wait_unless_reader_gone(
    proc: Process, reader_gone: asyncio.Future[None], unresponsive: asyncio.Future[None]
) -> Exit:
    """The process's exit; if our stdout's (or stderr's) reader goes away first,
    kill the process, as SIGPIPE would kill a writer on the host: its output has
    nowhere to go, and it must not run (a VM at full speed) forever. If even
    SIGKILL does not end it (``unresponsive``: a hung guest), give up on it: the
    sandbox's teardown kills the VM."""
    wait = asyncio.ensure_future(proc.wait())
    try:
        either: set[asyncio.Future[Any]] = {wait, reader_gone, unresponsive}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        wait.cancel()
        raise
    if wait.done():
        return wait.result()
    if unresponsive.done():
        wait.cancel()
        return Exit(
            128 + signal.SIGKILL,
            f"the container did not end within {STOP_GRACE:.0f}s of SIGKILL: its VM does not answer; "
            "the VM was killed",
        )
    log.debug("the reader of the container's output went away: stopping the container")
    with contextlib.suppress(VmpodError):
        # not SIGPIPE: a container's PID 1 without a handler ignores it
        await proc.signal(signal.SIGKILL)
    try:
        return await asyncio.wait_for(wait, STOP_GRACE)
    except (TimeoutError, VmpodError) as err:
        # the sandbox's teardown stops the VM either way
        log.debug("container not stopped after its reader went away: %s", err)
        return Exit(SIGPIPE_STATUS)
