"""`vmpod forensics capture / verify / inspect / restore / resume / dump-memory`:
evidence archives of running containers (CRIU in their VM), checked, read
offline, and brought back in a fresh, isolated VM."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from vmpod.cli.common import guarded
from vmpod.paths import default_paths

if TYPE_CHECKING:
    from vmpod.forensics.inspect import Inspection


@click.group()
def forensics() -> None:
    """Capture a running container into an evidence archive; verify, inspect and restore it."""


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


SECTIONS = ("ps_tree", "files", "sockets", "mounts", "env")


@forensics.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--search", "search_text", metavar="STRING", help="Find STRING in every process's memory.")
@click.option("--search-regex", metavar="RE", help="Find a regular expression (Python re) in memory.")
@click.option("--max-hits", default=100, show_default=True, type=click.IntRange(min=1), help="Hits shown.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--ps-tree", is_flag=True, help="Show the process tree (with command lines).")
@click.option("--files", is_flag=True, help="Show open files (fd, offset, mode).")
@click.option("--sockets", is_flag=True, help="Show sockets.")
@click.option("--mounts", is_flag=True, help="Show mounts.")
@click.option("--env", is_flag=True, help="Show each process's environment.")
@click.option(
    "--max-size",
    default=32 << 30,
    show_default=True,
    type=click.IntRange(min=1),
    help="Bytes the archive may unpack to.",
)
@guarded
def inspect(
    archive: Path,
    search_text: str | None,
    search_regex: str | None,
    max_hits: int,
    fmt: str,
    max_size: int,
    **selected: bool,
) -> None:
    """Show what ARCHIVE's CRIU images hold, offline: process tree, open files,
    sockets, mounts, environment; --search/--search-regex scan process memory.

    Without a section flag every section is shown (only the hits with a search).
    With a search, the exit status is 1 when nothing was found (as grep's)."""
    import json

    from vmpod.forensics.inspect import inspect_archive, search_pattern

    pattern = search_pattern(search_text, search_regex)
    label = search_text if search_text is not None else search_regex
    got = inspect_archive(
        default_paths(),
        archive,
        search=(str(label), pattern) if pattern is not None else None,
        max_hits=max_hits,
        max_bytes=max_size,
    )
    if fmt == "json":
        click.echo(json.dumps(got.to_json(), indent=1))
    else:
        wanted = {s for s in SECTIONS if selected.get(s)} or (set() if pattern else set(SECTIONS))
        _show(got, wanted)
    for warning in got.findings.warnings:
        click.echo(f"warning: {warning}", err=True)
    if not got.verified:
        click.echo("warning: no vmpod manifest (a podman/Kubernetes archive): nothing was verified", err=True)
    if pattern is not None and not got.findings.hits:
        sys.exit(1)


def _show(got: Inspection, wanted: set[str]) -> None:
    """The sections ``wanted`` (and the hits of a search) for people."""
    f = got.findings
    c = got.container
    criu = got.criu.splitlines()[0] if got.criu else "?"
    click.echo(
        f"{got.archive}: container {c.get('name', '?')} ({c.get('image', '?')}) captured {got.captured} "
        f"on {got.host}, guest kernel {got.guest_kernel}, CRIU {criu}"
    )
    comm = {p.pid: p.comm for p in f.processes}
    if "ps_tree" in wanted:
        click.echo("\nPROCESSES (pids in the container's namespace)")
        click.echo(f"{'PID':>7} {'PPID':>7} {'UID':>5}  COMMAND")
        kids: dict[int, list[int]] = {}
        for p in f.processes:
            kids.setdefault(p.ppid, []).append(p.pid)
        by_pid = {p.pid: p for p in f.processes}
        # roots first; then whatever a (hostile) tree's cycles left unreached
        order = [p.pid for p in f.processes if p.ppid not in by_pid] + [p.pid for p in f.processes]
        stack = [(pid, 0) for pid in reversed(order)]
        shown: set[int] = set()
        while stack:
            pid, depth = stack.pop()
            if pid in shown:
                continue
            shown.add(pid)
            p = by_pid[pid]
            cmd = " ".join(p.argv) if p.argv else f"[{p.comm}]"
            uid = "?" if p.uid is None else str(p.uid)
            threads = f" ({len(p.threads)} threads)" if len(p.threads) > 1 else ""
            click.echo(f"{p.pid:>7} {p.ppid:>7} {uid:>5}  {'  ' * depth}{cmd}{threads}")
            stack += [(k, depth + 1) for k in reversed(kids.get(pid, [])) if k != pid]
    if "files" in wanted:
        click.echo("\nOPEN FILES")
        click.echo(f"{'PID':>7} {'COMM':<15} {'FD':>4} {'MODE':<10} {'OFFSET':>10}  NAME")
        for o in f.files:
            pos = "" if o.pos is None else str(o.pos)
            click.echo(f"{o.pid:>7} {comm.get(o.pid, ''):<15} {o.fd:>4} {o.mode:<10} {pos:>10}  {o.name}")
    if "sockets" in wanted:
        click.echo("\nSOCKETS")
        click.echo(f"{'PID':>7} {'FD':>4} {'PROTO':<12} {'STATE':<12} {'LOCAL':<24} REMOTE")
        for s in f.sockets:
            proto = f"{s.family}/{s.proto or s.type}"
            click.echo(f"{s.pid:>7} {s.fd:>4} {proto:<12} {s.state:<12} {s.local:<24} {s.remote}")
    if "mounts" in wanted:
        click.echo("\nMOUNTS")
        for m in f.mounts:
            opts = ",".join(x for x in ("ro" if m.readonly else "rw", m.options) if x)
            click.echo(f"{m.mountpoint} {m.fstype} {m.source} root={m.root} {opts}")
    if "env" in wanted:
        click.echo("\nENVIRONMENT")
        for p in f.processes:
            click.echo(f"{p.pid} ({p.comm}):")
            for var in p.env:
                click.echo(f"  {var}")
    if got.search is not None:
        more = " (more not shown: raise --max-hits)" if f.hits_truncated else ""
        click.echo(f"\nMEMORY MATCHES of {got.search!r}: {len(f.hits)}{more}")
        for h in f.hits:
            click.echo(f"{h.pid:>7} {h.comm:<15} {h.address:#018x}  {h.context}")


@forensics.command("dump-memory")
@click.argument("container")
@click.argument("pid", type=int)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The tar file to write.")
@click.option(
    "--max-size",
    default=4 << 30,
    show_default=True,
    type=click.IntRange(min=1),
    help="Bytes of memory taken.",
)
@guarded
def dump_memory(container: str, pid: int, output: Path, max_size: int) -> None:
    """Dump the memory of process PID (as `vmpod exec CONTAINER ps` shows it) of a
    running CONTAINER into a tar: dump.json, maps.txt, regions/START-END.bin."""
    from vmpod.forensics.dumpmem import DumpRequest
    from vmpod.forensics.dumpmem import dump_memory as do_dump

    got = do_dump(default_paths(), DumpRequest(container, pid, output, max_size))
    click.echo(str(got.output))
    click.echo(
        f"pid {pid} ({got.comm}, {got.vm_pid} in the VM): {got.regions} regions, {got.bytes} bytes "
        f"in {got.seconds:.2f}s; {len(got.unreadable)} unreadable",
        err=True,
    )
