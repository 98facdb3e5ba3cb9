"""docker-like commands on named containers: ps, start, stop, kill, rm, exec, logs,
cp, inspect (and the -d/--name path of `vmpod run`).

`ps` lists the containers started with `vmpod run -d` or `--name` (a plain
`vmpod run` is ephemeral and in-process). Names or id prefixes select them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import click

from vmpod.cli.common import guard, guarded, progress
from vmpod.containers import copy as cp_
from vmpod.containers import pods, rootfs
from vmpod.containers.manager import Manager, View
from vmpod.containers.options import RunRequest, user_ids
from vmpod.containers.records import ContainerError
from vmpod.errors import ConfigError
from vmpod.guest.kernel import DEFAULT_KERNEL
from vmpod.paths import default_paths
from vmpod.runspec import ProcessOptions
from vmpod.runtime import outputlog as logs_
from vmpod.stdio import note_discarded_output

_CTX = {"help_option_names": ["-h", "--help"]}


def manager() -> Manager:
    return Manager(default_paths())


def parse_signal(raw: str) -> int:
    name = raw.upper()
    if name.isdigit() and 0 < int(name) < 65:
        return int(name)
    try:
        return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        raise ConfigError(f"invalid signal {raw!r}") from None


def run_named(req: RunRequest, *, detach: bool, interactive: bool) -> int:
    """`vmpod run` with -d/--name/-v/--entrypoint: a record and a runtime container."""
    # (imported on use: booting needs the sandbox stack, the other commands do not)
    from vmpod.containers.launch import make_container, reap_when_done, start_container, wait_foreground

    m = manager()
    if req.pod:
        pods.check_member(m, req)
    rec = make_container(m, req, progress)
    try:
        pid = start_container(m, rec, foreground=not detach, interactive=interactive)
    except BaseException:
        if req.auto_remove:
            with contextlib.suppress(ContainerError):
                m.remove(rec.id, force=True)
        raise
    if detach:
        if req.auto_remove:
            reap_when_done(m, rec)
        click.echo(rec.id)
        return 0
    note_discarded_output()
    status = wait_foreground(m, rec, pid)
    if req.auto_remove:
        m.remove(rec.id, force=True)
    else:
        with m.locked(rec.id):
            pass  # settles the record: exit code and time
    return status


def _row(v: View) -> dict[str, object]:
    r = v.record
    return {
        "id": r.id,
        "name": r.name,
        "image": r.image,
        "command": list(r.command),
        "created": r.created,
        "state": v.state,
        "status": v.status_text(),
        "exit_code": v.exit_code,
    }


@click.command(context_settings=_CTX)
@click.option("-a", "--all", "all_", is_flag=True, help="Also containers that are not running.")
@click.option("-q", "--quiet", is_flag=True, help="Only ids.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@guarded
def ps(all_: bool, quiet: bool, fmt: str) -> None:
    """List containers started with `vmpod run -d` or `--name`."""
    views = [v for v in manager().views() if all_ or v.alive]
    views.sort(key=lambda v: v.record.created, reverse=True)
    if quiet:
        for v in views:
            click.echo(v.record.short_id)
    elif fmt == "json":
        click.echo(json.dumps([_row(v) for v in views], indent=2))
    else:
        click.echo(f"{'CONTAINER ID':<14}{'IMAGE':<24}{'COMMAND':<24}{'CREATED':<22}{'STATUS':<18}NAMES")
        for v in views:
            r = v.record
            cmd = " ".join(r.command)
            cmd = cmd if len(cmd) < 22 else cmd[:19] + "..."
            image = r.image if len(r.image) < 22 else "..." + r.image[-19:]
            click.echo(
                f"{r.short_id:<14}{image:<24}{cmd:<24}{r.created[:19]:<22}{v.status_text():<18}{r.name}"
            )


@click.command(context_settings=_CTX)
@click.argument("names", nargs=-1, required=True)
@guarded
def start(names: tuple[str, ...]) -> None:
    """Start created or exited containers again (a new VM, the same root filesystem)."""
    from vmpod.containers.launch import start_existing

    for name in names:
        start_existing(manager(), name)
        click.echo(name)


@click.command(context_settings=_CTX)
@click.option(
    "-t", "--time", "timeout", type=float, default=10.0, show_default=True, help="Seconds before SIGKILL."
)
@click.argument("names", nargs=-1, required=True)
@guarded
def stop(timeout: float, names: tuple[str, ...]) -> None:
    """Stop containers: SIGTERM, then SIGKILL after --time seconds."""
    for name in names:
        manager().stop(name, timeout)
        click.echo(name)


@click.command(context_settings=_CTX)
@click.option("-s", "--signal", "sig", default="KILL", show_default=True, help="Signal name or number.")
@click.argument("names", nargs=-1, required=True)
@guarded
def kill(sig: str, names: tuple[str, ...]) -> None:
    """Send a signal to containers' main processes."""
    number = parse_signal(sig)
    for name in names:
        manager().kill(name, number)
        click.echo(name)


@click.command(context_settings=_CTX)
@click.option("-f", "--force", is_flag=True, help="Kill running containers first.")
@click.argument("names", nargs=-1, required=True)
@guarded
def rm(force: bool, names: tuple[str, ...]) -> None:
    """Remove containers: VM, record, logs and writable layer (never volumes)."""
    for name in names:
        manager().remove(name, force)
        click.echo(name)


@click.command(context_settings={**_CTX, "allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a terminal.")
@click.option("-e", "--env", multiple=True, metavar="NAME=VALUE")
@click.option("-w", "--workdir", default="")
@click.option("-u", "--user", default="", help="uid[:gid] or name[:group] of the image.")
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(
    interactive: bool,
    tty: bool,
    env: tuple[str, ...],
    workdir: str,
    user: str,
    name: str,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in a running container; the exit status is COMMAND's."""
    from vmpod.runtime.execcmd import exec_command

    m = manager()
    rec = guard(lambda: m.records.resolve(name))
    argv = ["--tty"] if tty else []
    for e in env:
        argv += ["--env", e]
    if workdir:
        argv += ["--cwd", workdir]
    if user:
        ids = guard(lambda: user_ids(Path(rec.lower), user))
        argv += ["--user", f"{ids['uid']}:{ids['gid']}"]
    if not interactive:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    guard(
        lambda: exec_command.main(
            [*argv, rec.id, *command],
            prog_name="vmpod exec",
            standalone_mode=False,
            obj={"root": str(m.store.root)},
        )
    )


@click.command(context_settings=_CTX)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the container ends.")
@click.option("--timestamps", is_flag=True, help="Prefix each line with its time.")
@click.argument("name")
def logs(follow: bool, timestamps: bool, name: str) -> None:
    """Print a container's output (stdout to stdout, stderr to stderr)."""
    m = manager()
    rec = guard(lambda: m.records.resolve(name))
    path, keep = m.log_path(rec), rec.log_keep or logs_.DEFAULT_KEEP
    entries = (
        logs_.follow(path, lambda: m.store.monitor_alive(rec.id), keep) if follow else logs_.read(path, keep)
    )
    outs = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    try:
        for e in entries:
            out = outs.get(e.stream, sys.stdout.buffer)
            out.write(((e.time + " ") if timestamps else "").encode() + e.text.encode())
            if follow:
                out.flush()
        sys.stdout.flush()
    except BrokenPipeError:  # `vmpod logs web | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except KeyboardInterrupt:
        sys.exit(130)


def _split(arg: str) -> tuple[str, str]:
    """``NAME:PATH`` -> (NAME, PATH); a host path -> ("", PATH). Host paths with a
    ':' before any '/' need a leading ./ (docker's rule)."""
    head, sep, tail = arg.partition(":")
    if sep and "/" not in head and head:
        return head, tail or "/"
    return "", arg


@click.command(context_settings=_CTX)
@click.argument("src")
@click.argument("dst")
@guarded
def cp(src: str, dst: str) -> None:
    """Copy files between a container and the host: cp NAME:PATH HOSTPATH, cp HOSTPATH NAME:PATH."""
    (sname, spath), (dname, dpath) = _split(src), _split(dst)
    if bool(sname) == bool(dname):
        raise ConfigError(
            "exactly one of SRC and DST must be NAME:PATH", hint="e.g. vmpod cp web:/etc/hosts ."
        )
    m = manager()
    with m.locked(sname or dname) as rec:
        if rec.root_disk:
            raise ContainerError(
                f"container {rec.name} keeps its root and writes in its VM (--root-in-vm): "
                "vmpod cp cannot reach them",
                hint=f"use vmpod exec {rec.name} cat FILE > HOSTFILE",
            )
        ov = m.overlay(rec)
        rootfs.mount(ov)  # after a reboot the overlay is mounted again
        if sname:
            cp_.copy_out(ov.merged, spath, Path(dpath))
        else:
            cp_.copy_in(ov.merged, Path(spath), dpath)


@click.command(context_settings=_CTX)
@click.argument("names", nargs=-1, required=True)
@guarded
def inspect(names: tuple[str, ...]) -> None:
    """Print containers' details as JSON."""
    m = manager()
    click.echo(json.dumps([m.inspect(n) for n in names], indent=2))


@click.group(context_settings=_CTX)
def pod() -> None:
    """Pods: several containers in one VM, sharing its network (vmpod run --pod)."""


@pod.command("create", context_settings=_CTX)
@click.argument("name")
@click.option("-p", "--publish", multiple=True, metavar="[IP:]HOSTPORT:CTRPORT[/tcp|udp]")
@click.option("--network", default="bridge", show_default=True, metavar="bridge|none")
@click.option("--kernel", default=DEFAULT_KERNEL, show_default=True)
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True)
@click.option("--cpus", type=int, default=1, show_default=True, help="vCPUs of the pod's VM.")
@click.option("--memory", type=int, default=512, show_default=True, help="The pod's VM memory in MiB.")
@guarded
def pod_create(
    name: str, publish: tuple[str, ...], network: str, kernel: str, accel: str, cpus: int, memory: int
) -> None:
    """Create a pod and start its VM; prints the infra container's id."""
    from vmpod.containers.network import parse_network

    mode, ports = parse_network(network, publish)
    template = RunRequest(
        image="",
        rootfs="",
        process=ProcessOptions(),
        kernel=kernel,
        accel=accel,
        cpus=cpus,
        memory_mb=memory,
        network=mode,
        ports=ports,
    )
    click.echo(pods.create(manager(), name, template, progress).id)


@pod.command("ls", context_settings=_CTX)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@guarded
def pod_ls(fmt: str) -> None:
    """List pods."""
    m = manager()
    rows = [
        {
            "name": p.name,
            "id": p.infra.id,
            "status": m.view(p.infra).state,
            "containers": [r.name for r in p.members],
            "ports": [str(x) for x in p.infra.ports],
        }
        for p in pods.pods(m)
    ]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'POD ID':<14}{'NAME':<20}{'STATUS':<10}{'CONTAINERS':<30}PORTS")
    for r in rows:
        members = ",".join(r["containers"]) or "-"
        ports = ",".join(r["ports"]) or "-"
        click.echo(f"{str(r['id'])[:12]:<14}{r['name']!s:<20}{r['status']!s:<10}{members:<30}{ports}")


@pod.command("rm", context_settings=_CTX)
@click.option("-f", "--force", is_flag=True, help="Also pods whose containers run.")
@click.argument("names", nargs=-1, required=True)
@guarded
def pod_rm(force: bool, names: tuple[str, ...]) -> None:
    """Remove pods: their containers, then the VM and the network."""
    m = manager()
    for name in names:
        pods.remove(m, name, force)
        click.echo(name)


def register(cli: click.Group) -> None:
    for cmd in (ps, start, stop, kill, rm, logs, cp, inspect, pod):
        cli.add_command(cmd)
    cli.add_command(exec_, "exec")
