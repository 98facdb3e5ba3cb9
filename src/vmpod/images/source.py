"""ImageSource: a resolved local image that can materialise its root filesystem."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from vmpod.errors import ImageError
from vmpod.images.blobs import open_store
from vmpod.images.layers import LayerApplier, apply_tar, copy_tree
from vmpod.images.stream import LayerBlob, LayerReader

ARCHIVE_KINDS = ("oci-archive", "docker-archive")


@dataclass(frozen=True)
class ImageConfig:
    """The runtime defaults of an image (the "config" object of its config blob)."""

    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""


@dataclass(frozen=True)
class ImageSource:
    """A resolved image: what it is, its content id, config and how to unpack it.

    ``kind`` is "rootfs-dir", "oci-layout", "oci-archive" or "docker-archive".
    ``digest`` is the manifest digest (docker archives: the config digest, i.e.
    the docker image id; rootfs dirs: a hash over every entry's metadata).
    """

    ref: str
    kind: str
    digest: str
    config: ImageConfig
    rootfs_dir: Path | None = None
    _store: Path | None = field(default=None, repr=False)  # layout dir or archive file
    _layers: tuple[LayerBlob, ...] = field(default=(), repr=False)

    def unpack(self, dest: Path) -> None:
        """Materialise the root filesystem into the empty directory ``dest``.

        On any error ``dest`` is emptied again, so a half-unpacked or
        unverified tree is never left behind.
        """
        dest = Path(dest)
        try:
            empty = not any(dest.iterdir())
        except OSError as err:
            raise ImageError(
                f"cannot unpack {self.ref!r} into {dest}: {err.strerror}",
                hint="pass an existing empty directory",
            ) from err
        if not empty:
            raise ImageError(
                f"cannot unpack {self.ref!r}: {dest} is not empty", hint="unpack into a new empty directory"
            )
        try:
            self._unpack(dest)
        except BaseException:
            _empty_dir(dest)
            raise

    def _unpack(self, dest: Path) -> None:
        if self.kind == "rootfs-dir":
            assert self.rootfs_dir is not None
            applier = LayerApplier(dest, whiteouts=False)  # ".wh.*" are plain files here
            copy_tree(applier, self.rootfs_dir)
            applier.finish()
            return
        assert self._store is not None
        applier = LayerApplier(dest)
        with open_store(self._store, archive=self.kind in ARCHIVE_KINDS) as store:
            for index, blob in enumerate(self._layers, 1):
                label = f"layer {index}/{len(self._layers)} ({blob.digest or blob.location}) of {self.ref!r}"
                applier.begin_layer(label)
                try:
                    with store.open(blob.location) as raw:
                        layer = LayerReader(raw, blob, label)
                        with layer as stream:
                            apply_tar(applier, stream)
                            layer.verify()
                except (OSError, EOFError, tarfile.TarError, zlib.error) as err:
                    raise ImageError(
                        f"cannot read {label}: {err}", hint="the image is corrupt or unreadable"
                    ) from err
        applier.finish()


def _empty_dir(dest: Path) -> None:
    try:
        children = list(dest.iterdir())
    except OSError:
        return  # dest itself is gone: nothing left to clean
    for child in children:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)  # best effort: the original error matters
        else:
            child.unlink(missing_ok=True)


def rootfs_digest(root: Path) -> str:
    """sha256 over (path, mode, uid, gid, size, mtime_ns, link target) of every entry.

    A metadata walk, no file contents: cheap even for large trees, and any
    edit through normal tools changes size or mtime.
    """
    digest = hashlib.sha256()
    stack: list[tuple[str, bytes]] = [(str(root), b".")]
    while stack:
        path, rel = stack.pop()
        st = os.stat(path) if rel == b"." else os.lstat(path)  # the root may be a link
        target = os.fsencode(os.readlink(path)) if stat.S_ISLNK(st.st_mode) else b""
        # NUL never occurs in names, link targets or numbers: the encoding is unambiguous.
        fields = f"{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0{st.st_mtime_ns}\0"
        digest.update(rel + b"\0" + fields.encode() + target + b"\0")
        if stat.S_ISDIR(st.st_mode):
            try:
                names = sorted(os.listdir(path))
            except OSError as err:
                raise ImageError(
                    f"cannot read {path}: {err.strerror}",
                    hint="the root filesystem must be readable by vmpod",
                ) from err
            # Reversed so the stack pops children in sorted order.
            stack.extend(
                (os.path.join(path, name), rel + b"/" + os.fsencode(name)) for name in reversed(names)
            )
    return f"sha256:{digest.hexdigest()}"


def resolve_rootfs(path: str | Path) -> ImageSource:
    """An ImageSource for a root filesystem directory used as is."""
    root = Path(path)
    hint = "pass a readable directory holding a root filesystem"
    if not root.exists():
        raise ImageError(f"rootfs {str(path)!r} not found", hint=hint)
    if not root.is_dir():
        raise ImageError(f"rootfs {str(path)!r} is not a directory", hint=hint)
    if not os.access(root, os.R_OK | os.X_OK):
        raise ImageError(f"rootfs {str(path)!r} is not readable", hint=hint)
    root = root.absolute()
    return ImageSource(
        ref=str(path), kind="rootfs-dir", digest=rootfs_digest(root), config=ImageConfig(), rootfs_dir=root
    )
