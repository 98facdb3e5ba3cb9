"""Layer blob streams: decompression (gzip, zstd, plain tar) with digest checks.

Digests are computed while the layer is unpacked (one read, no window between
checking and using the bytes) and compared once the stream is drained, so a
corrupt layer is reported after its entries were written: callers discard the
destination on error (``ImageSource.unpack`` does).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import IO, TYPE_CHECKING, Protocol

from vmpod.errors import ImageError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20


class Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


@dataclass(frozen=True)
class LayerBlob:
    """Where one layer lives and what it must hash to.

    ``digest`` is the stored (possibly compressed) blob's digest, ``diff_id`` the
    uncompressed tar's; either may be "" when the image format does not say.
    ``location`` is a path inside the layout directory or archive.
    """

    location: str
    media_type: str = ""
    digest: str = ""
    size: int = -1
    diff_id: str = ""


class HashingReader(io.RawIOBase):
    """Pass-through reader that hashes and counts every byte read."""

    def __init__(self, raw: Readable, algorithm: str = "sha256") -> None:
        super().__init__()
        self._raw = raw
        self.algorithm = algorithm
        self.hash = hashlib.new(algorithm)
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self._raw.read(len(view))
        n = len(data)
        view[:n] = data
        self.hash.update(data)
        self.size += n
        return n

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    def digest(self) -> str:
        return f"{self.algorithm}:{self.hash.hexdigest()}"


def _algorithm(digest: str) -> str:
    return digest.partition(":")[0] if digest else "sha256"


class LayerReader:
    """Context manager giving the uncompressed tar stream of one layer blob.

    Call :meth:`verify` after the tar was read (inside the ``with``); it
    drains the rest of the stream and checks size, digest and diff_id.
    """

    def __init__(self, raw: IO[bytes], blob: LayerBlob, label: str) -> None:
        self._raw = raw
        self._blob = blob
        self._label = label
        self._proc: subprocess.Popen[bytes] | None = None
        self._feeder: threading.Thread | None = None
        self._feed_error: BaseException | None = None
        self._stderr: IO[bytes] | None = None

    def __enter__(self) -> HashingReader:
        self._packed = HashingReader(self._raw, _algorithm(self._blob.digest))
        self._buffered = io.BufferedReader(self._packed, _CHUNK)
        # Sniff the compression: docker archives carry no media types, and some
        # images label uncompressed layers as gzip.
        magic = self._buffered.peek(4)[:4]
        source: Readable
        if self._blob.media_type.endswith("zstd") or magic.startswith(_ZSTD_MAGIC):
            source = self._start_zstd()
        elif magic.startswith(_GZIP_MAGIC):
            source = gzip.GzipFile(fileobj=self._buffered, mode="rb")
        else:
            source = self._buffered
        self._tar = HashingReader(source, _algorithm(self._blob.diff_id))
        return self._tar

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
        if self._feeder is not None:
            self._feeder.join()
        if self._stderr is not None:
            self._stderr.close()

    def _start_zstd(self) -> Readable:
        exe = shutil.which("zstd")
        if exe is None:
            raise ImageError(
                f"{self._label} is zstd-compressed but the 'zstd' tool is not installed",
                hint="install it, e.g. apt-get install zstd",
            )
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        self._proc = subprocess.Popen(
            [exe, "-d", "-c", "-q"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._feeder = threading.Thread(target=self._feed, args=(self._proc.stdin,), daemon=True)
        self._feeder.start()
        return self._proc.stdout

    def _feed(self, sink: IO[bytes]) -> None:
        try:
            shutil.copyfileobj(self._buffered, sink, _CHUNK)
        except BrokenPipeError:
            pass  # zstd exited early; its exit status says why
        except (OSError, EOFError, ValueError) as err:  # re-raised by verify() in the caller
            self._feed_error = err
        finally:
            try:
                sink.close()
            except OSError:
                pass

    def verify(self) -> None:
        self._tar.drain()
        if self._proc is not None and self._feeder is not None:
            self._feeder.join()
            if self._proc.wait() != 0:
                assert self._stderr is not None
                self._stderr.seek(0)
                tail = self._stderr.read()[-500:].decode(errors="replace").strip()
                raise ImageError(
                    f"{self._label}: zstd failed (exit {self._proc.returncode}): {tail}",
                    hint="the layer is corrupt; re-export the image",
                )
        if self._feed_error is not None:
            raise ImageError(f"{self._label}: cannot read layer: {self._feed_error}") from self._feed_error
        while self._buffered.read(_CHUNK):  # trailing bytes still count towards the digest
            pass
        blob = self._blob
        hint = "the image is corrupt or was modified; re-export it"
        if blob.size >= 0 and self._packed.size != blob.size:
            raise ImageError(
                f"{self._label}: size {self._packed.size} does not match descriptor size {blob.size}",
                hint=hint,
            )
        if blob.digest and self._packed.digest() != blob.digest:
            raise ImageError(
                f"{self._label}: digest mismatch (expected {blob.digest}, got {self._packed.digest()})",
                hint=hint,
            )
        if blob.diff_id and self._tar.digest() != blob.diff_id:
            raise ImageError(
                f"{self._label}: uncompressed digest mismatch (expected diff_id "
                f"{blob.diff_id}, got {self._tar.digest()})",
                hint=hint,
            )
