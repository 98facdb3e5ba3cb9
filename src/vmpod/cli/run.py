"""`vmpod run`: image -> erofs disk -> sandbox -> container, stdio relayed live."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from vmpod.agent.client import ProcessSink
from vmpod.agent.protocol import ExitEvent
from vmpod.cli import stdio
from vmpod.errors import AgentError, ConfigError, VmpodError
from vmpod.guest.assets import ensure_assets
from vmpod.guest.kernel import DEFAULT_KERNEL
from vmpod.guest.modules import plan_modules
from vmpod.guest.progress import Progress
from vmpod.hypervisor.accel import choose_accel
from vmpod.hypervisor.base import Disk
from vmpod.images import ImageSource, resolve_image, resolve_rootfs
from vmpod.paths import Paths
from vmpod.sandbox.container import Container, ContainerConfig
from vmpod.sandbox.sandbox import Sandbox, SandboxConfig
from vmpod.sandbox.spec import ProcessOptions, build_spec, user_of
from vmpod.storage.erofs import rootfs_disk

log = logging.getLogger(__name__)
ROOTFS_SERIAL = "ctr-rootfs"
STOP_GRACE = 5.0   # seconds between the forwarded signal and SIGKILL


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
    kernel_modules: tuple[str, ...] = ()   # NAME[=params] from the kernel's own tree
    load_modules: tuple[str, ...] = ()     # FILE.ko[=params] built elsewhere


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
    if opts.cpus < 1 or opts.memory_mb < 128:
        raise ConfigError("the VM needs at least 1 CPU and 128 MiB",
                          hint="raise --cpus / --memory")
    accel = choose_accel(opts.accel)
    log.info("accelerator: %s (%s)", accel.accel, accel.reason)
    source = resolve_source(opts, progress)
    spec = build_spec(source.config, opts.process)   # validates before anything boots
    assets = ensure_assets(paths, opts.kernel, progress)
    disk = rootfs_disk(paths, source, progress)
    modules = plan_modules(assets.kernel.modules_dir, assets.kernel.release,
                           opts.kernel_modules, opts.load_modules)
    config = SandboxConfig(assets=assets, accel=accel, cpus=opts.cpus, modules=tuple(modules),
                           memory_mb=opts.memory_mb, boot_timeout=opts.boot_timeout,
                           disks=(Disk(disk, ROOTFS_SERIAL),),
                           verbose_console=opts.verbose_console)
    async with Sandbox(paths, config) as sandbox:
        log.info("sandbox %s: agent ready after %.2fs", sandbox.id, time.monotonic() - t0)
        await sandbox.load_modules()
        container = Container(sandbox, ContainerConfig(
            id=sandbox.id, spec=spec, rootfs_serial=ROOTFS_SERIAL,
            user=user_of(source.config, opts.process), runtime=opts.guest_runtime))
        try:
            await container.create()
            return await _attach(container, opts)
        except AgentError as err:
            # A dropped channel usually means the VM died: say that instead.
            failure = await sandbox.vm_failure()
            if failure is not None:
                raise failure from err
            raise


async def _attach(container: Container, opts: RunOptions) -> int:
    loop = asyncio.get_running_loop()
    tty = opts.process.tty
    sink = ProcessSink(on_stdout=stdio.writer(1), on_stderr=stdio.writer(2))
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    state = {"stream": 0, "forwarded": 0}

    async def forward(sig: int) -> None:
        # First signal goes to the container; a second one, or the grace
        # period running out, kills it: vmpod always ends.
        state["forwarded"] += 1
        first = state["forwarded"] == 1
        try:
            await container.signal(state["stream"], sig if first else signal.SIGKILL)
            if first:
                await asyncio.sleep(STOP_GRACE)
                if not sink.exited.done():
                    await container.signal(state["stream"], signal.SIGKILL)
        except VmpodError as err:
            log.debug("signal forwarding: %s", err)

    with stdio.raw_terminal(0) if tty and opts.interactive else contextlib.nullcontext():
        state["stream"] = await container.start(sink, stdin=opts.interactive)
        stream = state["stream"]
        for sig in signals:
            loop.add_signal_handler(sig, _spawn_forward, forward, sig)
        if tty:
            size = stdio.window_size(1) or stdio.window_size(0)
            if size:
                await container.resize(stream, *size)

            def on_winch() -> None:
                size = stdio.window_size(1) or stdio.window_size(0)
                if size:
                    asyncio.ensure_future(container.resize(stream, *size))
            loop.add_signal_handler(signal.SIGWINCH, on_winch)
        pump = asyncio.create_task(_pump_stdin(container, stream, sink)) \
            if opts.interactive else None
        try:
            event: ExitEvent = await sink.exited
        finally:
            if pump is not None:
                pump.cancel()
            for sig in (*signals, signal.SIGWINCH):
                loop.remove_signal_handler(sig)
    if event.message:
        print(f"vmpod: {event.message}", file=sys.stderr)
    return event.status


def _spawn_forward(forward: Callable[[int], Awaitable[None]], sig: int) -> None:
    asyncio.ensure_future(forward(sig))


async def _pump_stdin(container: Container, stream: int, sink: ProcessSink) -> None:
    agent = container.sandbox.agent
    queue = stdio.stdin_reader(asyncio.get_running_loop())
    while not sink.exited.done():
        data = await queue.get()
        if not data:
            agent.close_stdin(stream)
            return
        await agent.write_stdin(stream, data)

