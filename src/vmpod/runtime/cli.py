"""`vmpod-runtime`: runc's command line, each container in its own VM.

Errors go to stderr and, with --log, to that file (text or JSON lines like
runc's logrus output); the exit status is then 1.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from vmpod.errors import VmpodError
from vmpod.jsonsafe import parse_json
from vmpod.runtime import ipc, lifecycle
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.logs import setup_logging
from vmpod.runtime.rules import require
from vmpod.runtime.state import DEFAULT_ROOT, Store
from vmpod.stdio import reserve_stdio

log = logging.getLogger("vmpod")
_LOG: dict[str, str] = {"path": "", "format": "text", "debug": ""}
_CTX = {"help_option_names": ["-h", "--help"]}
F = TypeVar("F", bound=Callable[..., Any])


def parse_signal(raw: str) -> int:
    """runc's rules: a number, or a name with or without SIG, any case."""
    if raw.isdigit():
        n = int(raw)
        if 0 < n < 65:
            return n
        raise RuntimeCliError(f"unknown signal {raw!r}")
    name = raw.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise RuntimeCliError(f"unknown signal {raw!r}") from None


def _store() -> Store:
    return Store(click.get_current_context().find_root().obj["root"])


@click.group(context_settings=_CTX)
@click.option("--root", default=DEFAULT_ROOT, show_default=True, help="State directory.")
@click.option("--log", "log_path", default="", help="Log file (default: stderr).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
@click.option("--debug", is_flag=True, help="Debug logging.")
@click.option("--systemd-cgroup", is_flag=True, help="Accepted for compatibility; ignored.")
@click.option("--criu", default="", hidden=True)
@click.option("--rootless", default="", hidden=True)
@click.version_option("0.1.0", prog_name="vmpod-runtime", message="%(prog)s version %(version)s\nspec: 1.0.2")
@click.pass_context
def cli(
    ctx: click.Context,
    root: str,
    log_path: str,
    log_format: str,
    debug: bool,
    systemd_cgroup: bool,
    criu: str,
    rootless: str,
) -> None:
    """A runc-compatible OCI runtime that runs every container in its own VM."""
    _LOG.update(path=log_path, format=log_format, debug="1" if debug else "")
    setup_logging(log_path, log_format, debug)
    ctx.obj = {"root": root}


@cli.command(context_settings=_CTX)
@click.argument("container_id")
@click.option("--bundle", "-b", default=".", help="Bundle directory (config.json).")
@click.option("--pid-file", default="", help="Write the monitor's pid here.")
@click.option("--console-socket", default="", help="Unix socket that gets the pty master.")
@click.option("--no-pivot", is_flag=True, help="Accepted; the guest runtime decides.")
@click.option("--no-new-keyring", is_flag=True, help="Accepted; the guest runtime decides.")
@click.option("--preserve-fds", type=int, default=0, help="Not supported (must be 0).")
def create(
    container_id: str,
    bundle: str,
    pid_file: str,
    console_socket: str,
    no_pivot: bool,
    no_new_keyring: bool,
    preserve_fds: int,
) -> None:
    """Boot the container's VM and prepare the container (its process is not run)."""
    # Imported here for start-up time: only `create` needs the sandbox stack.
    from vmpod.runtime.create import create as create_container

    if preserve_fds:
        raise RuntimeCliError("--preserve-fds is not supported by vmpod-runtime")
    create_container(
        _store(),
        container_id,
        bundle,
        pid_file,
        console_socket,
        (_LOG["path"], _LOG["format"], bool(_LOG["debug"])),
    )


@cli.command("run", context_settings=_CTX)
@click.argument("container_id")
@click.option("--bundle", "-b", default=".", help="Bundle directory (config.json).")
@click.option("--detach", "-d", is_flag=True, help="Return once the container runs.")
@click.option("--pid-file", default="", help="Write the monitor's pid here.")
@click.option("--console-socket", default="", help="Unix socket that gets the pty master.")
@click.option("--no-pivot", is_flag=True, help="Accepted; the guest runtime decides.")
@click.option("--no-new-keyring", is_flag=True, help="Accepted; the guest runtime decides.")
@click.option("--preserve-fds", type=int, default=0, help="Not supported (must be 0).")
@click.option("--keep", is_flag=True, help="Keep the stopped container (do not delete it).")
def run_(
    container_id: str,
    bundle: str,
    detach: bool,
    pid_file: str,
    console_socket: str,
    no_pivot: bool,
    no_new_keyring: bool,
    preserve_fds: int,
    keep: bool,
) -> None:
    """Create and start a container, wait for it and delete it; its exit status is ours."""
    # Imported here for start-up time: only `run` and `create` need the sandbox stack.
    from vmpod.runtime.run import run

    if preserve_fds:
        raise RuntimeCliError("--preserve-fds is not supported by vmpod-runtime")
    status = run(
        _store(),
        container_id,
        bundle,
        detach=detach,
        keep=keep,
        pid_file=pid_file,
        console_socket=console_socket,
        log_opts=(_LOG["path"], _LOG["format"], bool(_LOG["debug"])),
    )
    sys.exit(status)


@cli.command(context_settings=_CTX)
@click.argument("container_id")
def start(container_id: str) -> None:
    """Run the user process of a created container."""
    lifecycle.start(_store(), container_id)


@cli.command(context_settings=_CTX)
@click.argument("container_id")
def state(container_id: str) -> None:
    """Print the container's state (runtime spec State JSON)."""
    store = _store()
    st = store.load(container_id)
    click.echo(json.dumps(st.oci(store.status(st)), indent=2))


@cli.command(context_settings=_CTX)
@click.argument("container_id")
@click.argument("sig", default="SIGTERM")
@click.option("--all", "-a", "all_", is_flag=True, help="Signal every process of the container.")
def kill(container_id: str, sig: str, all_: bool) -> None:
    """Send a signal (default TERM) to the container's process."""
    store = _store()
    st = store.load(container_id)
    number = parse_signal(sig)
    require("kill", store.status(st))
    try:
        ipc.request(store.dir(container_id) / "monitor.sock", {"op": "kill", "signal": number, "all": all_})
    except RuntimeCliError:
        if not store.monitor_alive(container_id):
            raise RuntimeCliError("container not running") from None
        raise


@cli.command(context_settings=_CTX)
@click.argument("container_id")
@click.option("--force", "-f", is_flag=True, help="Kill a running container first.")
def delete(container_id: str, force: bool) -> None:
    """Remove a container: its VM, monitor and state."""
    lifecycle.delete(_store(), container_id, force)


def _runtime(
    container_id: str, command: str, args: list[str] | None = None, resources: dict[str, object] | None = None
) -> str:
    store = _store()
    require(command, store.status(store.load(container_id)))
    reply = ipc.request(
        store.dir(container_id) / "monitor.sock",
        {"op": "runtime", "command": command, "args": args or [], "resources": resources or {}},
        timeout=90,
    )
    return str(reply.get("stdout") or "")


@cli.command(context_settings=_CTX)
@click.argument("container_id")
def pause(container_id: str) -> None:
    """Freeze every process of the container."""
    _runtime(container_id, "pause")


@cli.command(context_settings=_CTX)
@click.argument("container_id")
def resume(container_id: str) -> None:
    """Thaw a paused container."""
    _runtime(container_id, "resume")


@cli.command(context_settings={**_CTX, "ignore_unknown_options": True})
@click.argument("container_id")
@click.argument("ps_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--format", "-f", "fmt", type=click.Choice(["table", "json"]), default="table")
def ps(container_id: str, ps_args: tuple[str, ...], fmt: str) -> None:
    """List the container's processes (pids as seen inside the VM)."""
    out = _runtime(container_id, "ps", ["--format", "json"])
    try:
        pids = json.loads(out or "[]")
    except ValueError as err:
        raise RuntimeCliError(f"unexpected ps output from the VM: {out[:200]!r}") from err
    if fmt == "json":
        click.echo(json.dumps(pids))
    else:
        click.echo("PID")
        for pid in pids:
            click.echo(str(pid))


@cli.command(context_settings=_CTX)
@click.argument("container_id")
@click.option("--stats", is_flag=True, help="Print one stats event and exit.")
@click.option("--interval", default="5s", help="Seconds between stats events (e.g. 5s).")
def events(container_id: str, stats: bool, interval: str) -> None:
    """Stats events of the container (from the guest runtime's cgroup)."""
    seconds = float(interval.rstrip("s") or 5)
    while True:
        try:
            out = _runtime(container_id, "events", ["--stats"])
        except RuntimeCliError:
            if stats:
                raise
            return  # the container stopped: the stream ends
        click.echo(out.strip())
        if stats:
            return
        time.sleep(seconds)


@cli.command(context_settings=_CTX)
@click.argument("container_id")
@click.option(
    "--resources", "-r", "resources_file", default="", help="Linux resources JSON file ('-' for stdin)."
)
@click.option("--memory", default="", help="Memory limit (bytes, or 512m, 1g).")
@click.option("--memory-reservation", default="")
@click.option("--memory-swap", default="")
@click.option("--cpu-period", type=int, default=None)
@click.option("--cpu-quota", type=int, default=None)
@click.option("--cpu-share", type=int, default=None)
@click.option("--cpuset-cpus", default="", hidden=True)
@click.option("--cpuset-mems", default="", hidden=True)
@click.option("--pids-limit", type=int, default=None)
@click.option("--blkio-weight", type=int, default=None, hidden=True)
def update(
    container_id: str,
    resources_file: str,
    memory: str,
    memory_reservation: str,
    memory_swap: str,
    cpu_period: int | None,
    cpu_quota: int | None,
    cpu_share: int | None,
    cpuset_cpus: str,
    cpuset_mems: str,
    pids_limit: int | None,
    blkio_weight: int | None,
) -> None:
    """Change the container's resource limits (inside its VM, whose size is fixed)."""
    # (imported on use, for start-up time: state/kill/list stay quick)
    from vmpod.runtime.bundle import guest_resources

    resources: dict[str, object] = {}
    if resources_file:
        text = sys.stdin.read() if resources_file == "-" else Path(resources_file).read_text()
        try:
            loaded = parse_json(text)
        except ValueError as err:
            raise RuntimeCliError(f"invalid resources JSON: {err}") from err
        if not isinstance(loaded, dict):
            raise RuntimeCliError("resources must be a JSON object")
        resources = loaded
    mem = dict(resources.get("memory") or {})  # type: ignore[call-overload]
    for key, raw in (("limit", memory), ("reservation", memory_reservation), ("swap", memory_swap)):
        if raw:
            mem[key] = parse_bytes(raw)
    cpu = dict(resources.get("cpu") or {})  # type: ignore[call-overload]
    for key, val in (("period", cpu_period), ("quota", cpu_quota), ("shares", cpu_share)):
        if val is not None:
            cpu[key] = val
    if mem:
        resources["memory"] = mem
    if cpu:
        resources["cpu"] = cpu
    if pids_limit is not None:
        resources["pids"] = {"limit": pids_limit}
    warnings: list[str] = []
    guest = guest_resources(resources, warnings)
    if cpuset_cpus or cpuset_mems or blkio_weight is not None:
        warnings.append("cpuset and blkio settings are ignored in the VM")
    for w in warnings:
        log.warning("%s", w)
    _runtime(container_id, "update", [], guest)


def parse_bytes(raw: str) -> int:
    units = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = raw.strip().lower().rstrip("b") or "0"
    mult = 1
    if text[-1] in units:
        mult, text = units[text[-1]], text[:-1]
    try:
        value = float(text) * mult
    except ValueError:
        raise RuntimeCliError(f"invalid size {raw!r}") from None
    return -1 if value < 0 else int(value)


@cli.command("list", context_settings=_CTX)
@click.option("--format", "-f", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--quiet", "-q", is_flag=True, help="Only ids.")
def list_(fmt: str, quiet: bool) -> None:
    """List the containers under --root."""
    store = _store()
    rows = []
    for cid in store.ids():
        try:
            st = store.load(cid)
        except RuntimeCliError:
            continue
        rows.append(st.oci(store.status(st)))
    if quiet:
        for r in rows:
            click.echo(str(r["id"]))
    elif fmt == "json":
        click.echo(json.dumps(rows))
    else:
        click.echo(f"{'ID':<20} {'PID':<10} {'STATUS':<10} {'BUNDLE':<40} {'CREATED':<32} OWNER")
        for r in rows:
            click.echo(
                f"{r['id']!s:<20} {r['pid']!s:<10} {r['status']!s:<10} {r['bundle']!s:<40} "
                f"{r['created']!s:<32} {r['owner'] or 'root'}"
            )


@cli.command(context_settings=_CTX)
def features() -> None:
    """What this runtime supports (runtime spec features.md)."""
    # (imported on use, for start-up time: state/kill/list stay quick)
    from vmpod.runtime.specgen import features_doc

    click.echo(json.dumps(features_doc(), indent=2))


@cli.command(context_settings=_CTX)
@click.option("--bundle", "-b", default=".", help="Where to write config.json.")
@click.option("--rootless", is_flag=True, help="Accepted; the VM is the boundary.")
def spec(bundle: str, rootless: bool) -> None:
    """Write a default config.json into the bundle."""
    # (imported on use, for start-up time: state/kill/list stay quick)
    from vmpod.runtime.specgen import write_default_spec

    write_default_spec(Path(bundle))


# flags the guest's CRIU cannot honour here (runtime/checkpoint.py says why)
_UNSUPPORTED_CHECKPOINT = (
    "ext_unix_sk",
    "shell_job",
    "lazy_pages",
    "page_server",
    "status_fd",
    "pre_dump",
    "parent_path",
    "auto_dedup",
)
_UNSUPPORTED_RESTORE = (
    "tcp_established",
    "ext_unix_sk",
    "shell_job",
    "lazy_pages",
    "file_locks",
    "auto_dedup",
    "lsm_profile",
    "lsm_mount_context",
)


def _given(flags: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    """The command-line names of ``names`` that were given (set, non-empty)."""
    return [f"--{n.replace('_', '-')}" for n in names if flags[n] not in (None, False, "")]


def _criu_flag(name: str, help_: str) -> Callable[[F], F]:
    return click.option(name, name.lstrip("-").replace("-", "_"), is_flag=True, help=help_)


@cli.command(context_settings=_CTX)
@click.argument("container_id")
@click.option("--image-path", default="", help="Where CRIU's images go (default: ./checkpoint).")
@click.option("--work-path", default="", help="Where dump.log goes (default: the image path).")
@click.option("--parent-path", default="", help="Not supported (incremental dumps).")
@_criu_flag("--leave-running", "Keep the container running after the dump.")
@_criu_flag("--file-locks", "Dump file locks.")
@_criu_flag("--tcp-established", "Dump established TCP connections (CRIU locks them with iptables).")
@_criu_flag("--ext-unix-sk", "Not supported.")
@_criu_flag("--shell-job", "Not supported.")
@_criu_flag("--lazy-pages", "Not supported.")
@_criu_flag("--pre-dump", "Not supported (incremental dumps).")
@_criu_flag("--auto-dedup", "Not supported.")
@click.option("--page-server", default="", help="Not supported.")
@click.option("--status-fd", type=int, default=None, help="Not supported.")
@click.option("--manage-cgroups-mode", default="", help="Only soft (the default).")
@click.option("--empty-ns", multiple=True, help="Only network (the VM's network is never dumped).")
def checkpoint(container_id: str, image_path: str, work_path: str, **flags: Any) -> None:
    """Dump the container with CRIU inside its VM; the images land on the host."""
    from vmpod.runtime import checkpoint as cp

    cp.refuse("checkpoint", _given(flags, _UNSUPPORTED_CHECKPOINT))
    cp.check_cgroup_mode(flags["manage_cgroups_mode"])
    cp.check_empty_ns(flags["empty_ns"])
    images, work = cp.default_paths_for(image_path, work_path)
    opts = cp.CheckpointOptions(
        images, work, flags["leave_running"], flags["file_locks"], flags["tcp_established"]
    )
    cp.checkpoint(_store(), container_id, opts)


@cli.command(context_settings=_CTX)
@click.argument("container_id")
@click.option("--bundle", "-b", default=".", help="Bundle directory (config.json).")
@click.option("--image-path", default="", help="CRIU's images (default: ./checkpoint).")
@click.option("--work-path", default="", help="Where restore.log goes (default: the image path).")
@click.option("--detach", "-d", is_flag=True, help="Return once the container runs.")
@click.option("--pid-file", default="", help="Write the monitor's pid here.")
@click.option("--console-socket", default="", help="Unix socket that gets the pty master.")
@click.option("--no-subreaper", is_flag=True, help="Accepted; the monitor reaps.")
@click.option("--no-pivot", is_flag=True, help="Accepted; the guest runtime decides.")
@_criu_flag("--tcp-established", "Not supported (connections come back closed).")
@_criu_flag("--ext-unix-sk", "Not supported.")
@_criu_flag("--shell-job", "Not supported.")
@_criu_flag("--lazy-pages", "Not supported.")
@_criu_flag("--file-locks", "Not supported yet.")
@_criu_flag("--auto-dedup", "Not supported.")
@click.option("--lsm-profile", default="", help="Not supported (no LSM in the guest).")
@click.option("--lsm-mount-context", default="", help="Not supported (no LSM in the guest).")
@click.option("--manage-cgroups-mode", default="", help="Only soft (the default).")
@click.option("--empty-ns", multiple=True, help="Only network (each VM has its own).")
def restore(
    container_id: str, bundle: str, image_path: str, work_path: str, pid_file: str, **flags: Any
) -> None:
    """Restore a checkpointed container in a new VM (CRIU in the guest)."""
    from vmpod.runtime import checkpoint as cp

    cp.refuse("restore", _given(flags, _UNSUPPORTED_RESTORE))
    cp.check_cgroup_mode(flags["manage_cgroups_mode"])
    cp.check_empty_ns(flags["empty_ns"])
    images, work = cp.default_paths_for(image_path, work_path)
    opts = cp.RestoreOptions(
        Path(bundle).absolute(), images, work, pid_file, flags["console_socket"], flags["detach"]
    )
    log_opts = (_LOG["path"], _LOG["format"], bool(_LOG["debug"]))
    sys.exit(cp.restore(_store(), container_id, opts, log_opts))


def _register_exec() -> None:
    # (imported on use, for start-up time: state/kill/list stay quick)
    from vmpod.runtime.execcmd import exec_command

    cli.add_command(exec_command, "exec")


_register_exec()


def main() -> None:
    reserve_stdio()  # first: a closed fd 1 must not become a socket's (see vmpod.stdio)
    try:
        cli.main(prog_name="vmpod-runtime", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
    except (VmpodError, OSError) as err:
        msg = str(err)
        log.error("%s", msg)
        if _LOG["path"]:
            print(msg, file=sys.stderr)
        sys.exit(err.exit_code if isinstance(err, RuntimeCliError) else 1)
    sys.exit(0)
