"""A container's writable layer as podman exports it: ``rootfs-diff.tar`` (the
overlay upper directory's files) and ``deleted.files`` (a JSON list of the
image's paths the container deleted: the upper's whiteouts, and its opaque
directories, which hide the image's directory of that name).

Reading the upper directory never follows a symlink; applying a diff goes
through the image layer applier (nothing lands outside the new upper).
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
from pathlib import Path, PurePosixPath

from vmpod.errors import ForensicsError, VmpodError
from vmpod.fsutil import resolve_below
from vmpod.images.layers import LayerApplier, apply_tar

OPAQUE_XATTR = "trusted.overlay.opaque"
MAX_DELETED = 8 << 20  # bytes of deleted.files


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def write_diff(upper: Path, tar_path: Path, deleted_path: Path) -> int:
    """Write the diff of ``upper``; returns the number of deleted paths."""
    deleted: list[str] = []
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(upper):
            dirnames.sort()
            for name in sorted((*dirnames, *filenames)):
                path = Path(dirpath, name)
                rel = path.relative_to(upper).as_posix()
                st = path.lstat()
                if _is_whiteout(st):
                    deleted.append(f"/{rel}")
                    continue
                if stat.S_ISDIR(st.st_mode) and _opaque(path):
                    deleted.append(f"/{rel}")
                if stat.S_ISSOCK(st.st_mode):
                    continue  # a socket file is recreated by whoever binds it
                tar.add(path, arcname=rel, recursive=False)
    deleted_path.write_text(json.dumps(deleted))
    return len(deleted)


def read_deleted(deleted_path: Path) -> list[str]:
    """The paths of ``deleted.files`` (absolute, in the container's root)."""
    try:
        if deleted_path.stat().st_size > MAX_DELETED:
            raise ForensicsError(f"{deleted_path.name} is larger than {MAX_DELETED} bytes")
        data = json.loads(deleted_path.read_bytes())
    except FileNotFoundError:
        return []
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ForensicsError(f"{deleted_path.name} is not valid JSON: {err}") from None
    if not isinstance(data, list) or not all(isinstance(p, str) and p.strip("/") for p in data):
        raise ForensicsError(f"{deleted_path.name} must be a JSON list of paths")
    return data


def apply_diff(tar_path: Path | None, deleted: list[str], upper: Path) -> None:
    """Make ``upper`` (empty, an overlay's upper dir) hold the diff: the tar's
    files, a whiteout for each deleted path, opaque marks on recreated dirs."""
    if tar_path is not None:
        applier = LayerApplier(upper, whiteouts=False)
        applier.begin_layer("rootfs-diff.tar")
        try:
            with open(tar_path, "rb") as fh:
                apply_tar(applier, fh)  # type: ignore[arg-type]
            applier.finish()
        except VmpodError as err:
            raise ForensicsError(f"cannot apply rootfs-diff.tar: {err.message}") from err
    for path in deleted:
        parts = PurePosixPath("/", path).parts[1:]
        if not parts or ".." in parts:
            raise ForensicsError(f"deleted.files: {path!r} is not a plain absolute path")
        parent = resolve_below(upper, "/".join(parts[:-1]))
        if parent.escape or not parent.exists:
            # the parent is in the image only: recreate it in the upper, plainly
            parent.path.joinpath(*parent.missing).mkdir(parents=True, exist_ok=True, mode=0o755)
            parent = resolve_below(upper, "/".join(parts[:-1]))
            if parent.escape or not parent.exists:
                raise ForensicsError(f"deleted.files: cannot place {path!r} below the root")
        target = parent.path / parts[-1]
        try:
            st = target.lstat()
        except FileNotFoundError:
            os.mknod(target, 0o600 | stat.S_IFCHR, 0)  # overlayfs whiteout
            continue
        if stat.S_ISDIR(st.st_mode):
            os.setxattr(target, OPAQUE_XATTR, b"y", follow_symlinks=False)
