"""The `vmpod` command line."""

from __future__ import annotations

import asyncio
import logging
import sys

import click

from vmpod.cli.common import guard, progress
from vmpod.cli.lifecycle import run_named
from vmpod.containers.options import RunRequest, check_volumes, parse_volume, read_env_file
from vmpod.containers.records import Mount
from vmpod.errors import ConfigError
from vmpod.guest.kernel import DEFAULT_KERNEL
from vmpod.paths import default_paths
from vmpod.runspec import ProcessOptions
from vmpod.stdio import reserve_stdio


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def cli(verbose: int) -> None:
    """vmpod: containers that each run in their own lightweight VM."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="vmpod: %(message)s", stream=sys.stderr)
    # qemu.qmp narrates connections and logs a dying QEMU as an error; vmpod
    # reports those itself, so its log shows only when debugging.
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)


@cli.command(context_settings={"allow_interspersed_args": False})
@click.argument("image", required=False, default="")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--rootfs", default="", metavar="DIR", help="Run a root filesystem directory.")
@click.option("-e", "--env", multiple=True, metavar="NAME=VALUE", help="Set an environment variable.")
@click.option("-w", "--workdir", default="", help="Working directory inside the container.")
@click.option("-u", "--user", default="", help="User: name, uid, name:group or uid:gid.")
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin to the container.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a terminal.")
@click.option("--hostname", default="vmpod", show_default=True)
@click.option("--read-only", is_flag=True, help="Mount the container's root read-only.")
@click.option(
    "--kernel",
    default=DEFAULT_KERNEL,
    show_default=True,
    help="Guest kernel: 6.1, 6.1-generic, 6.12, 6.12-generic or debian:RELEASE.",
)
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True)
@click.option("--cpus", type=int, default=1, show_default=True, help="vCPUs of the VM.")
@click.option("--memory", type=int, default=512, show_default=True, help="VM memory in MiB.")
@click.option(
    "--boot-timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for the guest agent."
)
@click.option("--console", is_flag=True, help="Keep kernel messages on the console log.")
@click.option(
    "--guest-runtime",
    type=click.Choice(["runc", "crun"]),
    default="runc",
    show_default=True,
    help="OCI runtime inside the VM (crun starts faster).",
)
@click.option(
    "--kernel-module",
    "kernel_modules",
    multiple=True,
    metavar="NAME[=PARAMS]",
    help="Load a module of the guest kernel before the container starts.",
)
@click.option(
    "--load-module",
    "load_modules",
    multiple=True,
    metavar="FILE.ko[=PARAMS]",
    help="Load a module built for the guest kernel before the container starts.",
)
@click.option("-d", "--detach", is_flag=True, help="Run in the background; print the container id.")
@click.option("--name", default="", help="Name the container (it stays until vmpod rm).")
@click.option("--rm", "auto_remove", is_flag=True, help="Remove the container when it exits.")
@click.option(
    "-v", "--volume", "volumes", multiple=True, metavar="HOST:CTR[:ro]", help="Bind a host directory."
)
@click.option("--env-file", "env_files", multiple=True, metavar="FILE", help="Read NAME=VALUE lines.")
@click.option("--entrypoint", default=None, help="Replace the image's ENTRYPOINT (and drop its CMD).")
@click.option("--init", is_flag=True, help="Run catatonit as PID 1: it forwards signals and reaps zombies.")
@click.option(
    "--network",
    default="bridge",
    show_default=True,
    metavar="bridge|none",
    help="bridge: vmpod's CNI network (NAT to the host); none: loopback only.",
)
@click.option(
    "-p",
    "--publish",
    multiple=True,
    metavar="[IP:]HOSTPORT:CTRPORT[/tcp|udp]",
    help="Publish a container port on the host (bridge network).",
)
@click.option("--pod", default="", help="Run in this pod's VM (vmpod pod create), sharing its network.")
@click.option(
    "--root-in-vm",
    is_flag=True,
    help="With -d: root on the image's disk, writes kept in the VM (no volumes, no vmpod cp); "
    "such containers can be saved with vmpod snapshot.",
)
@click.option("--log-max-size", default="10m", show_default=True, help="Size of one log file (-d/--name).")
@click.option("--log-max-files", type=int, default=3, show_default=True, help="Log files kept (-d/--name).")
def run(
    image: str,
    command: tuple[str, ...],
    rootfs: str,
    env: tuple[str, ...],
    workdir: str,
    user: str,
    interactive: bool,
    tty: bool,
    hostname: str,
    read_only: bool,
    kernel: str,
    accel: str,
    cpus: int,
    memory: int,
    boot_timeout: float,
    console: bool,
    guest_runtime: str,
    kernel_modules: tuple[str, ...],
    load_modules: tuple[str, ...],
    detach: bool,
    name: str,
    auto_remove: bool,
    volumes: tuple[str, ...],
    env_files: tuple[str, ...],
    entrypoint: str | None,
    init: bool,
    network: str,
    publish: tuple[str, ...],
    pod: str,
    root_in_vm: bool,
    log_max_size: str,
    log_max_files: int,
) -> None:
    """Run COMMAND in a container from IMAGE (or --rootfs DIR) inside a new VM.

    IMAGE is an OCI image layout directory (DIR[:TAG]) or an OCI / docker-save
    archive (FILE.tar[:TAG]). The exit status is the container's. With -d,
    --name, -v or --entrypoint the container is kept (vmpod ps -a, logs, rm).
    """
    from vmpod.cli.run import RunOptions
    from vmpod.cli.run import run as run_container

    if command[:1] == ("--",):
        # click stops option parsing at IMAGE, so an `IMAGE -- CMD` separator arrives here.
        command = command[1:]
    if rootfs and image:
        # With --rootfs every positional word is the command.
        command, image = (image, *command), ""
    env = guard(lambda: _env_files(env_files)) + env
    from vmpod.containers.network import parse_network

    network, ports = guard(lambda: parse_network(network, publish))
    process = ProcessOptions(
        args=command,
        env=env,
        workdir=workdir,
        user=user,
        tty=tty,
        hostname=hostname,
        read_only=read_only,
        init=init,
    )
    # a volume, or --init's binary, is a host path shared with the VM: the managed path
    if detach or name or volumes or init or pod or entrypoint is not None:
        named = RunRequest(
            image=image,
            rootfs=rootfs,
            process=process,
            name=name,
            entrypoint=entrypoint,
            volumes=guard(lambda: _volumes(volumes)),
            auto_remove=auto_remove,
            kernel=kernel,
            accel=accel,
            guest_runtime=guest_runtime,
            boot_timeout=boot_timeout,
            cpus=cpus,
            memory_mb=memory,
            log_max_bytes=guard(lambda: _size(log_max_size)),
            log_keep=log_max_files,
            network=network,
            ports=ports,
            pod=pod,
            root_in_vm=root_in_vm,
        )
        guard(lambda: _named_ok(named, tty, console, kernel_modules, load_modules))
        sys.exit(guard(lambda: run_named(named, detach=detach, interactive=interactive)))
    opts = RunOptions(
        image=image,
        rootfs=rootfs,
        interactive=interactive,
        kernel=kernel,
        accel=accel,
        cpus=cpus,
        memory_mb=memory,
        boot_timeout=boot_timeout,
        verbose_console=console,
        guest_runtime=guest_runtime,
        kernel_modules=kernel_modules,
        load_modules=load_modules,
        process=process,
        network=network,
        ports=ports,
    )
    status = guard(lambda: asyncio.run(run_container(default_paths(), opts, progress)))
    sys.exit(status)


def _env_files(files: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(item for f in files for item in read_env_file(f))


def _volumes(specs: tuple[str, ...]) -> tuple[Mount, ...]:
    mounts = tuple(parse_volume(v) for v in specs)
    check_volumes(mounts)
    return mounts


def _size(raw: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = raw.strip().lower().removesuffix("b")
    mult = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    if not number.isdigit() or int(number) * mult < 1024:
        raise ConfigError(f"invalid log size {raw!r}", hint="at least 1k, e.g. 10m")
    return int(number) * mult


def _named_ok(
    req: RunRequest, tty: bool, console: bool, kernel_modules: tuple[str, ...], load_modules: tuple[str, ...]
) -> None:
    """What the -d/--name path cannot do yet: refused, not ignored."""
    if tty:
        raise ConfigError(
            "-t is not supported with -d, --name, -v or --entrypoint yet", hint="use vmpod exec -it"
        )
    if console or kernel_modules or load_modules:
        raise ConfigError(
            "--console, --kernel-module and --load-module need a plain vmpod run (no -d/--name)"
        )
    if req.log_keep < 1:
        raise ConfigError("--log-max-files must be at least 1")


@cli.command()
@click.option("--kernel", default=DEFAULT_KERNEL, show_default=True)
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto")
def doctor(kernel: str, accel: str) -> None:
    """Check what works on this host and why; non-zero when `vmpod run` cannot work."""
    from vmpod.cli.doctor import diagnose

    ok = guard(lambda: diagnose(default_paths(), kernel, accel))
    sys.exit(0 if ok else 1)


@cli.group()
def assets() -> None:
    """Guest assets (kernel, initramfs, guest root image)."""


@assets.command("build")
@click.option("--kernel", default=DEFAULT_KERNEL, show_default=True)
def assets_build(kernel: str) -> None:
    """Build (or reuse) the guest assets for KERNEL."""
    from vmpod.guest.assets import ensure_assets

    a = guard(lambda: ensure_assets(default_paths(), kernel, progress))
    click.echo(f"kernel    {a.kernel.release} ({a.kernel.package} {a.kernel.version})")
    click.echo(f"boot      {a.kernel.boot_image}")
    click.echo(f"initramfs {a.initramfs}")
    click.echo(f"rootfs    {a.rootfs}")


from vmpod.cli import forensics_cmd, kernel_cmd, matrix_cmd, system_cmd  # noqa: E402  (commands in their own modules)

cli.add_command(forensics_cmd.forensics)
cli.add_command(kernel_cmd.kernel)
cli.add_command(matrix_cmd.matrix)
cli.add_command(system_cmd.system)


from vmpod.cli import images_cmd  # noqa: E402  (commands in their own modules)

images_cmd.register(cli)


from vmpod.cli import lifecycle  # noqa: E402  (commands in their own modules)

lifecycle.register(cli)


from vmpod.cli import snapshot_cmd  # noqa: E402  (commands in their own modules)

snapshot_cmd.register(cli)


def main() -> None:
    reserve_stdio()  # first: a closed fd 1 must not become the event loop's (see vmpod.stdio)
    cli(prog_name="vmpod")
