"""runc's ``checkpoint`` and ``restore``, as podman 4.3 (and conmon) call them.

checkpoint: the container's monitor runs ``runc checkpoint`` (CRIU) in the guest
into a private staging directory that only this checkpoint shares with the VM;
the images are checked (regular files and directories only, bounded) and moved
into ``--image-path``, CRIU's dump.log copied into ``--work-path``. The guest
never sees the engine's directories.

restore: a new sandbox (monitor + VM) is created from the bundle, as ``create``
does, and its container is restored from a copy of ``--image-path`` by ``runc
restore`` in the guest instead of started; then the pid file is written, so the
container reads as running with the monitor's pid, as runc's restore leaves it.
The engine has laid the rootfs diff into the bundle's root before calling us.

What CRIU in the guest cannot do for an engine is refused with one line naming
the flag, never ignored; so is a container with a terminal (the guest agent
cannot restore one: its pty is the guest's), before anything is dumped or booted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vmpod.errors import VmpodError
from vmpod.forensics.archive import check_tree
from vmpod.fsutil import owned_tmpdir
from vmpod.jsonsafe import parse_json
from vmpod.paths import default_paths
from vmpod.runtime import ipc, lifecycle
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.rules import require
from vmpod.runtime.state import Store, check_id

MAX_IMAGES = 16 << 30  # bytes of CRIU images moved from a guest, or copied into one
MAX_LOG = 16 << 20  # bytes of a CRIU log copied to --work-path
# CRIU's work files the engine reads from --work-path (podman exports stats-dump
# and prints it with --print-stats)
DUMP_FILES = ("dump.log", "stats-dump")
RESTORE_FILES = ("restore.log", "stats-restore")
CGROUP_MODES = ("", "soft")  # what the guest's runc gets (its default)
# what the guest's CRIU cannot do here, and why (the refusal's second half)
_WHY = {
    "--tcp-established": "a restore brings connected TCP sockets back closed (CRIU tcp-close)",
    "--ext-unix-sk": "a unix socket's peer outside the container is outside the VM",
    "--shell-job": "the container's terminal is relayed by its monitor, not inherited",
    "--lazy-pages": "lazy migration needs a page server the host cannot reach in the VM",
    "--page-server": "the page server would have to be reachable from inside the VM",
    "--status-fd": "the guest's CRIU cannot write to a host file descriptor",
    "--pre-dump": "incremental dumps (memory tracking) are not kept between guest checkpoints",
    "--parent-path": "incremental dumps (memory tracking) are not kept between guest checkpoints",
    "--auto-dedup": "the images are moved out of the VM once written",
    "--lsm-profile": "the guest has no LSM",
    "--lsm-mount-context": "the guest has no LSM (restore into a pod is not supported)",
    "--file-locks": "the restore of file locks is not passed to the guest yet",
}


@dataclass(frozen=True)
class CheckpointOptions:
    image_path: Path
    work_path: Path
    leave_running: bool = False
    file_locks: bool = False
    tcp_established: bool = False


@dataclass(frozen=True)
class RestoreOptions:
    bundle: Path
    image_path: Path
    work_path: Path
    pid_file: str = ""
    console_socket: str = ""
    detach: bool = False


def refuse(command: str, given: Iterable[str]) -> None:
    """One line for the first unsupported flag that was given."""
    for flag in given:
        raise RuntimeCliError(f"{command} {flag} is not supported by vmpod-runtime: {_WHY[flag]}")


def check_cgroup_mode(mode: str) -> None:
    if mode not in CGROUP_MODES:
        raise RuntimeCliError(
            f"--manage-cgroups-mode {mode} is not supported by vmpod-runtime: only soft "
            "(the container's cgroups are the guest's, made fresh in each VM)"
        )


def check_empty_ns(namespaces: Iterable[str]) -> None:
    for ns in namespaces:
        if ns != "network":
            raise RuntimeCliError(f"--empty-ns {ns} is not supported by vmpod-runtime: only network")


def default_paths_for(image_path: str, work_path: str) -> tuple[Path, Path]:
    """runc's defaults: ./checkpoint for the images, the image path for the work files."""
    images = Path(image_path or "checkpoint").absolute()
    return images, Path(work_path).absolute() if work_path else images


def checkpoint(store: Store, cid: str, opts: CheckpointOptions) -> None:
    """CRIU images of ``cid`` into ``opts.image_path`` (dump.log into ``work_path``)."""
    # (imported on use, as create does: the sandbox stack is heavy)
    from vmpod.sandbox import CHECKPOINT_TIMEOUT

    check_id(cid)
    with store.lock(cid):
        st = store.load(cid)
        require("checkpoint", store.status(st))
        refuse_terminal("checkpoint", Path(st.bundle))
        paths = default_paths()
        with owned_tmpdir(paths.tmp, "checkpoint-") as tmp:
            stage = tmp / "criu"  # what the VM sees: nothing else of tmp
            stage.mkdir(mode=0o700)
            flags = {
                "leave_running": opts.leave_running,
                "file_locks": opts.file_locks,
                "tcp_established": opts.tcp_established,
            }
            try:
                ipc.request(
                    lifecycle.sock_path(store, cid),
                    {"op": "checkpoint", "dir": str(stage), "flags": flags},
                    timeout=CHECKPOINT_TIMEOUT + 60,
                )
            finally:
                copy_work_files(stage / "work", opts.work_path, DUMP_FILES)
            images = stage / "checkpoint"
            try:
                check_tree(images, MAX_IMAGES, "the CRIU images the guest wrote")
            except VmpodError as err:
                raise RuntimeCliError(err.message) from err
            move_into(images, opts.image_path)
    if not opts.leave_running:  # as runc's: the dumped container is gone once we return
        store.wait_monitor_gone(cid, lifecycle.DESTROY_TIMEOUT)


def restore(store: Store, cid: str, opts: RestoreOptions, log_opts: tuple[str, str, bool]) -> int:
    """A new VM whose container is ``cid`` restored from ``opts.image_path``; returns
    0 (``detach``) or the container's exit status once it ends (then it is deleted)."""
    from vmpod.runtime.create import create
    from vmpod.runtime.run import wait_child

    check_id(cid)
    if not (opts.image_path / "inventory.img").is_file():
        raise RuntimeCliError(f"{opts.image_path} holds no CRIU images (inventory.img)")
    if (store.dir(cid) / "state.json").exists():
        raise RuntimeCliError("container with given ID already exists")
    refuse_terminal("restore", opts.bundle)
    paths = default_paths()
    with owned_tmpdir(paths.tmp, "restore-") as tmp:
        stage = tmp / "criu"  # a copy: the guest never writes into the engine's images
        stage.mkdir(mode=0o700)
        try:
            check_tree(opts.image_path, MAX_IMAGES, f"the CRIU images in {opts.image_path}")
        except VmpodError as err:
            raise RuntimeCliError(err.message) from err
        shutil.copytree(opts.image_path, stage / "checkpoint", symlinks=True)
        create(store, cid, str(opts.bundle), "", opts.console_socket, log_opts)
        try:
            try:
                lifecycle.start(store, cid, restore=str(stage))
            finally:
                copy_work_files(stage / "work", opts.work_path, RESTORE_FILES)
            st = store.load(cid)
            if opts.pid_file:
                lifecycle.write_pid_file(opts.pid_file, st.pid)
        except BaseException:
            with contextlib.suppress(RuntimeCliError, OSError):
                lifecycle.delete(store, cid, force=True)
            raise
    if opts.detach:
        return 0
    status = wait_child(st.pid, st.monitor_start)
    with contextlib.suppress(RuntimeCliError):
        lifecycle.delete(store, cid, force=True)
    return status


def refuse_terminal(command: str, bundle: Path) -> None:
    try:
        spec = parse_json((bundle / "config.json").read_bytes())
    except (OSError, ValueError, VmpodError) as err:
        raise RuntimeCliError(f"cannot read {bundle / 'config.json'}: {err}") from err
    process = spec.get("process") if isinstance(spec, dict) else None
    if isinstance(process, dict) and process.get("terminal"):
        raise RuntimeCliError(
            f"{command} of a container with a terminal is not supported by vmpod-runtime: "
            "the guest cannot restore its pty"
        )


def copy_work_files(src: Path, dest: Path, names: tuple[str, ...]) -> None:
    """CRIU's work files the guest wrote: bounded copies of regular files, if any."""
    dest.mkdir(parents=True, exist_ok=True)
    try:  # (the guest made these: no symlink is followed, nothing but a regular file read)
        dfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return  # CRIU did not get as far as its work directory
    try:
        for name in names:
            with contextlib.suppress(OSError):
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
                with open(fd, "rb") as fin:
                    if stat.S_ISREG(os.fstat(fd).st_mode):
                        data = fin.read(MAX_LOG)
                        (dest / name).write_bytes(data)
    finally:
        os.close(dfd)


def move_into(src: Path, dest: Path) -> None:
    """Every entry of ``src`` into the directory ``dest`` (made if missing), replacing
    what is there, as CRIU writing into ``dest`` itself would."""
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    for entry in sorted(src.iterdir()):
        target = dest / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        shutil.move(str(entry), str(target))
