"""Hostile guest (issue 11) in a real VM: the guest's end of the agent channel is
taken over by a program that says hello like the agent, then answers the host's
first request with garbage. The sandbox must fail with one clear ProtocolError
line and leave nothing: no QEMU, no state directory.

The takeover: an extra cpio appended to the initramfs replaces /init with the
real one whose last step (switch_root to the agent) runs the hostile program
instead, on the guest's python, through the real virtio-serial port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest

from tests.vm.conftest import qemu_pids
from vmpod.agent import protocol as p
from vmpod.errors import ProtocolError
from vmpod.guest.initramfs import init_script
from vmpod.images import resolve_rootfs
from vmpod.paths import Paths
from vmpod.proc import run
from vmpod.sandbox import Sandbox, SandboxSpec, SandboxState, prepare
from vmpod.storage.erofs import rootfs_disk

AGENT_EXEC = b"exec $B switch_root /sysroot /usr/bin/python3 -I -S /opt/vmpod/agent.py"

HOSTILE = """
import os, sys, time
sys.path.insert(0, "/opt/vmpod")
from vmpod.agent import protocol as p
from vmpod.agent.guest.channel import _find_port
dev = None
while dev is None:
    dev = _find_port(p.PORT_NAME)
    time.sleep(0.02)
fd = os.open(dev, os.O_RDWR)
hello = {{"event": "hello", "protocol": p.PROTOCOL_VERSION, "agent_version": "hostile",
          "kernel": os.uname().release, "uptime": 1.0}}
os.write(fd, p.encode_json(p.EVENT, 0, hello))
while not os.read(fd, 65536):  # EOF while the host is away: look again
    time.sleep(0.05)
print("hostile-guest: sending garbage", flush=True)
os.write(fd, {garbage!r})
time.sleep(3600)
"""

GARBAGE = {  # what the guest sends -> what the error must say
    "4 GiB header": (
        p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, p.STDOUT, 1, 2**32 - 1) + b"x" * 4096,
        "frame of 4294967295 bytes exceeds",
    ),
    "not JSON": (p.encode_frame(p.RESPONSE, 1, b"[" * 30000), "invalid JSON payload"),
}


def hostile_initramfs(base: Path, dest: Path, garbage: bytes) -> Path:
    """``base`` plus a cpio whose /init runs the hostile program instead of the agent."""
    init = init_script()
    assert init.rstrip().endswith(AGENT_EXEC), "init.sh no longer ends with the agent's exec"
    stage = dest.parent / "hostile-stage"
    stage.mkdir()
    (stage / "hostile.py").write_text(HOSTILE.format(garbage=garbage))
    takeover = b"$B cp /hostile.py /sysroot/run/hostile.py\n" + AGENT_EXEC.replace(
        b"/opt/vmpod/agent.py", b"/run/hostile.py"
    )
    (stage / "init").write_bytes(init.rstrip()[: -len(AGENT_EXEC)] + takeover + b"\n")
    (stage / "init").chmod(0o755)
    extra = run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        what="pack the hostile init",
        cwd=stage,
        input=b"init\nhostile.py\n",
    ).stdout
    data = base.read_bytes()
    dest.write_bytes(data + b"\0" * (-len(data) % 4) + extra)  # archives start 4-aligned
    return dest


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_from_the_guest_stops_the_sandbox(
    paths: Paths, busybox: Path, tmp_path: Path, name: str
) -> None:
    disk = rootfs_disk(paths, resolve_rootfs(busybox))
    config = prepare(paths, SandboxSpec(rootfs=(disk,), agent_channel="serial"))
    garbage, says = GARBAGE[name]
    initramfs = hostile_initramfs(config.assets.initramfs, tmp_path / "hostile.cpio", garbage)
    config = dataclasses.replace(config, assets=dataclasses.replace(config.assets, initramfs=initramfs))
    sandbox = Sandbox(paths, config)
    with pytest.raises(ProtocolError, match="guest broke the agent protocol") as info:
        asyncio.run(sandbox.__aenter__())
    text = str(info.value)
    assert says in text and "\n" not in text and len(text) < 200, text
    assert sandbox.state is SandboxState.STOPPED and not sandbox.state_dir.exists()
    deadline = time.monotonic() + 10  # QEMU was killed: it may take a moment to be reaped
    while qemu_pids(str(paths.run)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pids(str(paths.run)) == []
