"""Evidence archives: podman's ``container checkpoint --export`` layout plus a
chain-of-custody manifest.

    checkpoint/          CRIU images (runc checkpoint in the guest)
    config.dump          the container's vmpod record (podman: its container config)
    spec.dump            the OCI runtime config it ran with
    rootfs-diff.tar      its writable layer's files (deleted ones excluded)
    deleted.files        JSON list of the image's paths it deleted (overlay whiteouts)
    dump.log             CRIU's log of the dump
    vmpod-manifest.json  SHA-256 of every other file, capture time, host, kernels,
                         CRIU/runc/vmpod versions, command line (written last)

vmpod writes an uncompressed tar. podman's and Kubernetes' archives (the same
layout without the manifest, often gzip or zstd compressed) are read too, as
unverified: they carry no digests. Reading one trusts nothing: member names
must be plain relative paths, only regular files and directories are taken,
and sizes are capped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TypeGuard

from vmpod.errors import ConfigError, ForensicsError, ImageError
from vmpod.fsutil import atomic_writer
from vmpod.images.stream import LayerBlob, LayerReader

CHECKPOINT_DIR = "checkpoint"
CONFIG_DUMP = "config.dump"
SPEC_DUMP = "spec.dump"
ROOTFS_DIFF = "rootfs-diff.tar"
DELETED_FILES = "deleted.files"
DUMP_LOG = "dump.log"
MANIFEST = "vmpod-manifest.json"
FORMAT = "vmpod-forensics/1"
MAX_MANIFEST = 4 << 20  # bytes
MAX_MEMBERS = 100_000
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Manifest:
    """Chain of custody: what was captured, where, when, with what, and the digests."""

    files: dict[str, str]  # archive path -> SHA-256 (hex) of every file but the manifest
    captured: str  # RFC 3339, UTC
    host: str
    host_kernel: str
    guest_kernel: str
    criu: str
    runc: str
    vmpod: str
    command_line: tuple[str, ...]
    container: dict[str, str]  # id, name, image, image_digest
    leave_running: bool
    format: str = FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise ForensicsError(f"{MANIFEST} is not valid JSON: {err}") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ForensicsError(f"{MANIFEST} is not a {FORMAT} manifest")
        files, container = obj.get("files"), obj.get("container")
        if not (_str_map(files) and _str_map(container)):
            raise ForensicsError(f"{MANIFEST}: 'files' and 'container' must map strings to strings")
        strs = ("captured", "host", "host_kernel", "guest_kernel", "criu", "runc", "vmpod")
        if not all(isinstance(obj.get(k), str) for k in strs) or not isinstance(
            obj.get("leave_running"), bool
        ):
            raise ForensicsError(f"{MANIFEST}: a field is missing or of the wrong type")
        cmd = obj.get("command_line")
        if not isinstance(cmd, list) or not all(isinstance(a, str) for a in cmd):
            raise ForensicsError(f"{MANIFEST}: 'command_line' must be a list of strings")
        return cls(
            files=dict(files),
            container=dict(container),
            command_line=tuple(cmd),
            leave_running=obj["leave_running"],
            **{k: obj[k] for k in strs},
        )


def _str_map(value: object) -> TypeGuard[dict[str, str]]:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def sha256_file(fh: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := fh.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def check_tree(root: Path, max_bytes: int, what: str) -> int:
    """Refuse a tree a guest wrote unless it holds only directories and regular
    files of plain names, at most ``max_bytes`` in all; returns the total size."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise ForensicsError(f"{what}: {path.relative_to(root)} is not a regular file or directory")
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
                if total > max_bytes:
                    raise ForensicsError(
                        f"{what} exceeds {max_bytes} bytes", hint="raise the limit with --max-size"
                    )
    return total


def digest_tree(root: Path) -> dict[str, str]:
    """SHA-256 of every regular file below ``root``, by relative POSIX path."""
    out = {}
    for path in sorted(_files(root)):
        with open(path, "rb") as fh:
            out[path.relative_to(root).as_posix()] = sha256_file(fh)
    return out


def _files(root: Path) -> Iterator[Path]:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                yield path


def write_archive(stage: Path, out: Path, manifest: Manifest) -> None:
    """Tar ``stage`` (sorted, numeric owners) with the manifest last, atomically to ``out``."""
    with atomic_writer(out) as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(stage.rglob("*")):
            tar.add(path, arcname=path.relative_to(stage).as_posix(), recursive=False)
        info = tarfile.TarInfo(MANIFEST)
        data = manifest.to_json()
        info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
        tar.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class Verdict:
    """What ``verify`` found: files whose digest changed, that are missing, or that
    the manifest does not list (including members that are not regular files)."""

    manifest: Manifest
    changed: tuple[str, ...]
    missing: tuple[str, ...]
    added: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.added)


def member_name(info: tarfile.TarInfo) -> str:
    """The normalised relative name of a member; ForensicsError if it could escape."""
    name = info.name
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or ".." in parts or "\0" in name:
        raise ForensicsError(f"archive member {name!r} is not a plain relative path")
    return PurePosixPath(*parts).as_posix() if parts else "."


def new_output(path: Path) -> Path:
    """``path`` made absolute, once sure it names a new file in an existing directory
    (an archive or dump is never written over anything)."""
    out = path.absolute()
    if out.exists() or out.is_symlink():
        raise ConfigError(f"{out} exists", hint="name a new file with -o")
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent} is not a directory", hint="name a file in an existing directory")
    return out


def plain_tar(archive: Path, scratch: Path, max_bytes: int) -> Path:
    """``archive`` itself if it is an uncompressed tar, else its gzip or zstd
    decompression into ``scratch`` (at most ``max_bytes``)."""
    try:
        with open(archive, "rb") as fh:
            magic = fh.read(4)
    except OSError as err:
        raise ForensicsError(f"cannot read {archive}: {err.strerror or err}") from None
    if magic[:2] != b"\x1f\x8b" and magic != b"\x28\xb5\x2f\xfd":
        return archive
    out = scratch / "archive.tar"
    try:
        raw = open(archive, "rb")  # noqa: SIM115 - closed by the with below
        reader = LayerReader(raw, LayerBlob(archive.name), str(archive))
        with raw, reader as src, open(out, "wb") as dest:
            total = 0
            while chunk := src.read(_CHUNK):
                total += len(chunk)
                if total > max_bytes:
                    raise ForensicsError(f"{archive} decompresses to more than {max_bytes} bytes")
                dest.write(chunk)
            reader.verify()  # zstd's exit status
    except ImageError as err:
        raise ForensicsError(f"cannot decompress {archive}: {err.message}") from None
    except (OSError, EOFError, zlib.error) as err:
        raise ForensicsError(f"cannot decompress {archive}: {err}") from None
    return out


def scan(archive: Path, *, need_manifest: bool = True) -> tuple[Manifest | None, dict[str, str], list[str]]:
    """(manifest, digest of every regular member, names of other non-directory members)."""
    digests: dict[str, str] = {}
    odd: list[str] = []
    manifest: Manifest | None = None
    try:
        with tarfile.open(archive, "r:") as tar:
            for count, info in enumerate(tar):
                if count > MAX_MEMBERS:
                    raise ForensicsError(f"{archive} has more than {MAX_MEMBERS} members")
                name = member_name(info)
                if info.isdir():
                    continue
                fh = tar.extractfile(info) if info.isreg() else None
                if fh is None:
                    odd.append(name)
                elif name == MANIFEST:
                    if info.size > MAX_MANIFEST:
                        raise ForensicsError(f"{MANIFEST} is larger than {MAX_MANIFEST} bytes")
                    manifest = Manifest.from_json(fh.read())
                elif name in digests:
                    odd.append(name)  # a second copy: extraction would take the last one
                else:
                    digests[name] = sha256_file(fh)
    except (tarfile.TarError, EOFError) as err:
        raise ForensicsError(f"{archive} is not a readable tar archive: {err}") from err
    except OSError as err:
        raise ForensicsError(f"cannot read {archive}: {err.strerror or err}") from err
    if manifest is None and need_manifest:
        raise ForensicsError(
            f"{archive} has no {MANIFEST}: it is not a vmpod evidence archive, so it carries no digests"
        )
    return manifest, digests, odd


def verify(archive: Path) -> Verdict:
    """Recompute every digest and compare with the manifest."""
    manifest, digests, odd = scan(archive)
    assert manifest is not None
    return _verdict(manifest, digests, odd)


def _verdict(manifest: Manifest, digests: dict[str, str], odd: list[str]) -> Verdict:
    want = manifest.files
    changed = sorted(n for n in want if n in digests and digests[n] != want[n])
    missing = sorted(n for n in want if n not in digests)
    added = sorted({*(n for n in digests if n not in want), *odd})
    return Verdict(manifest, tuple(changed), tuple(missing), tuple(added))


def extract(archive: Path, dest: Path, max_bytes: int) -> Manifest | None:
    """Verify ``archive`` (an uncompressed tar), then unpack its directories and
    regular files into the empty directory ``dest`` (nothing else; ``max_bytes``
    in all). An archive without a manifest (podman's, Kubernetes') cannot be
    verified: it is unpacked if every member is plain, and None is returned."""
    manifest, digests, odd = scan(archive, need_manifest=False)
    if manifest is None:
        if odd:
            raise ForensicsError(f"{archive} has members that are not regular files: {', '.join(odd[:5])}")
    else:
        verdict = _verdict(manifest, digests, odd)
        if not verdict.ok:
            raise ForensicsError(f"{archive} fails verification: {describe(verdict)}")
    total = 0
    with tarfile.open(archive, "r:") as tar:
        for info in tar:
            name = member_name(info)
            if name in (".", MANIFEST):
                continue
            target = dest.joinpath(*PurePosixPath(name).parts)
            if info.isdir():
                target.mkdir(parents=True, exist_ok=True, mode=0o700)
                continue
            total += info.size
            if total > max_bytes:
                raise ForensicsError(f"{archive} unpacks to more than {max_bytes} bytes")
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            src = tar.extractfile(info)
            assert src is not None  # verify admitted regular files only
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
    return manifest


def describe(v: Verdict) -> str:
    parts = [f"changed: {', '.join(v.changed)}"] if v.changed else []
    parts += [f"missing: {', '.join(v.missing)}"] if v.missing else []
    parts += [f"not in the manifest: {', '.join(v.added)}"] if v.added else []
    return "; ".join(parts) or "intact"
