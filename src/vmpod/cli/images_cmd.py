"""`vmpod pull / images / rmi`: the local image store that registry pulls fill."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import click

from vmpod.cli.common import guarded, progress
from vmpod.errors import ImageError
from vmpod.guest.progress import silent
from vmpod.paths import default_paths


@click.command()
@click.argument("reference")
@click.option(
    "--insecure", is_flag=True, help="Use plain HTTP for this registry (loopback registries always do)."
)
@click.option(
    "--creds",
    default="",
    metavar="USER:PASSWORD",
    help="Credentials for this registry (default: $REGISTRY_AUTH=REGISTRY=USER:PASSWORD if it names "
    "this registry, else skopeo's auth.json / docker config.json).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=30.0,
    show_default=True,
    help="Seconds a manifest or config fetch may take; the whole pull is bounded by "
    "$VMPOD_PULL_TIMEOUT (default 3600).",
)
@click.option("-q", "--quiet", is_flag=True, help="Print only the manifest digest.")
@guarded
def pull(reference: str, insecure: bool, creds: str, timeout: float, quiet: bool) -> None:
    """Pull an image from a registry into the local image store.

    REFERENCE is REGISTRY/NAME:TAG or REGISTRY/NAME@sha256:HEX. Layers already in
    the store are not downloaded again. Prints the linux/amd64 manifest digest.
    """
    # imported here for start-up time: other commands do not need the store
    from vmpod.images.reference import parse_reference
    from vmpod.images.registry import env_creds
    from vmpod.images.store import PullOptions, parse_creds
    from vmpod.images.store import pull as pull_image

    scoped = parse_creds(creds) if creds else env_creds(parse_reference(reference).registry)
    options = PullOptions(insecure=insecure, timeout=timeout, creds=scoped)
    image = pull_image(default_paths(), reference, options, silent if quiet else progress)
    click.echo(image.digest)


@click.command()
@click.option("-q", "--quiet", is_flag=True, help="Print only the references.")
@guarded
def images(quiet: bool) -> None:
    """List the images pulled into the local image store."""
    # imported here for start-up time: the store loads urllib and ssl, which other commands skip
    from vmpod.images.reference import parse_reference
    from vmpod.images.store import ImageStore, human_size

    with _local_errors():
        stored = ImageStore(default_paths().images).images()
    if quiet:
        for image in stored:
            click.echo(image.name)
        return
    rows = [("REPOSITORY", "TAG", "DIGEST", "SIZE", "CREATED")]
    for image in stored:
        ref = parse_reference(image.name)
        rows.append(
            (
                ref.name,
                ref.tag or "<none>",
                image.digest.partition(":")[2][:12],
                human_size(image.size) if image.size >= 0 else "?",
                _ago(image.created),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[4]
        )


@click.command()
@click.argument("references", nargs=-1, required=True)
@guarded
def rmi(references: tuple[str, ...]) -> None:
    """Remove images from the local store, with the blobs no other image uses."""
    # imported here for start-up time: the store loads urllib and ssl, which other commands skip
    from vmpod.images.reference import parse_reference
    from vmpod.images.store import ImageStore, human_size

    store = ImageStore(default_paths().images)
    for text in references:
        with _local_errors():
            removal = store.remove(str(parse_reference(text)))
        click.echo(
            f"untagged {removal.image.name}; deleted {removal.blobs_removed} blobs "
            f"({human_size(removal.bytes_freed)})"
        )


@contextmanager
def _local_errors() -> Iterator[None]:
    try:
        yield
    except OSError as err:
        raise ImageError(f"image store: {err}", hint="check permissions and free space") from err


def _ago(created: str, now: datetime | None = None) -> str:
    """'2024-01-01T00:00:00Z' -> '3 days ago'; '-' when unknown."""
    try:
        when = datetime.fromisoformat(created)
    except ValueError:
        return "-"
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = ((now or datetime.now(UTC)) - when).total_seconds()
    if seconds < 60:
        return "just now" if seconds >= 0 else "in the future"
    for unit, size in (
        ("year", 365 * 86400),
        ("month", 30 * 86400),
        ("week", 7 * 86400),
        ("day", 86400),
        ("hour", 3600),
        ("minute", 60),
    ):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    raise AssertionError("unreachable")


def register(cli: click.Group) -> None:
    """Add pull, images and rmi to the top-level ``vmpod`` group."""
    for command in (pull, images, rmi):
        cli.add_command(command)
