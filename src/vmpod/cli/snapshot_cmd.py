"""`vmpod snapshot NAME DIR [--stop]` and `vmpod restore DIR [--name NEW]`."""

from __future__ import annotations

from pathlib import Path

import click

from vmpod.cli.common import guarded
from vmpod.containers.manager import Manager
from vmpod.paths import default_paths

_CTX = {"help_option_names": ["-h", "--help"]}


@click.command(context_settings=_CTX)
@click.argument("name")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--stop", is_flag=True, help="Stop the container after saving it (default: it runs on).")
@guarded
def snapshot(name: str, directory: Path, stop: bool) -> None:
    """Save the whole VM of container NAME (RAM, devices, its writable layer) into
    the new directory DIRECTORY. Needs a container of `vmpod run -d --root-in-vm`."""
    from vmpod.containers import snapshots

    reply = snapshots.snapshot(Manager(default_paths()), name, directory, stop=stop)
    mib = int(str(reply.get("state_size", 0))) / (1 << 20)
    click.echo(f"{directory}: {mib:.1f} MiB" + (" (container stopped)" if stop else ""))


@click.command(context_settings=_CTX)
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--name", default="", help="Name of the new container.")
@guarded
def restore(directory: Path, name: str) -> None:
    """Start a new container from snapshot DIRECTORY and print its id. It reaches
    no network (its NICs, if any, lead nowhere); its clock is corrected and its
    random pool reseeded."""
    from vmpod.containers import snapshots

    rec = snapshots.restore(Manager(default_paths()), directory, name)
    click.echo(rec.id)


def register(cli: click.Group) -> None:
    cli.add_command(snapshot)
    cli.add_command(restore)
