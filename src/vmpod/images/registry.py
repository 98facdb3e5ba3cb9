"""OCI distribution registry client on skopeo: manifests, configs and verified blobs.

skopeo does the network part (auth dance, redirects, per-registry auth.json,
policy.json; registries.conf mirrors serve layer copies only, since
``skopeo inspect`` asks the registry itself for manifests); vmpod
keeps its own checks on everything that lands: documents are size-capped
while skopeo's output is read, every manifest and config is verified against
the digest it was asked by, and every layer is streamed through a digest and
size check before it reaches the store. Limits no tool sets for us are set
here: an overall pull deadline (``VMPOD_PULL_TIMEOUT``), the declared size of
an image against ``VMPOD_MAX_IMAGE_BYTES`` and the free space, and what skopeo
may write for one layer (its declared size).

Plain HTTP (``--src-tls-verify=false``) is used for loopback registries and
with ``insecure``; everything else is HTTPS verified against the system CAs.
Credentials are written to a private auth file naming only the reference's
registry, so skopeo offers them to nobody else.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from vmpod.errors import ConfigError, ImageError
from vmpod.fsutil import owned_tmpdir
from vmpod.images.blobs import MAX_JSON_BYTES, blob_location, parse_json, verify_bytes
from vmpod.images.layers import max_image_bytes
from vmpod.images.oci import Descriptor, Document, manifest_blobs
from vmpod.images.reference import Reference, is_registry_name
from vmpod.images.skopeo import (
    Access,
    Deadline,
    SkopeoTimeout,
    Watcher,
    bytes_read,
    explain,
    pull_timeout,
    run_skopeo,
    write_authfile,
)

_CHUNK = 1 << 20
_SLACK = 64 << 20  # free space kept beyond what a layer declares
_READ_SLACK = 16 << 20  # skopeo's own reads (config files, certificates) besides the blob
AUTH_ENV = "REGISTRY_AUTH"


def is_loopback(registry: str) -> bool:
    """True for localhost / 127.0.0.0/8 / ::1 (with or without a port)."""
    host = urllib.parse.urlsplit(f"//{registry}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def env_creds(registry: str) -> tuple[str, str] | None:
    """Credentials from ``REGISTRY_AUTH=REGISTRY=USER:PASSWORD`` if they are for ``registry``.

    Unscoped ``USER:PASSWORD`` is refused: it would go to whichever registry a
    reference (or a redirect) names.
    """
    value = os.environ.get(AUTH_ENV, "")
    if not value:
        return None
    scope, sep, creds = value.partition("=")
    user, colon, password = creds.partition(":")
    if not sep or not colon or not user or not is_registry_name(scope):
        raise ConfigError(
            f"{AUTH_ENV} must name the registry it is for",
            hint=f"set {AUTH_ENV}=REGISTRY=USER:PASSWORD, e.g. reg.example:5000=alice:secret",
        )
    return (user, password) if scope == registry else None


def copy_verified(src: IO[bytes], dst: IO[bytes], digest: str, size: int, where: str) -> int:
    """Stream ``src`` to ``dst``, refusing more than ``size`` bytes or a wrong digest."""
    algorithm = digest.partition(":")[0]
    hasher, total = hashlib.new(algorithm), 0
    hint = "the registry sent corrupt data; retry, or check the registry's storage"
    while chunk := src.read(min(_CHUNK, size + 1 - total)):
        total += len(chunk)
        if total > size:
            raise ImageError(f"{where}: more data than its descriptor size {size}", hint=hint)
        hasher.update(chunk)
        try:
            dst.write(chunk)
        except OSError as err:  # a local failure (disk full), not the registry's
            raise ImageError(
                f"cannot store {where}: {err.strerror or err}", hint="free some space in the image store"
            ) from err
    if total != size:
        raise ImageError(f"{where}: got {total} bytes, descriptor size is {size}", hint=hint)
    actual = f"{algorithm}:{hasher.hexdigest()}"
    if actual != digest:
        raise ImageError(f"{where}: digest mismatch (expected {digest}, got {actual})", hint=hint)
    return total


class RegistryClient:
    """Reads one repository of one registry through skopeo, under one pull deadline.

    ``timeout`` bounds each document fetch (manifest, config); the whole pull,
    layers included, is bounded by ``VMPOD_PULL_TIMEOUT`` from construction on.
    ``work_dir`` holds skopeo's temporary layouts (default: the system temp
    dir); on the store's file system a killed pull's leftovers are collected.
    """

    def __init__(
        self,
        ref: Reference,
        *,
        insecure: bool = False,
        creds: tuple[str, str] | None = None,
        timeout: float = 30.0,
        work_dir: Path | None = None,
    ) -> None:
        self.ref = ref
        self.timeout = timeout
        self.deadline = Deadline(pull_timeout())
        self.access = Access(
            ref.registry, tls_verify=not (insecure or is_loopback(ref.registry)), creds=creds
        )
        self._work_dir = work_dir or Path(tempfile.gettempdir()) / f"vmpod-pull-{os.getuid()}"
        # manifest digest -> (config, layers), for the manifests fetched so far
        self._manifests: dict[str, tuple[Descriptor, list[Descriptor]]] = {}

    # -- documents ---------------------------------------------------------------

    def manifest(self, reference: str, *, digest: str = "", size: int = -1) -> Document:
        """Fetch a manifest by tag or digest; by digest it must match (and ``size``)."""
        label = f"{self.ref.name}@{reference}" if ":" in reference else f"{self.ref.name}:{reference}"
        where = f"manifest of {label}"
        data = self._document(["inspect", "--raw"], reference, where, label, kind="manifest")
        if digest:
            verify_bytes(data, digest, size, where)
        # The digest is always the content's own: a registry's Docker-Content-Digest is never trusted.
        actual = digest or f"sha256:{hashlib.sha256(data).hexdigest()}"
        doc = parse_json(data, where)
        media = str(doc.get("mediaType") or "") if isinstance(doc, dict) else ""
        if isinstance(doc, dict) and "layers" in doc and "config" in doc:
            config, layers = manifest_blobs(doc, f"manifest {actual} of {self.ref.name}")
            self._check_declared(config, layers, label)
            self._manifests[actual] = (config, layers)
        return Document(actual, media, data)

    def blob_bytes(self, blob: Descriptor) -> bytes:
        """A small blob (the image config), verified and size-limited."""
        where = f"blob {blob.digest} of {self.ref.name}"
        if blob.size > MAX_JSON_BYTES:
            raise ImageError(
                f"{where} is larger than {MAX_JSON_BYTES} bytes",
                hint="this does not look like an image config",
            )
        manifest = next((d for d, (config, _) in self._manifests.items() if config == blob), "")
        if not manifest:
            raise ImageError(f"{where}: fetch its manifest first")
        data = self._document(
            ["inspect", "--raw", "--config"], manifest, where, f"{self.ref.name}@{blob.digest}", kind="blob"
        )
        verify_bytes(data, blob.digest, blob.size, where)
        return data

    def _document(self, args: list[str], reference: str, where: str, label: str, *, kind: str) -> bytes:
        # The registry as the user wrote it (docker.io, not its API host): registries.conf
        # mirrors and auth.json entries are keyed by it.
        sep = "@" if ":" in reference else ":"
        image = f"docker://{self.ref.registry}/{self.ref.repository}{sep}{reference}"

        def too_big() -> ImageError:
            return ImageError(
                f"{where} is larger than {MAX_JSON_BYTES} bytes",
                hint="this does not look like an image document",
            )

        with self._auth_args("--authfile") as auth:
            return self._run(
                [
                    *args,
                    "--retry-times=0",
                    f"--tls-verify={str(self.access.tls_verify).lower()}",
                    *auth,
                    image,
                ],
                timeout=min(self.timeout, self.deadline.left()),
                limit=MAX_JSON_BYTES,
                too_much=too_big,
                label=label,
                kind=kind,
            )

    # -- layers ------------------------------------------------------------------

    def download(self, blob: Descriptor, dst: IO[bytes]) -> int:
        """Copy a layer with skopeo and stream it into ``dst``, verifying size and digest."""
        where = f"blob {blob.digest} of {self.ref.name}"
        manifest = next((d for d, (_, layers) in self._manifests.items() if blob in layers), "")
        if not manifest:
            raise ImageError(f"{where}: not a layer of a fetched manifest")
        _check_space(dst, blob.size, where)
        with owned_tmpdir(self._work_dir, ".pull-") as tmp:
            _check_space_at(tmp, blob.size, where)
            layout = tmp / "layout"
            # Every other blob is stubbed, so skopeo skips it ("already exists") and
            # fetches only this one; the store already has, or gets, the others.
            for other in self._manifests[manifest][1]:
                if other.digest != blob.digest:
                    stub = layout / blob_location(other.digest)
                    stub.parent.mkdir(parents=True, exist_ok=True)
                    stub.touch()
            # the layer, its config and the manifest, what skopeo reads of its own files
            limit = blob.size + 2 * MAX_JSON_BYTES + _READ_SLACK

            def watch(pid: int) -> None:
                # What skopeo reads bounds the network, what it writes the disk (it may
                # recompress, so both are checked).
                if bytes_read(pid) > limit or _tree_bytes(layout) > limit:
                    raise ImageError(
                        f"{where}: the registry sends more than its declared size {blob.size}",
                        hint="the registry or the manifest is corrupt",
                    )

            image = f"docker://{self.ref.registry}/{self.ref.repository}@{manifest}"
            with self._auth_args("--src-authfile") as auth:
                self._run(
                    [
                        "copy",
                        "--retry-times=0",
                        f"--src-tls-verify={str(self.access.tls_verify).lower()}",
                        *auth,
                        image,
                        f"oci:{layout}:pull",
                    ],
                    timeout=self.deadline.left(),
                    limit=1 << 20,
                    too_much=lambda: ImageError(f"{where}: skopeo wrote too much output"),
                    label=f"{self.ref.name}@{blob.digest}",
                    kind="blob",
                    watch=watch,
                )
            try:
                src = open(layout / blob_location(blob.digest), "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                raise ImageError(f"{where}: skopeo did not store it", hint="retry the pull") from None
            with src:
                return copy_verified(src, dst, blob.digest, blob.size, where)

    # -- plumbing ------------------------------------------------------------------

    def _check_declared(self, config: Descriptor, layers: list[Descriptor], label: str) -> None:
        cap = max_image_bytes()
        total = config.size + sum(layer.size for layer in layers)
        if total > cap:
            raise ImageError(
                f"{label}: the manifest declares {total} bytes of blobs, more than the {cap}-byte limit",
                hint="set VMPOD_MAX_IMAGE_BYTES to allow larger images",
            )

    @contextmanager
    def _auth_args(self, flag: str) -> Iterator[list[str]]:
        """``FLAG=auth.json`` naming only our registry, removed afterwards (even after
        a SIGKILL: owned temp dirs are collected by the next pull)."""
        if self.access.creds is None:
            yield []  # skopeo's own per-registry auth.json / docker config apply
            return
        with owned_tmpdir(self._work_dir, ".auth-") as private:
            path = private / "auth.json"
            write_authfile(path, self.access)
            yield [f"{flag}={path}"]

    def _run(
        self,
        args: list[str],
        *,
        timeout: float,
        limit: int,
        too_much: Callable[[], ImageError],
        label: str,
        kind: str,
        watch: Watcher | None = None,
    ) -> bytes:
        host = self.ref.registry
        if self.deadline.left() <= 0:
            raise self._deadline_error()
        try:
            result = run_skopeo(
                args,
                timeout=timeout,
                stdout_limit=limit,
                too_much=too_much,
                watch=watch,
                https_only=self.access.tls_verify,
            )
            # skopeo's own --command-timeout may fire first
            timed_out = result.returncode != 0 and "context deadline exceeded" in result.stderr
        except SkopeoTimeout:
            timed_out = True
        if timed_out:
            if self.deadline.left() <= 1.0:
                raise self._deadline_error() from None
            raise ImageError(
                f"registry {host} did not answer within {timeout:g}s", hint="is it reachable? retry later"
            ) from None
        if result.returncode != 0:
            raise explain(result.stderr, self.ref, label, kind, has_creds=self.access.creds is not None)
        return result.stdout

    def _deadline_error(self) -> ImageError:
        return ImageError(
            f"pull of {self.ref} did not finish within {self.deadline.seconds:g}s",
            hint="the registry is too slow; retry later or raise VMPOD_PULL_TIMEOUT",
        )


def _check_space(dst: IO[bytes], size: int, where: str) -> None:
    try:
        st = os.fstatvfs(dst.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (tests' BytesIO)
        return
    _enough(st.f_bavail * st.f_frsize, size, where)


def _check_space_at(path: Path, size: int, where: str) -> None:
    st = os.statvfs(path)
    _enough(st.f_bavail * st.f_frsize, size, where)


def _enough(free: int, size: int, where: str) -> None:
    if free < size + _SLACK:
        raise ImageError(
            f"{where} declares {size} bytes but only {free} bytes are free",
            hint="free some space and pull again",
        )


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total
