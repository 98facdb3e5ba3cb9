"""`vmpod-runtime exec`: run another process in a running container.

The caller's stdio fds travel to the monitor (SCM_RIGHTS), which relays the
process's stdio to them; the caller then waits on the monitor connection for
the exit status (forwarding signals and terminal size). With ``--detach`` a
relay child does the waiting: its pid goes to --pid-file and it exits with the
process's status, because podman's exec conmon waits for exactly that pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

import click

from vmpod.errors import ConfigError
from vmpod.jsonsafe import parse_json
from vmpod.runtime import ipc
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.exits import exit_like
from vmpod.runtime.rules import require
from vmpod.runtime.state import Store
from vmpod.sandbox.attach import raw_terminal, window_size
from vmpod.sandbox.build import check_text
from vmpod.signals import FORWARDED


def build_process(
    bundle: str,
    args: tuple[str, ...],
    tty_: bool,
    cwd: str,
    env: tuple[str, ...],
    user: str,
    gids: tuple[str, ...],
    caps: tuple[str, ...],
    no_new_privs: bool,
) -> dict[str, object]:
    """runc's rules: the container's process object with the command line's changes."""
    if not args:
        raise RuntimeCliError("exec args cannot be empty")
    try:
        spec = parse_json((Path(bundle) / "config.json").read_text())
        base = dict(spec.get("process") or {})
    except (OSError, ValueError):
        base = {"cwd": "/", "env": [], "user": {"uid": 0, "gid": 0}}
    process = {k: v for k, v in base.items() if k not in ("apparmorProfile", "selinuxLabel")}
    process["args"] = list(args)
    process["terminal"] = tty_
    process.pop("consoleSize", None)
    if cwd:
        process["cwd"] = cwd
    if env:
        process["env"] = list(process.get("env") or []) + list(env)
    if user:
        uid, _, gid = user.partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise RuntimeCliError(f"invalid --user {user!r} (format: <uid>[:<gid>])")
        process["user"] = {"uid": int(uid), "gid": int(gid or 0)}
    if gids:
        u = dict(process.get("user") or {"uid": 0, "gid": 0})
        u["additionalGids"] = [int(g) for g in gids]
        process["user"] = u
    if caps:
        sets = dict(process.get("capabilities") or {})
        for key in ("bounding", "effective", "permitted", "ambient"):
            sets[key] = sorted(set(sets.get(key) or []) | set(caps))
        process["capabilities"] = sets
    if no_new_privs:
        process["noNewPrivileges"] = True
    return process


def _load_process(path: str) -> dict[str, object]:
    try:
        obj = parse_json(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise RuntimeCliError(f"cannot read process file {path}: {err}") from err
    if not isinstance(obj, dict) or not obj.get("args"):
        raise RuntimeCliError(f"{path}: a process object with args is required")
    return {k: v for k, v in obj.items() if k not in ("apparmorProfile", "selinuxLabel")}


def exit_with(status: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    exit_like(status)


def _wait(client: ipc.Client, tty_fd: int | None) -> int:
    """Forward signals (and terminal size) until the exit event; returns the status."""

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            client.send({"op": "signal", "signal": sig})

    def resize(_sig: int = 0, _frame: object = None) -> None:
        size = window_size(tty_fd) if tty_fd is not None else None
        if size:
            with contextlib.suppress(OSError):
                client.send({"op": "resize", "rows": size[0], "cols": size[1]})

    for sig in FORWARDED:
        signal.signal(sig, forward)
    if tty_fd is not None:
        signal.signal(signal.SIGWINCH, resize)
        resize()
    client.sock.settimeout(None)
    while True:
        try:
            msg = client.recv()
        except RuntimeCliError:
            return 255  # the monitor went away (container deleted, VM died)
        if msg.get("event") == "exit":
            if msg.get("message"):
                print(f"vmpod-runtime: {msg['message']}", file=sys.stderr)
            status = msg.get("status")
            return status if isinstance(status, int) else 255


@click.command(context_settings={"help_option_names": ["-h", "--help"], "allow_interspersed_args": False})
@click.argument("container_id")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--process", "-p", "process_file", default="", help="Process JSON file.")
@click.option("--tty", "-t", "tty_", is_flag=True, help="Allocate a terminal.")
@click.option("--detach", "-d", is_flag=True, help="Do not wait; a relay child waits instead.")
@click.option("--pid-file", default="", help="Write the (relay) pid here.")
@click.option("--console-socket", default="", help="Unix socket that gets the pty master.")
@click.option("--cwd", default="", help="Working directory in the container.")
@click.option("--env", "-e", multiple=True, help="NAME=VALUE to add.")
@click.option("--user", "-u", default="", help="UID[:GID].")
@click.option("--additional-gids", "-g", multiple=True, help="Extra group ids.")
@click.option("--cap", "-c", multiple=True, help="Extra capability.")
@click.option("--no-new-privs", is_flag=True)
@click.option("--preserve-fds", type=int, default=0, hidden=True)
@click.option("--process-label", default="", hidden=True)
@click.option("--apparmor", default="", hidden=True)
@click.option("--cgroup", default="", hidden=True)
@click.option("--ignore-paused", is_flag=True, hidden=True)
def exec_command(
    container_id: str,
    args: tuple[str, ...],
    process_file: str,
    tty_: bool,
    detach: bool,
    pid_file: str,
    console_socket: str,
    cwd: str,
    env: tuple[str, ...],
    user: str,
    additional_gids: tuple[str, ...],
    cap: tuple[str, ...],
    no_new_privs: bool,
    preserve_fds: int,
    process_label: str,
    apparmor: str,
    cgroup: str,
    ignore_paused: bool,
) -> None:
    """Run a new process in a running container."""
    store = Store(click.get_current_context().find_root().obj["root"])
    st = store.load(container_id)
    require("exec", store.status(st))
    if process_file:
        process = _load_process(process_file)
        tty_ = bool(process.get("terminal"))
    else:
        process = build_process(st.bundle, args, tty_, cwd, env, user, additional_gids, cap, no_new_privs)
    try:
        check_text(process, "process")
    except ConfigError as err:
        raise RuntimeCliError(str(err)) from None
    if tty_ and detach and not console_socket:
        raise RuntimeCliError("cannot allocate tty if runc will detach without setting console socket")
    if console_socket and not tty_:
        raise RuntimeCliError("cannot use console socket if runc will not detach or allocate tty")
    client = ipc.Client(store.dir(container_id) / "monitor.sock")
    fds = [] if console_socket else [0, 1, 2]
    client.request({"op": "exec", "process": process, "console_socket": console_socket}, fds)
    if detach:
        pid = os.fork()
        if pid == 0:  # the relay: conmon waits for this pid and takes its status
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            exit_with(_wait(client, None))
        client.close()
        if pid_file:
            from vmpod.runtime.lifecycle import write_pid_file

            write_pid_file(pid_file, pid)
        return
    own_tty = tty_ and not console_socket and os.isatty(0)
    with raw_terminal(0) if own_tty else contextlib.nullcontext():
        code = _wait(client, 0 if own_tty else None)
    sys.exit(code)  # like runc exec: 128+N for a signal, no re-raise
