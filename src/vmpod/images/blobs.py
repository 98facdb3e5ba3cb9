"""Blob stores: an OCI layout directory or an image tar archive, read by name.

Archives are never extracted to disk: members are read in place with
``tarfile`` (random access), so resolving an image only reads its small JSON
documents and unpacking streams each layer straight out of the archive.
Every blob is checked against the digest its descriptor names.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from pathlib import Path
from typing import IO, Any, Self

from vmpod import jsonsafe
from vmpod.errors import ImageError

MAX_JSON_BYTES = 4 << 20  # index, manifest and config documents are small; refuse huge ones
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


def check_digest_format(digest: str, where: str) -> str:
    """Return ``digest`` if it is a well-formed sha256/sha512 digest, else raise."""
    # fullmatch: with match, "$" would also accept a trailing newline
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise ImageError(
            f"{where}: invalid or unsupported digest {digest!r}",
            hint="only sha256 and sha512 digests are supported",
        )
    return digest


def blob_location(digest: str) -> str:
    """Path of a blob inside an OCI layout (digest must already be validated)."""
    algorithm, _, hexpart = digest.partition(":")
    return f"blobs/{algorithm}/{hexpart}"


def verify_bytes(data: bytes, digest: str, size: int, where: str) -> None:
    """Raise unless ``data`` has the descriptor's size (``-1``: unknown) and digest."""
    if size >= 0 and len(data) != size:
        raise ImageError(
            f"{where}: size {len(data)} does not match descriptor size {size}",
            hint="the image is corrupt or was modified; re-export it",
        )
    algorithm, _, expected = digest.partition(":")
    actual = hashlib.new(algorithm, data).hexdigest()
    if actual != expected:
        raise ImageError(
            f"{where}: digest mismatch (expected {digest}, got {algorithm}:{actual})",
            hint="the image is corrupt or was modified; re-export it",
        )


def parse_json(data: bytes, where: str) -> Any:
    try:
        return jsonsafe.parse_json(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise ImageError(f"{where} is not valid JSON: {err}") from err


class BlobStore:
    """Named, size-limited access to the files of a layout directory or archive."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self, location: str) -> bool:
        raise NotImplementedError

    def open(self, location: str) -> IO[bytes]:
        """Open a blob for streaming; raises ImageError if it is missing."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the store (the archive file handle)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, location: str, limit: int = MAX_JSON_BYTES) -> bytes:
        with self.open(location) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ImageError(
                f"{location} in {self.path} is larger than {limit} bytes",
                hint="this does not look like an image document",
            )
        return data

    def read_json(self, location: str, *, digest: str = "", size: int = -1) -> Any:
        """Read and parse a JSON document, verifying it when a digest is given."""
        if size > MAX_JSON_BYTES:
            raise ImageError(f"{location} in {self.path} is larger than {MAX_JSON_BYTES} bytes")
        data = self.read(location)
        if digest:
            verify_bytes(data, digest, size, f"{location} in {self.path}")
        return parse_json(data, f"{location} in {self.path}")


class DirStore(BlobStore):
    """An OCI image layout directory; locations are built by us, never taken from JSON."""

    def exists(self, location: str) -> bool:
        return (self.path / location).is_file()

    def open(self, location: str) -> IO[bytes]:
        try:
            return open(self.path / location, "rb")
        except FileNotFoundError as err:
            raise ImageError(
                f"{location} is missing from OCI layout {self.path}",
                hint="the layout is incomplete; copy it again",
            ) from err
        except OSError as err:
            raise ImageError(f"cannot read {self.path / location}: {err.strerror}") from err


class TarStore(BlobStore):
    """An image archive (OCI layout tar or ``docker save`` tar), read in place."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ImageError(
                f"cannot read image archive {path}: {err}",
                hint="expected an OCI archive or a 'docker save' tar",
            ) from err
        # Names are normalised so "./index.json" and "index.json" both match.
        self._members = {_norm(m.name): m for m in self._tar.getmembers()}

    def exists(self, location: str) -> bool:
        member = self._members.get(_norm(location))
        return member is not None and not member.isdir()

    def open(self, location: str) -> IO[bytes]:
        member = self._members.get(_norm(location))
        if member is None:
            raise ImageError(
                f"{location} is missing from image archive {self.path}",
                hint="the archive is incomplete; export it again",
            )
        try:
            # extractfile reads from inside the archive only (links resolve to members).
            f = self._tar.extractfile(member)
        except (tarfile.TarError, KeyError) as err:
            raise ImageError(f"cannot read {location} from {self.path}: {err}") from err
        if f is None:
            raise ImageError(f"{location} in image archive {self.path} is not a regular file")
        return f

    def close(self) -> None:
        self._tar.close()


def _norm(name: str) -> str:
    return os.path.normpath("/" + name).lstrip("/")


def open_store(path: Path, *, archive: bool) -> BlobStore:
    return TarStore(path) if archive else DirStore(path)
