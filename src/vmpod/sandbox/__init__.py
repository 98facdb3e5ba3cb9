"""The sandbox core: one VM per sandbox (a pod), N containers in it. The one API
every front end (cli, runtime, matrix; later shim, pods, forensics) goes through.

    spec = SandboxSpec(kernel=..., rootfs=(disk,))        # what you want
    config = prepare(paths, spec)                         # resolved before boot
    async with Sandbox(paths, config) as sandbox:         # VM up, agent connected
        c = await sandbox.create_container(ContainerSpec(id, oci, rootfs=disk))
        proc = await c.start(Output(out, err), stdin=False)
        status = (await proc.wait()).status
"""

# Agent records and limits front ends see through this API (they never import the agent).
from vmpod.agent.protocol import CHECKPOINT_TIMEOUT, MEMORY_DUMP_TIMEOUT, CommandResult, KernelLogResult
from vmpod.sandbox.build import SandboxSpec, prepare
from vmpod.sandbox.config import ContainerSpec, ContainerState, SandboxConfig, SandboxState, Volume
from vmpod.sandbox.container import LEAVE_STOPPED, Container
from vmpod.sandbox.process import Exit, Output, Process
from vmpod.sandbox.sandbox import Sandbox

__all__ = [
    "CHECKPOINT_TIMEOUT",
    "CommandResult",
    "KernelLogResult",
    "LEAVE_STOPPED",
    "MEMORY_DUMP_TIMEOUT",
    "Container",
    "ContainerSpec",
    "ContainerState",
    "Exit",
    "Output",
    "Process",
    "Sandbox",
    "SandboxConfig",
    "SandboxSpec",
    "SandboxState",
    "Volume",
    "prepare",
]
