"""`vmpod system df / prune`: what vmpod's caches hold on disk, and freeing what
nothing uses (storage/prune.py)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from vmpod.cli.common import guarded
from vmpod.errors import ConfigError
from vmpod.paths import default_paths

if TYPE_CHECKING:
    from vmpod.storage.prune import Candidate

_WARNING = """WARNING! This will remove:
  - image trees and disk images that no container or running VM uses{extra}
  - temporary files of vmpod processes that have died
  - image store blobs that no image references"""
_ALL = """
  - images without at least one container associated to them"""
_DANGLING = " and whose image is not tagged"


@click.group()
def system() -> None:
    """Disk usage of vmpod's caches, and pruning them."""


@system.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@guarded
def df(fmt: str) -> None:
    """Show disk usage per kind: count, size and what `system prune -a` would free."""
    # imported here for start-up time: the image store loads urllib and ssl
    from vmpod.storage.prune import df as disk_free
    from vmpod.storage.usage import human_size

    rows = disk_free(default_paths())
    if fmt == "json":
        click.echo(json.dumps([r.to_json() for r in rows], indent=1))
        return
    click.echo(f"{'TYPE':<26}{'COUNT':>7}  {'SIZE':>10}  {'RECLAIMABLE':>18}")
    for r in rows:
        share = f" ({100 * r.reclaimable // r.size}%)" if r.size else ""
        reclaim = f"{human_size(r.reclaimable)}{share}"
        click.echo(f"{r.kind.upper():<26}{r.count:>7}  {human_size(r.size):>10}  {reclaim:>18}")


@system.command()
@click.option(
    "-a", "--all", "all_", is_flag=True, help="Also remove images no container uses, and their caches."
)
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@guarded
def prune(all_: bool, force: bool, dry_run: bool) -> None:
    """Remove what no container (running or stopped) and no running VM uses.

    Without -a, the caches of tagged images stay. Containers, kernels and guest
    assets are never removed (vmpod rm, vmpod kernel rm).
    """
    from vmpod.storage.prune import candidates
    from vmpod.storage.prune import prune as prune_caches
    from vmpod.storage.usage import human_size

    paths = default_paths()
    if dry_run:
        plan = candidates(paths, all_=all_)
        for c in plan:
            click.echo(f"would remove {c.kind}: {_what(c)} ({human_size(c.size)})")
        click.echo(f"Total reclaimable space: {human_size(sum(c.size for c in plan))}")
        return
    if not force:
        if not sys.stdin.isatty():
            raise ConfigError("system prune needs confirmation and stdin is not a terminal", hint="use -f")
        click.echo(_WARNING.format(extra="" if all_ else _DANGLING) + (_ALL if all_ else ""))
        if not click.confirm("Are you sure you want to continue?", default=False):
            click.echo("Aborted.", err=True)
            sys.exit(1)
    result = prune_caches(paths, all_=all_)
    for c in result.removed:
        click.echo(f"Deleted {c.kind}: {_what(c)}")
    for why in result.skipped:
        click.echo(f"vmpod: kept {why}", err=True)
    click.echo(f"Total reclaimed space: {human_size(result.freed)}")


def _what(c: Candidate) -> str:
    from vmpod.storage.prune import IMAGES

    if c.name:
        return c.name  # an image: its reference
    if c.kind == IMAGES and c.path == default_paths().images:
        return f"unreferenced blobs in {c.path}"
    return str(c.path)
