"""A pod member's monitor process: the pid its engine waits for, without a VM.

``create`` forks it for a container that belongs to a pod whose first container
runs here already (``pod_of``). It hands its stdio to that container's monitor
over ``pod.sock`` (SCM_RIGHTS); there the member gets a session of its own in
the pod's VM, with its own ``monitor.sock`` for the runtime's other commands.
This process holds the member's monitor lock, passes on the signals it gets,
and exits with the member's status when the pod's monitor reports it (as
SIGKILLed if the pod's monitor goes away first: the VM went with it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
from dataclasses import dataclass
from types import FrameType
from typing import NoReturn

from vmpod.errors import VmpodError
from vmpod.runtime import ipc
from vmpod.runtime.bundle import Plan
from vmpod.runtime.cgroups import HostCgroup
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.exits import exit_like
from vmpod.runtime.monitor import become_monitor, null_stdio
from vmpod.runtime.outputlog import LogSink
from vmpod.runtime.session import MONITOR_SIGNALS
from vmpod.runtime.state import Store, proc_start_time

log = logging.getLogger(__name__)
_PROC_NETNS = re.compile(r"/proc/(\d+)/ns/net")


@dataclass(frozen=True)
class MemberArgs:
    store_root: str
    cid: str
    bundle: str
    pod: str  # the pod's first container (its monitor owns the VM)
    console_socket: str
    ready_fd: int
    output_log: LogSink | None = None  # the member's output goes there (`vmpod run -d`)
    log_path: str = ""
    log_format: str = "text"
    debug: bool = False
    # the member's own cgroup on the host: its monitor process only (the VM is in the
    # pod's first container's), so the engine's accounting paths exist, as with Kata
    host_cgroup: HostCgroup | None = None


def pod_of(store: Store, plan: Plan) -> str:
    """The running container whose VM this one joins ("" for a pod of its own).

    Engines say so with annotations (``Plan.pod``: CRI's sandbox id, CRI-O's and
    podman's SandboxID); failing those, a network namespace that is a vmpod
    monitor's (podman gives pod members ``/proc/<infra pid>/ns/net``).
    """
    if plan.pod:
        if not (store.dir(plan.pod) / "state.json").exists():
            raise RuntimeCliError(f"pod sandbox {plan.pod} is not a vmpod-runtime container here")
        return _running(store, plan.pod)
    m = _PROC_NETNS.fullmatch(plan.netns)
    if m is None:
        return ""
    pid = int(m.group(1))
    for cid in store.ids():
        with contextlib.suppress(RuntimeCliError, OSError):
            if store.load(cid).pid == pid and store.monitor_alive(cid):
                return _running(store, cid)
    return ""


def _running(store: Store, pod: str) -> str:
    if not store.monitor_alive(pod) or not (store.dir(pod) / "pod.sock").exists():
        raise RuntimeCliError(f"pod sandbox {pod} is not running (its VM is gone)")
    return pod


def member_main(args: MemberArgs, keep: tuple[int, ...]) -> NoReturn:
    """Entry point in the forked child; never returns."""
    status = 255
    try:
        become_monitor({args.ready_fd, *keep}, args.log_path, args.log_format, args.debug)
        if args.output_log is not None and not args.output_log.tee:
            null_stdio()  # the log is the container's output: hold no caller's pipe
        status = _serve(args)
    except BaseException as err:  # the monitor must always exit with a status
        log.error("pod member monitor failed: %s", err, exc_info=not isinstance(err, VmpodError))
    logging.shutdown()
    exit_like(status)


def _serve(args: MemberArgs) -> int:
    store = Store(args.store_root)
    store.update(args.cid, pid=os.getpid(), monitor_start=proc_start_time(os.getpid()))
    cg = args.host_cgroup
    try:
        if cg is not None:
            try:
                if cg.setup(store.dir(args.cid)):
                    cg.enter()
            except RuntimeCliError as err:
                _ready(args.ready_fd, {"ok": False, "error": str(err)})
                return 255
        return _member(args, store)
    finally:
        if cg is not None:
            cg.leave(store.dir(args.cid))


def _member(args: MemberArgs, store: Store) -> int:
    try:
        client = ipc.Client(store.dir(args.pod) / "pod.sock", timeout=None)
        msg: dict[str, object] = {
            "op": "join",
            "cid": args.cid,
            "bundle": args.bundle,
            "console_socket": args.console_socket,
            "output_log": dataclasses.asdict(args.output_log) if args.output_log else None,
        }
        client.send(msg, fds=[0, 1, 2])
        reply = client.recv()
    except RuntimeCliError as err:
        reply = {"ok": False, "error": f"cannot join pod {args.pod}: {err}"}
    _ready(args.ready_fd, reply if not reply.get("ok") else {"ok": True, "pid": os.getpid()})
    if not reply.get("ok"):
        return 255
    null_stdio()  # our stdio is the pod monitor's to use now
    sock = store.dir(args.cid) / "monitor.sock"

    def forward(sig: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(RuntimeCliError, OSError):
            ipc.request(sock, {"op": "kill", "signal": sig, "all": False}, timeout=5)

    for sig in MONITOR_SIGNALS:
        signal.signal(sig, forward)
    try:
        event = client.recv()
    except RuntimeCliError:
        return 128 + signal.SIGKILL  # the pod's monitor (and its VM) went away
    status = event.get("status")
    return status if isinstance(status, int) else 255


def _ready(fd: int, msg: dict[str, object]) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, json.dumps(msg).encode() + b"\n")
    with contextlib.suppress(OSError):
        os.close(fd)
