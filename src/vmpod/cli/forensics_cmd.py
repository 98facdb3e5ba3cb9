"""`vmpod forensics capture / verify / restore`: evidence archives of running
containers (CRIU in their VM), checked and brought back in a fresh, isolated VM."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vmpod.cli.common import guarded
from vmpod.paths import default_paths


@click.group()
def forensics() -> None:
    """Capture a running container into an evidence archive, verify it, restore it."""


@forensics.command()
@click.argument("container", required=False, default="")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The archive to write.")
@click.option(
    "--runc", "runc_id", default="", metavar="ID", help="A container of the host's runc (host CRIU)."
)
@click.option("--root", default="", metavar="DIR", help="runc's state directory (with --runc).")
@click.option("--podman", "podman_name", default="", metavar="NAME", help="A podman container (host CRIU).")
@click.option(
    "--runtime-root",
    type=click.Path(path_type=Path),
    default=None,
    metavar="DIR",
    help="vmpod-runtime's --root: CONTAINER is an id of its containers (e.g. one podman made).",
)
@click.option(
    "--kill", is_flag=True, help="Stop the container after the capture (default: it keeps running)."
)
@click.option("--tcp-established", is_flag=True, help="Capture established TCP connections (CRIU).")
@click.option("--file-locks", is_flag=True, help="Capture file locks (CRIU).")
@click.option(
    "--max-size",
    default=16 << 30,
    show_default=True,
    type=click.IntRange(min=1),
    help="Bytes of CRIU images taken.",
)
@guarded
def capture(
    container: str,
    output: Path,
    runc_id: str,
    root: str,
    podman_name: str,
    runtime_root: Path | None,
    kill: bool,
    tcp_established: bool,
    file_locks: bool,
    max_size: int,
) -> None:
    """Checkpoint CONTAINER (of `vmpod run -d`) with CRIU inside its VM, or a
    container of the host's runc or podman with the host's CRIU."""
    from vmpod.forensics.capture import Captured, CaptureRequest
    from vmpod.forensics.capture import capture as do_capture
    from vmpod.forensics.host import HostCaptureRequest, capture_host

    chosen = [x for x in (container, runc_id, podman_name) if x]
    if len(chosen) != 1:
        raise click.UsageError("name one container: CONTAINER, --runc ID or --podman NAME")
    if root and not runc_id:
        raise click.UsageError("--root goes with --runc")
    if runtime_root is not None and not container:
        raise click.UsageError("--runtime-root goes with a CONTAINER id")
    got: Captured
    flags = {"kill": kill, "tcp_established": tcp_established, "file_locks": file_locks}
    if container:
        req = CaptureRequest(
            container,
            output,
            max_bytes=max_size,
            command_line=tuple(sys.argv),
            runtime_root=runtime_root,
            **flags,
        )
        got = do_capture(default_paths(), req)
    else:
        engine, ref = ("runc", runc_id) if runc_id else ("podman", podman_name)
        host_req = HostCaptureRequest(
            engine, ref, output, root, max_bytes=max_size, command_line=tuple(sys.argv), **flags
        )
        got = capture_host(default_paths(), host_req)
    click.echo(f"{got.archive}")
    click.echo(
        f"captured {len(got.manifest.files)} files in {got.seconds:.2f}s "
        f"(container frozen {got.frozen_seconds:.2f}s; {'stopped' if kill else 'still running'})",
        err=True,
    )


@forensics.command()
@click.argument("archive", type=click.Path(path_type=Path))
@guarded
def verify(archive: Path) -> None:
    """Recheck every digest of ARCHIVE against its manifest."""
    from vmpod.forensics.archive import plain_tar
    from vmpod.forensics.archive import verify as do_verify
    from vmpod.forensics.restore import MAX_UNPACKED
    from vmpod.fsutil import owned_tmpdir

    paths = default_paths()
    paths.tmp.mkdir(parents=True, exist_ok=True)
    with owned_tmpdir(paths.tmp, "verify-") as tmp:  # a compressed copy is checked decompressed
        v = do_verify(plain_tar(archive, tmp, MAX_UNPACKED))
    for name in v.changed:
        click.echo(f"CHANGED  {name}")
    for name in v.missing:
        click.echo(f"MISSING  {name}")
    for name in v.added:
        click.echo(f"ADDED    {name}")
    m = v.manifest
    who = f"{m.container.get('name', '?')} captured {m.captured} on {m.host}"
    if not v.ok:
        click.echo(f"FAILED: {archive} ({who}) does not match its manifest", err=True)
        sys.exit(1)
    click.echo(f"OK: {len(m.files)} files match the manifest ({who})")


@forensics.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--name", default="", help="Name of the restored container.")
@click.option(
    "--rootfs", default="", metavar="DIR", help="The image's root filesystem, if not the archive's."
)
@click.option("--kernel", default="", help="Guest kernel (default: the captured container's).")
@click.option(
    "--paused",
    is_flag=True,
    help="Leave every restored task stopped (exec and dump-memory work) until `vmpod forensics resume`.",
)
@guarded
def restore(archive: Path, name: str, rootfs: str, kernel: str, paused: bool) -> None:
    """Restore ARCHIVE's process tree as a new detached container in a fresh VM.

    ARCHIVE is one of `vmpod forensics capture`, verified first, or a podman or
    Kubernetes checkpoint archive (plain, gzip or zstd), which carries no digests."""
    from vmpod.cli.common import progress
    from vmpod.forensics.restore import NETWORK_NOTE, RestoreRequest
    from vmpod.forensics.restore import restore as do_restore

    req = RestoreRequest(archive, name=name, rootfs=rootfs, kernel=kernel, paused=paused)
    got = do_restore(default_paths(), req, progress)
    click.echo(got.record.name)
    if got.manifest is None:
        click.echo("warning: no vmpod manifest (a podman/Kubernetes archive): nothing was verified", err=True)
    for note in got.notes:
        click.echo(f"note: {note}", err=True)
    state = f"stopped until `vmpod forensics resume {got.record.name}`" if paused else "running"
    click.echo(f"restored {got.record.short_id} in {got.seconds:.2f}s, {state}; {NETWORK_NOTE}", err=True)


@forensics.command()
@click.argument("container")
@guarded
def resume(container: str) -> None:
    """Let a container restored with --paused run (SIGCONT to every task)."""
    from vmpod.forensics.restore import resume as do_resume

    click.echo(do_resume(default_paths(), container).name)
