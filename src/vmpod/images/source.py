"""ImageSource: a resolved local image that can materialise its root filesystem."""

from __future__ import annotations

import ctypes
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
# A root filesystem directory's digest walk stops past this many entries: a
# container image holds far fewer, a host's whole tree far more.
MAX_ROOTFS_ENTRIES = 2_000_000
# statfs f_type of the kernel's pseudo filesystems (linux/magic.h): never a rootfs
PSEUDO_FS = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x6165676C: "pstore",
    0xCAFE4A11: "bpf",
    0x62656570: "configfs",
    0x1CD1: "devpts",
    0x19800202: "mqueue",
    0x42494E4D: "binfmt_misc",
    0x6E736673: "nsfs",
    0xDE5E81E4: "efivarfs",
    0xF97CFF8C: "selinuxfs",
    0x65735543: "fusectl",
    0x958458F6: "hugetlbfs",
}


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


class _Statfs(ctypes.Structure):
    # struct statfs begins with f_type (__fsword_t, a long) on 64-bit Linux; the
    # rest is room for what the kernel writes
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 256)]


_libc = ctypes.CDLL(None, use_errno=True)


def fs_type(path: str | Path) -> int:
    """statfs(2)'s f_type of the filesystem holding ``path`` (0 when unknown)."""
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return 0
    return int(buf.f_type) & 0xFFFFFFFF


def pseudo_fs(path: str | Path) -> str:
    """The kernel pseudo filesystem ``path`` is on ("proc", "devtmpfs", ...), or ""."""
    name = PSEUDO_FS.get(fs_type(path), "")
    if name:
        return name
    # devtmpfs reports tmpfs' magic: tell it by being the host's /dev mount
    try:
        dev, root_dev = os.stat("/dev").st_dev, os.stat("/").st_dev
        if dev != root_dev and os.stat(path).st_dev == dev:
            return "devtmpfs"
    except OSError:
        pass
    return ""


def check_rootfs_dir(root: Path) -> None:
    """Refuse the host's own root and kernel pseudo filesystems as a container root."""
    hint = "pass a directory holding a container's root filesystem"
    real = os.path.realpath(root)
    if real == "/":
        raise ImageError(f"rootfs {str(root)!r} is the host's root directory", hint=hint)
    kind = pseudo_fs(real)
    if kind:
        raise ImageError(f"rootfs {str(root)!r} is on the host's {kind} filesystem", hint=hint)


def rootfs_digest(root: Path) -> str:
    """sha256 over (path, mode, uid, gid, size, mtime_ns, link target) of every entry.

    A metadata walk, no file contents: cheap even for large trees, and any
    edit through normal tools changes size or mtime.
    """
    digest = hashlib.sha256()
    stack: list[tuple[str, bytes]] = [(str(root), b".")]
    root_dev = os.stat(root).st_dev
    entries = 0
    while stack:
        path, rel = stack.pop()
        entries += 1
        if entries > MAX_ROOTFS_ENTRIES:
            raise ImageError(
                f"rootfs {str(root)!r} holds more than {MAX_ROOTFS_ENTRIES} entries",
                hint="pass a directory holding a container's root filesystem",
            )
        try:
            st = os.stat(path) if rel == b"." else os.lstat(path)  # the root may be a link
        except OSError as err:
            raise ImageError(
                f"cannot read {path}: {err.strerror}",
                hint="the root filesystem must be readable and not change while vmpod reads it",
            ) from err
        if stat.S_ISDIR(st.st_mode) and st.st_dev != root_dev and pseudo_fs(path):
            raise ImageError(
                f"rootfs {str(root)!r} has the host's {pseudo_fs(path)} mounted on {path}",
                hint="unmount it: the container gets its own",
            )
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
    check_rootfs_dir(root)
    root = root.absolute()
    return ImageSource(
        ref=str(path), kind="rootfs-dir", digest=rootfs_digest(root), config=ImageConfig(), rootfs_dir=root
    )
