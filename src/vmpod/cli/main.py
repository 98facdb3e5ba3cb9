"""The `vmpod` command line."""

from __future__ import annotations

import asyncio
import logging
import sys

import click

from vmpod.cli.common import guard, progress
from vmpod.guest.kernel import DEFAULT_KERNEL
from vmpod.paths import default_paths
from vmpod.runspec import ProcessOptions


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
) -> None:
    """Run COMMAND in a container from IMAGE (or --rootfs DIR) inside a new VM.

    IMAGE is an OCI image layout directory (DIR[:TAG]) or an OCI / docker-save
    archive (FILE.tar[:TAG]). The exit status is the container's.
    """
    from vmpod.cli.run import RunOptions
    from vmpod.cli.run import run as run_container

    if command[:1] == ("--",):
        # click stops option parsing at IMAGE, so an `IMAGE -- CMD` separator arrives here.
        command = command[1:]
    if rootfs and image:
        # With --rootfs every positional word is the command.
        command, image = (image, *command), ""
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
        process=ProcessOptions(
            args=command, env=env, workdir=workdir, user=user, tty=tty, hostname=hostname, read_only=read_only
        ),
    )
    status = guard(lambda: asyncio.run(run_container(default_paths(), opts, progress)))
    sys.exit(status)


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


from vmpod.cli import kernel_cmd, matrix_cmd  # noqa: E402  (commands in their own modules)

cli.add_command(kernel_cmd.kernel)
cli.add_command(matrix_cmd.matrix)


from vmpod.cli import images_cmd  # noqa: E402  (commands in their own modules)

images_cmd.register(cli)


def main() -> None:
    cli(prog_name="vmpod")
