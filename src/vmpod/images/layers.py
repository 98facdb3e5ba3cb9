"""Apply image layer tars to a root directory without ever writing outside it.

Every entry path is resolved component by component below the root
(``fsutil.resolve_below``): ``..`` may not climb above it, and a symlink met
on the way is followed only if its target is relative and stays inside
(``bin -> usr/bin``); anything else is refused. The final component
is never followed: whatever exists there is removed first and new files are
created with ``O_EXCL | O_NOFOLLOW``. OCI whiteouts (``.wh.NAME``,
``.wh..wh..opq``) are applied against lower layers.

Regular files are written sparsely: runs of zeros (GNU/pax sparse members read
as zeros, or zeros stored in the tar) become holes, so a tiny layer holding a
huge sparse file does not fill the disk. The total size of regular files an
applier writes (their apparent size, holes included) is capped per image:
``VMPOD_MAX_IMAGE_BYTES`` (bytes, or with a K/M/G/T suffix), 16 GiB by default.

The checks are path based (lstat per component), which is sound because the
root is a fresh private directory nobody else writes to while we unpack;
never unpack into a tree a running guest can modify (e.g. a live 9p share).
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import IO

from vmpod.errors import ConfigError, ImageError, UnsafeLayerError
from vmpod.fsutil import Below, resolve_below

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_CHUNK = 1 << 20
_HOLE = 64 << 10  # the smallest run of zeros written as a hole
_ZEROS = bytes(_HOLE)
MAX_IMAGE_ENV = "VMPOD_MAX_IMAGE_BYTES"
DEFAULT_MAX_IMAGE_BYTES = 16 << 30
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

Opener = Callable[[], "IO[bytes] | None"]


class LayerApplier:
    """Applies tar entries into ``root``, one layer after another.

    Directory modes and mtimes are applied by :meth:`finish`, after all
    layers, so that writing children neither fails (read-only dirs when not
    root) nor bumps the recorded mtimes.
    """

    def __init__(self, root: Path, *, whiteouts: bool = True, max_bytes: int | None = None) -> None:
        self._root = os.path.abspath(root)
        self.max_bytes = max_image_bytes() if max_bytes is None else max_bytes
        self.written = 0  # apparent bytes of regular files so far, over all layers
        self._whiteouts = whiteouts
        self._is_root = os.geteuid() == 0
        self._dir_meta: dict[str, tuple[int, int]] = {}  # path -> (mode, mtime_ns)
        self._added: set[str] = set()  # real paths written by the current layer
        self.label = "layer"

    def begin_layer(self, label: str) -> None:
        self.label = label
        self._added = set()

    # -- paths -------------------------------------------------------------

    def _path(self, parts: list[str]) -> str:
        return os.path.join(self._root, *parts)

    def _clean(self, name: str, what: str) -> list[str]:
        """Split a tar name into components; leading '/' is relative to the root."""
        parts: list[str] = []
        for part in name.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not parts:
                    raise UnsafeLayerError(
                        f"{self.label}: {what} {name!r} escapes the root filesystem with '..'",
                        hint="refusing a malicious image",
                    )
                parts.pop()
            else:
                parts.append(part)
        return parts

    def _resolve_dir(self, parts: list[str], entry: str, *, create: bool) -> list[str] | None:
        """Real (symlink-free) components of directory ``parts`` below the root.

        Resolved by fsutil.resolve_below, which never leaves the root; a path that
        tries to (a '..' above it, an absolute symlink) is refused, not confined,
        as is a symlink loop. Missing directories are created when ``create`` (tar
        may omit parents), else None is returned.
        """
        path = "/".join(parts)
        while True:
            found = self._below(path, entry)
            if found.escape:
                raise UnsafeLayerError(
                    f"{self.label}: entry {entry!r} {found.escape}", hint="refusing a malicious image"
                )
            if found.exists:
                break
            if not create:
                return None
            new = [*found.parts, found.missing[0]]  # one level at a time: links may follow
            os.mkdir(self._path(new), 0o755)
            self._added.add("/".join(new))
            path = "/".join([*new, *found.missing[1:]])
        if not stat.S_ISDIR(os.lstat(found.path).st_mode):
            raise self._not_a_dir(entry, "/".join(found.parts))
        return list(found.parts)

    def _below(self, path: str, entry: str) -> Below:
        try:
            return resolve_below(self._root, path)
        except NotADirectoryError as err:
            raise self._not_a_dir(entry, os.path.relpath(err.filename, self._root)) from None
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise UnsafeLayerError(
                f"{self.label}: entry {entry!r}: too many levels of symbolic links",
                hint="refusing a malicious image",
            ) from None

    def _not_a_dir(self, entry: str, rel: str) -> ImageError:
        return ImageError(
            f"{self.label}: entry {entry!r}: {rel!r} is not a directory", hint="the image is malformed"
        )

    def _remove(self, parts: list[str]) -> None:
        """Remove whatever is at ``parts`` (a link itself, never its target)."""
        path = self._path(parts)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)  # fd-based on Linux: does not follow symlinks inside
            prefix = "/".join(parts) + "/"
            for key in [k for k in self._dir_meta if k.startswith(prefix)]:
                del self._dir_meta[key]
        else:
            os.unlink(path)
        self._dir_meta.pop("/".join(parts), None)

    # -- entries -----------------------------------------------------------

    def apply(self, info: tarfile.TarInfo, data: Opener) -> None:
        """Apply one tar entry; ``data`` opens a regular file's content."""
        name = info.name
        parts = self._clean(name, "entry")
        if self._whiteouts and parts and parts[-1].startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, name)
            return
        if info.ischr() or info.isblk() or info.isfifo():
            if not self._is_root:
                raise UnsafeLayerError(
                    f"{self.label}: entry {name!r} is a device node or fifo, which only root may create",
                    hint="run as root",
                )
        elif not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
            raise UnsafeLayerError(
                f"{self.label}: entry {name!r} has unsupported tar type {info.type!r}",
                hint="the image is malformed",
            )
        if not parts:
            if not info.isdir():
                raise UnsafeLayerError(
                    f"{self.label}: entry {name!r} would replace the root directory",
                    hint="refusing a malicious image",
                )
            self._set_dir_meta([], info)
            return
        link_target = self._hardlink_target(info) if info.islnk() else ""
        parent = self._resolve_dir(parts[:-1], name, create=True)
        assert parent is not None
        leaf = [*parent, parts[-1]]
        path = self._path(leaf)
        try:
            existing: os.stat_result | None = os.lstat(path)
        except FileNotFoundError:
            existing = None
        if existing is not None and not (info.isdir() and stat.S_ISDIR(existing.st_mode)):
            self._remove(leaf)  # replaces a symlink itself instead of writing through it
        self._added.add("/".join(leaf))
        if info.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                os.mkdir(path, 0o700)
            self._set_dir_meta(leaf, info)
        elif info.isreg():
            self._write_file(path, info, data)
        elif info.issym():
            os.symlink(info.linkname, path)
            self._set_owner_times(path, info)
        elif info.islnk():
            os.link(link_target, path, follow_symlinks=False)
        else:
            kind = stat.S_IFCHR if info.ischr() else stat.S_IFBLK if info.isblk() else stat.S_IFIFO
            os.mknod(path, kind | 0o600, os.makedev(info.devmajor, info.devminor))
            self._set_owner_times(path, info, mode=info.mode)

    def _write_file(self, path: str, info: tarfile.TarInfo, data: Opener) -> None:
        self.written += max(0, info.size)
        if self.written > self.max_bytes:
            raise ImageError(
                f"{self.label}: entry {info.name!r}: the image unpacks to more than {_human(self.max_bytes)}",
                hint=f"set {MAX_IMAGE_ENV} to allow larger images",
            )
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "wb", buffering=0):
            src = data()
            if src is None:
                raise ImageError(f"{self.label}: cannot read content of {info.name!r}")
            with src:
                _copy_sparse(src, fd, info.size)
            if self._is_root:
                os.fchown(fd, info.uid, info.gid)  # before chmod: chown clears setuid bits
            os.fchmod(fd, info.mode & 0o7777)
            ns = _mtime_ns(info)
            os.utime(fd, ns=(ns, ns))

    def _set_owner_times(self, path: str, info: tarfile.TarInfo, *, mode: int = -1) -> None:
        if self._is_root:
            os.chown(path, info.uid, info.gid, follow_symlinks=False)
        if mode >= 0:
            os.chmod(path, mode & 0o7777)
        ns = _mtime_ns(info)
        os.utime(path, ns=(ns, ns), follow_symlinks=False)

    def _set_dir_meta(self, parts: list[str], info: tarfile.TarInfo) -> None:
        path = self._path(parts)
        if self._is_root:
            os.chown(path, info.uid, info.gid, follow_symlinks=False)
        else:
            os.chmod(path, (info.mode & 0o7777) | 0o700)  # keep it writable until finish()
        self._dir_meta["/".join(parts)] = (info.mode & 0o7777, _mtime_ns(info))

    def _hardlink_target(self, info: tarfile.TarInfo) -> str:
        parts = self._clean(info.linkname, f"hard link {info.name!r} to")
        if not parts:
            raise UnsafeLayerError(
                f"{self.label}: hard link {info.name!r} points at the root", hint="refusing a malicious image"
            )
        parent = self._resolve_dir(parts[:-1], info.name, create=False)
        target = self._path([*parent, parts[-1]]) if parent is not None else ""
        try:
            st = os.lstat(target) if target else None
        except FileNotFoundError:
            st = None
        if st is None:
            raise ImageError(
                f"{self.label}: hard link {info.name!r} points at missing {info.linkname!r}",
                hint="the image is malformed",
            )
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeLayerError(
                f"{self.label}: hard link {info.name!r} points at directory {info.linkname!r}",
                hint="refusing a malicious image",
            )
        return target

    # -- whiteouts ---------------------------------------------------------

    def _whiteout(self, parts: list[str], name: str) -> None:
        base = parts[-1]
        parent = self._resolve_dir(parts[:-1], name, create=False)
        if parent is None:
            return  # nothing below to hide
        if base == OPAQUE_MARKER:
            self._make_opaque(parent)
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other .wh..wh.* names are aufs bookkeeping, not content
        target = base[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", ".."):
            raise UnsafeLayerError(
                f"{self.label}: invalid whiteout {name!r}", hint="refusing a malicious image"
            )
        leaf = [*parent, target]
        if "/".join(leaf) not in self._added:  # whiteouts hide lower layers only
            self._remove(leaf)

    def _make_opaque(self, parts: list[str]) -> None:
        """Remove everything below ``parts`` that the current layer did not add."""
        with os.scandir(self._path(parts)) as entries:
            children = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        for child, is_dir in children:
            leaf = [*parts, child]
            if "/".join(leaf) not in self._added:
                self._remove(leaf)
            elif is_dir:
                self._make_opaque(leaf)

    def finish(self) -> None:
        """Apply directory modes and mtimes, deepest first."""
        for rel in sorted(self._dir_meta, key=lambda k: k.count("/") + bool(k), reverse=True):
            mode, mtime = self._dir_meta[rel]
            path = self._path(rel.split("/") if rel else [])
            if stat.S_ISDIR(os.lstat(path).st_mode):  # _remove() prunes deleted dirs
                os.chmod(path, mode)
                os.utime(path, ns=(mtime, mtime), follow_symlinks=False)


def apply_tar(applier: LayerApplier, stream: io.RawIOBase) -> None:
    """Stream one uncompressed layer tar into ``applier``."""
    info: tarfile.TarInfo | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape") as tar:
            # Stream mode keeps every header read in tar.members (not in the stubs);
            # clearing it keeps memory flat for layers with millions of entries.
            members: list[tarfile.TarInfo] = vars(tar)["members"]
            while (info := tar.next()) is not None:
                applier.apply(info, partial(tar.extractfile, info))
                members.clear()
    except ImageError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ImageError(
            f"{applier.label} is not a valid tar stream: {err}", hint="the image is corrupt; re-export it"
        ) from err
    except (OSError, ValueError, OverflowError) as err:  # e.g. ENOSPC, absurd mtimes
        entry = f" entry {info.name!r}" if info is not None else ""
        raise ImageError(
            f"cannot unpack {applier.label}{entry}: {getattr(err, 'strerror', None) or err}"
        ) from err


def copy_tree(applier: LayerApplier, src: Path) -> None:
    """Copy directory ``src`` through ``applier`` (keeps links, owners, devices)."""
    # gettarinfo() gives exactly what a layer tar would carry, hard links included.
    tar = tarfile.TarFile(fileobj=io.BytesIO(), mode="w")  # never written to
    base = os.path.realpath(src)  # the root itself may be a symlink
    try:
        for dirpath, dirnames, filenames in os.walk(base, onerror=_raise):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, base)
            names = [""] if rel_dir == "." else []
            for name in [*names, *sorted(dirnames), *sorted(filenames)]:
                path = os.path.join(dirpath, name) if name else dirpath
                arcname = os.path.normpath(os.path.join(rel_dir, name))
                info = tar.gettarinfo(path, arcname)
                if info is None:
                    continue  # sockets: runtime artefacts, tar skips them too
                # Keep nanoseconds, as a pax tar would (TarInfo.mtime is a float).
                mtime_ns = os.lstat(path).st_mtime_ns
                info.pax_headers = {"mtime": f"{mtime_ns // 10**9}.{mtime_ns % 10**9:09d}"}
                applier.apply(info, partial(_open_nofollow, path))
    except ImageError:
        raise
    except OSError as err:
        raise ImageError(f"cannot copy root filesystem {src}: {err}") from err


def max_image_bytes() -> int:
    """The per-image cap on unpacked bytes: ``VMPOD_MAX_IMAGE_BYTES`` or 16 GiB."""
    raw = os.environ.get(MAX_IMAGE_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_BYTES
    text = raw.upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    number = text[: len(text) - len(unit)].strip()
    if not number.isdigit() or int(number) <= 0:
        raise ConfigError(
            f"{MAX_IMAGE_ENV}={raw!r} is not a size", hint="give bytes or a size such as 16G or 512M"
        )
    return int(number) * _UNITS[unit]


def _human(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]} {unit}iB"
    return f"{n} bytes"


def _copy_sparse(src: IO[bytes], fd: int, limit: int) -> None:
    """Copy ``src`` to ``fd`` leaving holes for runs of zeros.

    Reads at most ``limit`` bytes (the size the header declared and the cap
    counted), as tar does with a file that grows while it is copied.
    """
    pos = 0
    while pos < limit:
        chunk = src.read(min(_CHUNK, limit - pos))
        if not chunk:
            break
        view = memoryview(chunk)
        for off in range(0, len(view), _HOLE):
            block = view[off : off + _HOLE]
            if block == _ZEROS[: len(block)]:
                continue  # a hole: the file is extended by ftruncate below
            _pwrite_all(fd, block, pos + off)
        pos += len(chunk)
    os.ftruncate(fd, pos)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _mtime_ns(info: tarfile.TarInfo) -> int:
    """Exact mtime: from the pax header text when there is one (floats lose ns)."""
    try:
        return int(Decimal(info.pax_headers["mtime"]) * 1_000_000_000)
    except (KeyError, ArithmeticError, ValueError):
        return int(info.mtime * 1_000_000_000)


def _open_nofollow(path: str) -> IO[bytes]:
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")


def _raise(err: OSError) -> None:
    raise err
