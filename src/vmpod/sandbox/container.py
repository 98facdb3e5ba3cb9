"""A container inside a sandbox: create (bundle in the guest), start, exec, signal."""
from __future__ import annotations

from dataclasses import dataclass, field

from vmpod.agent.client import ProcessSink
from vmpod.sandbox.sandbox import Sandbox


@dataclass(frozen=True)
class ContainerConfig:
    id: str
    spec: dict[str, object]       # OCI runtime config (see sandbox.spec)
    rootfs_serial: str            # disk carrying the image (erofs)
    user: str = ""                # resolved against the image's /etc/passwd in the guest
    runtime: str = "runc"         # OCI runtime inside the guest: runc or crun
    # small host files for bind mounts: NAME -> base64 (see protocol.CreateContainer)
    files: dict[str, str] = field(default_factory=dict)


class Container:
    def __init__(self, sandbox: Sandbox, config: ContainerConfig) -> None:
        self.sandbox = sandbox
        self.config = config
        self._next_stream = 1

    def _stream(self) -> int:
        s = self._next_stream
        self._next_stream += 1
        return s

    async def create(self) -> None:
        args: dict[str, object] = {
            "container_id": self.config.id, "spec": self.config.spec,
            "rootfs_serial": self.config.rootfs_serial, "user": self.config.user,
            "runtime": self.config.runtime}
        if self.config.files:
            args["files"] = self.config.files
        await self.sandbox.agent.request("create_container", args)

    async def start(self, sink: ProcessSink, *, stdin: bool, wait_started: bool = False) -> int:
        """Run the container's process; returns the stream that carries its stdio.

        ``wait_started``: return only once the process runs (or failed to), as
        ``runc start`` does, instead of as soon as the guest runtime was spawned.
        """
        stream = self._stream()
        self.sandbox.agent.attach(stream, sink)
        args: dict[str, object] = {"container_id": self.config.id, "stream": stream,
                                   "stdin": stdin}
        if wait_started:
            args["wait_started"] = True
        await self.sandbox.agent.request("start_container", args,
                                         timeout=120 if wait_started else 30)
        return stream

    async def exec(self, process: dict[str, object], sink: ProcessSink, *, stdin: bool,
                   user: str = "") -> int:
        stream = self._stream()
        self.sandbox.agent.attach(stream, sink)
        await self.sandbox.agent.request("exec", {
            "container_id": self.config.id, "stream": stream, "process": process,
            "stdin": stdin, "user": user})
        return stream

    async def signal(self, stream: int, sig: int) -> None:
        await self.sandbox.agent.request("signal", {"stream": stream, "signal": int(sig)})

    async def resize(self, stream: int, rows: int, cols: int) -> None:
        await self.sandbox.agent.request("resize", {"stream": stream, "rows": rows, "cols": cols})
