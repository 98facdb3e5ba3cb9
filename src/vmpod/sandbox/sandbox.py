"""A Sandbox is one VM (one pod): hypervisor + agent connection + state directory,
and the containers that run in it. The only way front ends reach a VM.

Lifecycle (``SandboxState``): ``start`` (launch the VM, wait for the agent's
hello) -> ``create_container`` / container handles -> ``stop`` (agent shutdown,
hypervisor quit, hard kill, state dir removed) or ``kill`` (hard at once). Both
are idempotent and run in ``finally`` paths, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vmpod.agent import protocol as p
from vmpod.agent.client import AgentClient
from vmpod.errors import AgentError, AgentTimeout, HypervisorError, ProtocolError, SandboxError, VmpodError
from vmpod.guest.initramfs import with_modules
from vmpod.guest.modules import ModuleLoad, read_module
from vmpod.hypervisor import create_vm
from vmpod.hypervisor.base import Disk, Hypervisor, Nic, SavesState, VmConfig, describe_exit
from vmpod.paths import Paths
from vmpod.sandbox.boot import StateDir, agent_channel, console_line, kernel_cmdline
from vmpod.sandbox.config import (
    SANDBOX_TRANSITIONS,
    ContainerSpec,
    ContainerState,
    SandboxConfig,
    SandboxState,
    Volume,
)
from vmpod.sandbox.container import Container
from vmpod.sandbox.process import Output
from vmpod.sandbox.share import Share, SharedDir
from vmpod.states import StateMachine

if TYPE_CHECKING:
    from vmpod.network.tap import WiredNetwork

log = logging.getLogger(__name__)
ROOT_SERIAL = "vmpod-root"
_S = SandboxState


class Sandbox:
    def __init__(self, paths: Paths, config: SandboxConfig, sandbox_id: str | None = None) -> None:
        self.paths = paths
        self.config = config
        self.id = sandbox_id or secrets.token_hex(6)
        self._dir = StateDir(paths, self.id)
        self.state_dir = self._dir.path
        self._agent = AgentClient()
        self._vm: Hypervisor | None = None
        self._sm = StateMachine(f"sandbox {self.id}", _S.NEW, SANDBOX_TRANSITIONS)
        self.containers: dict[str, Container] = {}
        # How the guest finds each container rootfs: a disk by its serial, or (fstype
        # "dir", an in-process agent) the path itself.
        self._rootfs_sources = {
            d.path: str(d.path) if config.rootfs_fstype == "dir" else d.serial for d in config.disks
        }
        self._next_stream = 1
        self._shared = SharedDir(paths.shared / self.id) if config.shared_fs else None
        self._guest_shared = ""  # where the guest mounted it
        self._watch: asyncio.Task[None] | None = None
        self.shared_failure: str | None = None  # why the shared file system is gone
        self._net: WiredNetwork | None = None  # the pod namespace's taps, mirrored
        self._launched: VmConfig | None = None  # what the VM was started with
        self._isolated: list[int] = []  # taps of isolated_nics, until QEMU has them

    @property
    def state(self) -> SandboxState:
        return self._sm.state

    @property
    def shared_dir(self) -> Path | None:
        """The host side of the VM's virtio-fs share (None without one)."""
        return self._shared.root if self._shared else None

    async def __aenter__(self) -> Sandbox:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        """Boot the VM and connect to its agent; the guest clock is set on the way."""
        self._sm.to(_S.STARTING)
        self._dir.make()
        if self._shared is not None:
            self._shared.make()
        if self.config.netns:
            from vmpod.network.tap import wire  # pyroute2 costs ~0.1 s: only when used

            # pyroute2 runs an asyncio loop of its own: keep it off ours
            self._net = await asyncio.to_thread(wire, self.config.netns)
            for skipped in self._net.plan.skipped:
                log.warning("network: %s not wired into the VM: %s", skipped.name, skipped.reason)
        vm_config = self._vm_config()
        self._launched = vm_config
        self._vm = create_vm(self.config.hypervisor, vm_config)
        try:
            await self._vm.launch()
        finally:
            if self._net is not None:
                self._net.close_fds()  # QEMU holds the taps now: they live as long as it
        await self._connect(vm_config)
        self._agent.on_failure = self._on_agent_failure
        await self._agent.set_clock(p.SetClock(epoch_ns=time.time_ns()))
        if self._shared is not None:
            self._guest_shared = (await self._agent.mount_shared()).path
            self._watch = asyncio.create_task(self._watch_shared())
        if self._net is not None:
            await self._agent.configure_network(guest_network(self._net))
        self._sm.to(_S.RUNNING)

    def _vm_config(self) -> VmConfig:
        a = self.config.assets
        initramfs = a.initramfs
        if self.config.modules:
            initramfs = with_modules(
                a.initramfs,
                {f"{m.name}.ko": read_module(m.file) for m in self.config.modules},
                self.state_dir / "initramfs.cpio",
            )
        channel = agent_channel(self.config.agent_channel)
        return VmConfig(
            kernel=a.kernel.boot_image,
            initramfs=initramfs,
            cmdline=kernel_cmdline(self.config, channel.kind),
            cpus=self.config.cpus,
            memory_mb=self.config.memory_mb,
            accel=self.config.accel,
            disks=(Disk(a.rootfs, ROOT_SERIAL), *self.config.disks),
            state_dir=self.state_dir,
            channel=channel,
            shared_dir=self._shared.root if self._shared else None,
            shared_tag=p.SHARED_FS_TAG,
            nics=(
                *(Nic(w.fd, w.mac, w.mtu) for w in (self._net.interfaces if self._net else ())),
                *(
                    Nic(fd, mac, mtu)
                    for (mac, mtu), fd in zip(self.config.isolated_nics, self._isolated, strict=True)
                ),
            ),
        )

    async def _connect(self, vm_config: VmConfig, resync: bool = False) -> None:
        ch, timeout = vm_config.channel, self.config.boot_timeout
        target = vm_config.channel_socket if ch.kind == "serial" else (ch.vsock_cid, p.VSOCK_PORT)
        try:
            hello = await self._agent.connect(target, timeout, self._check_alive, resync=resync)
        except AgentTimeout as err:
            a = self.config.assets
            raise AgentTimeout(
                f"guest agent did not answer within {timeout:g}s "
                f"(kernel {a.kernel.release}, {self.config.accel.accel})",
                hint="raise --boot-timeout on slow hosts",
                console_tail=self.console_tail(),
            ) from err
        except AgentError as err:
            # The channel dropped: usually the VM stopped (panic, init failure).
            failure = await self.failure()
            if failure is None:
                raise
            raise HypervisorError(
                f"the VM stopped during boot ({failure.details.get('how', '')}): "
                f"{console_line(self.console_tail(40))}",
                console_tail=self.console_tail(),
            ) from err
        log.info("guest uptime at hello: %.2fs", hello.uptime)

    def _check_alive(self) -> None:
        """Raise if the VM stopped (boot failure, kernel panic, QEMU killed)."""
        code = self._vm.exit_status() if self._vm else None
        if code is not None:
            raise HypervisorError(
                f"the VM stopped during boot ({describe_exit(code)}): {console_line(self.console_tail(40))}",
                console_tail=self.console_tail(),
            )

    async def stop(self) -> None:
        """Graceful (agent shutdown, VMM quit), then hard; always removes the state dir."""
        if self.state is _S.STOPPED:
            return
        self._sm.to(_S.STOPPING)
        try:
            if self.alive:
                try:
                    await self._agent.shutdown(timeout=2.0)
                except AgentError as err:
                    log.debug("agent shutdown: %s", err)
            await self._agent.close()
            if self._vm is not None and self._vm.exit_status() is None:
                await self._vm.shutdown(timeout=3.0)
        finally:
            self._finish()

    async def kill(self) -> None:
        """Hard stop at once (nothing in the guest is worth saving); idempotent."""
        if self.state is _S.STOPPED:
            return
        self._sm.to(_S.STOPPING)
        try:
            if self._vm is not None:
                self._vm.kill()
            await self._agent.close()
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._vm is not None:
            self._vm.kill()
        for c in self.containers.values():
            c.stopped(128 + signal.SIGKILL)  # its processes died with the VM
        if self._net is not None:
            _off_loop(self._net.teardown, "network teardown")
        try:
            if self._shared is not None:
                self._shared.destroy()
        finally:
            self._dir.remove()
            self._sm.to(_S.STOPPED)

    def _on_agent_failure(self, err: AgentError) -> None:
        """A guest that broke the agent protocol is stopped at once, not when its
        owner next looks: nothing it says can be trusted any more."""
        if isinstance(err, ProtocolError) and self._vm is not None and self.alive:
            log.error("sandbox %s: %s: stopping the VM", self.id, err)
            self._vm.kill()

    async def _watch_shared(self, interval: float = 0.5) -> None:
        """Fail-stop when the file server dies: the guest cannot abort a virtio-fs
        connection (the kernel keeps it out of fusectl and refuses a forced
        unmount), so every access to the shared files would hang forever."""
        while self._vm is not None and self.alive:
            why = self._vm.shared_fs_failure()
            if why is not None:
                self.shared_failure = why
                log.error("sandbox %s: its file server died (%s): stopping the VM", self.id, why)
                await self._vm.shutdown(timeout=1.0)  # QMP quit: no guest state is worth a wait
                return
            await asyncio.sleep(interval)

    @property
    def alive(self) -> bool:
        """The VM process still runs."""
        return self._vm is not None and self._vm.exit_status() is None

    # -- snapshots (sandbox/snapshot.py) -------------------------------------------
    @property
    def vm_config(self) -> VmConfig | None:
        """What the VM was launched with (its device configuration)."""
        return self._launched

    def snapshot_refusal(self) -> str | None:
        """Why this sandbox's VM state cannot be saved (None: it can)."""
        if self.config.shared_fs:
            return (
                f"sandbox {self.id} has a virtio-fs device (vhost-user-fs-device, tag "
                f"{p.SHARED_FS_TAG}), which QEMU 7.2 cannot save: run the container with "
                "--root-in-vm (its root on an erofs disk, its writes in the VM) to snapshot it"
            )
        if self._launched is not None and self._launched.channel.kind != "serial":
            return f"sandbox {self.id} talks to its agent over vsock: snapshots need virtio-serial"
        return None

    async def save_state(self, fd: int) -> int:
        """Pause the VM and write its whole state to ``fd``; it stays paused
        (``resume_vm``, or ``stop``). Returns the bytes of RAM written."""
        self._sm.require("snapshot the sandbox", _S.RUNNING)
        why = self.snapshot_refusal()
        if why is not None:
            raise SandboxError(why)
        return await self._saver().save_state(fd)

    async def resume_vm(self) -> None:
        self._sm.require("resume the sandbox", _S.RUNNING)
        await self._saver().resume()

    def _saver(self) -> SavesState:
        if not isinstance(self._vm, SavesState):
            raise SandboxError(f"hypervisor {self.config.hypervisor} cannot save or load VM state")
        return self._vm

    async def start_restored(
        self, fd: int, cmdline: str, check: Callable[[VmConfig], None] = lambda _vm: None
    ) -> p.ProcessList:
        """Start the VM from the state in ``fd`` (saved by ``save_state`` from a
        sandbox of the same config, booted with ``cmdline``), reconnect to its agent,
        set its clock and reseed its random pool. Returns what the agent runs: adopt
        the containers with ``adopt``. ``check`` may refuse the VM's config first."""
        self._sm.to(_S.STARTING)
        if self.config.shared_fs or self.config.netns:
            raise SandboxError("a restored sandbox has no shared directory and no network")
        self._dir.make()
        try:
            self._isolated = [isolated_tap(i) for i in range(len(self.config.isolated_nics))]
            vm_config = dataclasses.replace(self._vm_config(), cmdline=cmdline, incoming=True)
            check(vm_config)
            self._launched = vm_config
            self._vm = create_vm(self.config.hypervisor, vm_config)
            await self._vm.launch()
        finally:
            for tap in self._isolated:  # QEMU holds its own copies: the taps live as long as it
                os.close(tap)
            self._isolated = []
        await self._saver().load_state(fd)
        await self._saver().resume()
        await self._connect(vm_config, resync=True)
        self._agent.on_failure = self._on_agent_failure
        await self._agent.set_clock(p.SetClock(epoch_ns=time.time_ns()))
        await self._reseed_random()
        running = await self._agent.list_processes()
        self._next_stream = max((i.stream for i in running.processes), default=0) + 1
        self._sm.to(_S.RUNNING)
        return running

    async def reseed_random(self) -> None:
        """Mix host randomness into the guest's pool and reseed its CRNG now."""
        self._sm.require("reseed the guest's random pool", _S.RUNNING)
        await self._reseed_random()

    async def _reseed_random(self) -> None:
        await self._agent.reseed_random(p.ReseedRandom(entropy=secrets.token_hex(p.RESEED_BYTES)))

    def adopt(self, spec: ContainerSpec, info: p.ProcessInfo, output: Output) -> Container:
        """The container ``spec`` whose init ``info`` describes, already running (or
        ended) in a restored VM; its output from now on goes to ``output``."""
        self._sm.require("adopt a container", _S.RUNNING)
        if spec.id in self.containers or spec.id != info.container_id or not info.init:
            raise SandboxError(f"cannot adopt container {spec.id} in sandbox {self.id}")
        container = Container(self, self._agent, spec, spec.oci, self._rootfs(spec), self.failure)
        container.adopt(info.stream, output, None if info.running else info.status)
        self.containers[spec.id] = container
        return container

    # -- containers -------------------------------------------------------------
    async def create_container(self, spec: ContainerSpec) -> Container:
        """Prepare a container in the guest; several may share one sandbox (a pod)."""
        self._sm.require("create a container", _S.RUNNING)
        if spec.id in self.containers:
            raise SandboxError(f"container {spec.id} already exists in sandbox {self.id}")
        try:
            fstype, source = self._rootfs(spec)
            oci = self._with_volumes(spec.id, spec.oci, spec.volumes)
            container = Container(self, self._agent, spec, oci, (fstype, source), self.failure)
            self.containers[spec.id] = container
            await container.create()
        except BaseException:
            self.containers.pop(spec.id, None)
            if self._shared is not None and self.state is _S.RUNNING:
                try:
                    self._shared.remove(spec.id)
                except VmpodError as err:
                    log.warning("%s", err)
            raise
        return container

    def _rootfs(self, spec: ContainerSpec) -> tuple[str, str]:
        """(fstype, source) by which the guest finds the container's root filesystem."""
        disk = self._rootfs_sources.get(spec.rootfs)
        if disk is not None:
            return self.config.rootfs_fstype, disk
        if not spec.rootfs.is_dir():
            raise SandboxError(
                f"the root filesystem {spec.rootfs} is neither a directory nor a disk "
                f"attached to sandbox {self.id} at boot",
                hint="list every container disk in SandboxConfig.disks",
            )
        if self.config.rootfs_fstype == "dir":
            return "dir", str(spec.rootfs)
        root = spec.oci.get("root")
        readonly = isinstance(root, dict) and root.get("readonly") is True
        return "virtiofs", self._share(Share(f"{spec.id}/rootfs", spec.rootfs, readonly), relative=True)

    def _with_volumes(
        self, cid: str, oci: dict[str, object], volumes: tuple[Volume, ...]
    ) -> dict[str, object]:
        """``oci`` with each volume's mount pointed at its share in the guest."""
        if not volumes:
            return oci
        out = copy.deepcopy(oci)
        mounts = out.get("mounts")
        for i, v in enumerate(volumes):
            if not isinstance(mounts, list) or not 0 <= v.mount < len(mounts):
                raise SandboxError(f"volume {v.source}: no mount {v.mount} in the container's config")
            mount = mounts[v.mount]
            assert isinstance(mount, dict)
            mount["source"] = self._share(Share(f"{cid}/v{i}", v.source, v.readonly))
        return out

    def _share(self, share: Share, relative: bool = False) -> str:
        """Bind ``share`` into the shared directory; its guest path (or relative name)."""
        if self._shared is None:
            raise SandboxError(
                f"cannot share {share.source}: sandbox {self.id} has no shared directory",
                hint="set SandboxConfig.shared_fs",
            )
        self._shared.add(share)
        return share.name if relative else f"{self._guest_shared}/{share.name}"

    def share_scratch(self, name: str, source: Path, *, readonly: bool = False) -> str:
        """Share host directory ``source`` at ``name`` (e.g. CRIU images), writable
        unless ``readonly``; returns the path below the guest's shared mount that names it."""
        self._sm.require("share a directory", _S.RUNNING)
        return self._share(Share(name, source, readonly=readonly), relative=True)

    def unshare(self, name: str) -> None:
        """Undo ``share_scratch``."""
        if self._shared is not None and self.state is _S.RUNNING:
            self._shared.remove(name)

    async def criu_check(self) -> p.CommandResult:
        """``criu check`` in the guest: can this VM checkpoint and restore processes?"""
        self._sm.require("check CRIU", _S.RUNNING)
        return await self._agent.criu_check()

    def forget_container(self, cid: str) -> None:
        """Drop an ended container of this (still running) sandbox: its shares are
        unmounted on the host; its id may be used again."""
        c = self.containers.get(cid)
        if c is None:
            return
        if c.state not in (ContainerState.STOPPED, ContainerState.CREATED, ContainerState.NEW):
            raise SandboxError(f"container {cid} still runs in sandbox {self.id}")
        del self.containers[cid]
        if self._shared is not None and self.state is _S.RUNNING:
            self._shared.remove(cid)

    def next_stream(self) -> int:
        """A fresh stdio stream number for a process of this sandbox."""
        s = self._next_stream
        self._next_stream += 1
        return s

    # -- guest kernel and facts ---------------------------------------------------
    async def load_modules(self) -> None:
        """insmod the configured modules in order; a failure names the module."""
        for m in self.config.modules:
            res = await self.load_module(m)
            if res.status != 0:
                raise SandboxError(
                    f"loading kernel module {m.name} failed: "
                    f"{(res.stderr or res.stdout).strip() or f'status {res.status}'}",
                    hint="see the kernel log (dmesg) of the guest",
                )

    async def load_module(self, m: ModuleLoad) -> p.CommandResult:
        self._sm.require("load a kernel module", _S.RUNNING)
        return await self._agent.load_module(
            p.LoadModule(path=f"{p.MODULES_DIR}/{m.name}.ko", params=tuple(m.params))
        )

    async def unload_module(self, name: str) -> p.CommandResult:
        self._sm.require("unload a kernel module", _S.RUNNING)
        return await self._agent.unload_module(p.UnloadModule(name=name))

    async def kernel_log(self, since: int = -1) -> p.KernelLogResult:
        self._sm.require("read the kernel log", _S.RUNNING)
        return await self._agent.kernel_log(p.KernelLog(since=since))

    async def guest_info(self) -> p.GuestInfo:
        self._sm.require("ask for guest facts", _S.RUNNING)
        return await self._agent.guest_info()

    # -- diagnosis ------------------------------------------------------------------
    async def failure(self, grace: float = 2.0) -> VmpodError | None:
        """Why the VM is gone, if it is (used when the agent channel drops).

        The channel closes while the dying VMM is still exiting: wait a moment.
        """
        if self._vm is None:
            return None
        deadline = time.monotonic() + grace
        while (code := self._vm.exit_status()) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if code is None:
            return None
        if self.shared_failure:
            how = f"its file server died: {self.shared_failure}"
            return HypervisorError(f"the VM was stopped ({how})", console_tail=self.console_tail(), how=how)
        how = f"QEMU {describe_exit(code)}"
        return HypervisorError(
            f"the VM stopped unexpectedly ({how})", console_tail=self.console_tail(), how=how
        )

    def console_tail(self, lines: int = 20) -> str:
        return self._vm.console_tail(lines) if self._vm else ""


def guest_network(net: WiredNetwork) -> p.ConfigureNetwork:
    """The pod namespace's interfaces and routes, as the guest replays them on its
    NICs (found by MAC: each NIC has its veth's)."""
    return p.ConfigureNetwork(
        interfaces=tuple(
            p.NetInterface(mac=w.mac, mtu=w.mtu, addresses=tuple(str(a) for a in w.addresses), name=w.name)
            for w in net.interfaces
        ),
        routes=tuple(
            p.NetRoute(
                dest=str(r.destination),
                mac=w.mac,
                gateway=str(r.gateway) if r.gateway is not None else "",
                metric=r.metric or 0,
            )
            for w in net.interfaces
            for r in w.routes
        ),
    )


def isolated_tap(n: int) -> int:
    """A tap (with virtio-net headers, as the saved NIC had) alone in a new network
    namespace, down: what the guest sends there goes nowhere, nothing comes back.
    The namespace vanishes with the tap, when QEMU closes it."""
    from vmpod.network.netns import run_in_netns  # (pyroute2: only when used)
    from vmpod.network.tap import open_tap, tap_name

    return run_in_netns(None, lambda: open_tap(tap_name(n)))


def _off_loop(fn: Callable[[], None], what: str) -> None:
    """Run ``fn`` in a thread of its own and wait: pyroute2 (networking) runs an
    asyncio loop of its own, which cannot run inside the caller's."""
    errors: list[BaseException] = []

    def call() -> None:
        try:
            fn()
        except BaseException as err:  # reported below, in the caller's thread
            errors.append(err)

    t = threading.Thread(target=call, name=what)
    t.start()
    t.join()
    for err in errors:
        if not isinstance(err, VmpodError):
            raise err
        log.warning("%s: %s", what, err)
