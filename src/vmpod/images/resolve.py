"""resolve_image: find an image by reference and read its manifest and config.

References: ``DIR[:TAG]`` / ``oci:DIR[:TAG]`` (OCI image layout),
``FILE[:TAG]`` / ``oci-archive:FILE[:TAG]`` / ``docker-archive:FILE[:TAG]``
(tar archives, read in place). The shortest prefix of the reference that
exists on disk is the path and the rest after ':' is the tag, so
``img.tar:busybox:latest`` selects RepoTag ``busybox:latest``. A plain
directory that is not an OCI layout is refused: use ``resolve_rootfs``.

Registry references (``docker://REF``, or ``REGISTRY/NAME:TAG``-like text
with a '/', ':' or '@' that is no existing path) come from the local image
store (``images/store.py``), pulled on first use like ``podman run`` does.

This module is the top of the images package: it picks a reader
(``layout.py``) or the store, and nothing below imports it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vmpod.errors import ImageError
from vmpod.guest.progress import Progress
from vmpod.images.blobs import BlobStore, DirStore, TarStore
from vmpod.images.layout import read_docker, read_oci
from vmpod.images.reference import DEFAULT_REGISTRY, parse_reference
from vmpod.images.source import ImageSource
from vmpod.paths import Paths, default_paths

log = logging.getLogger(__name__)

_TRANSPORTS = {"oci": "oci-layout", "oci-archive": "oci-archive", "docker-archive": "docker-archive"}


def resolve_image(ref: str, *, paths: Paths | None = None, progress: Progress | None = None) -> ImageSource:
    """Resolve an image reference (see module docstring) without unpacking it.

    ``paths`` locates the image store (default: ``default_paths()``);
    ``progress`` hears about on-demand pulls (default: the INFO log).
    """
    remote = registry_reference(ref)
    if remote is not None:
        return _from_registry(ref, remote, paths or default_paths(), progress or log.info)
    transport, rest = _split_transport(ref)
    path, tag = _split_tag(rest, ref)
    if path.is_dir():
        if transport not in (None, "oci-layout"):
            raise ImageError(
                f"image {ref!r}: {path} is a directory, not a {transport}",
                hint="use oci:DIR for an OCI layout directory",
            )
        if not (path / "oci-layout").is_file() or not (path / "index.json").is_file():
            raise ImageError(
                f"image {ref!r}: {path} is a directory but not an OCI layout (no oci-layout and index.json)",
                hint="use --rootfs DIR for a root filesystem directory",
            )
        with DirStore(path) as store:
            return read_oci(ref, "oci-layout", store, tag)
    if transport == "oci-layout":
        raise ImageError(
            f"image {ref!r}: {path} is not an OCI layout directory",
            hint="use oci-archive:FILE for an OCI archive",
        )
    if not path.is_file():  # a fifo or device would block or never end
        raise ImageError(
            f"image {ref!r}: {path} is not a regular file or directory",
            hint="pass an OCI layout directory or an image archive",
        )
    with TarStore(path) as store:
        kind = transport or _archive_kind(store, ref)
        if kind == "oci-archive":
            return read_oci(ref, kind, store, tag)
        return read_docker(ref, store, tag)


def registry_reference(ref: str) -> str | None:
    """The registry reference ``ref`` names, or None when it names a local image."""
    if ref.startswith("docker://"):
        return ref.removeprefix("docker://")
    if _split_transport(ref)[0] is not None or not any(c in ref for c in "/:@"):
        return None
    if os.path.exists(ref) or any(c == ":" and os.path.exists(ref[:i]) for i, c in enumerate(ref)):
        return None
    if ref.rpartition("/")[2].partition(":")[0].endswith((".tar", ".tgz", ".tar.gz")):
        return None  # a mistyped archive name: say "not found", do not go online
    try:
        parse_reference(ref)
    except ImageError:
        return None
    return ref


def _from_registry(ref: str, remote: str, paths: Paths, progress: Progress) -> ImageSource:
    # Imported here for start-up time only: runs of local images never need the store
    # or the registry client.
    from vmpod.images.registry import env_creds
    from vmpod.images.store import ImageStore, PullOptions, pull

    try:
        name = str(parse_reference(remote))
        store = ImageStore(paths.images)
        if store.lookup(name) is None:
            # REGISTRY_AUTH only for the registry it names (a reference may name any)
            creds = env_creds(parse_reference(remote).registry)
            pull(paths, remote, PullOptions(creds=creds), progress)
        return store.source(name, remote)
    except ImageError as err:
        if parse_reference(remote).registry != DEFAULT_REGISTRY:
            raise
        # A mistyped local path parses as a docker.io name too: mention both readings.
        local = "for a local image give its path, or use --rootfs DIR for a rootfs directory"
        raise ImageError(
            f"image {ref!r} not found: not a local image, and pulling it from "
            f"{DEFAULT_REGISTRY} failed: {err.message}",
            hint="; ".join(filter(None, (err.hint, local))),
        ) from err


def _split_transport(ref: str) -> tuple[str | None, str]:
    for prefix, kind in _TRANSPORTS.items():
        if ref.startswith(prefix + ":"):
            return kind, ref[len(prefix) + 1 :]
    return None, ref


def _split_tag(rest: str, ref: str) -> tuple[Path, str]:
    if rest and os.path.exists(rest):
        return Path(rest), ""
    for i, char in enumerate(rest):
        if char == ":" and i and os.path.exists(rest[:i]):
            return Path(rest[:i]), rest[i + 1 :]
    raise ImageError(
        f"image {ref!r} not found: not a directory, OCI layout or image archive",
        hint="use --rootfs DIR for a root filesystem directory",
    )


def _archive_kind(store: BlobStore, ref: str) -> str:
    # Docker >= 25 writes both files; the OCI index carries real digests, so prefer it.
    if store.exists("index.json"):
        return "oci-archive"
    if store.exists("manifest.json"):
        return "docker-archive"
    raise ImageError(
        f"image {ref!r}: {store.path} is neither an OCI archive nor a docker archive "
        "(no index.json or manifest.json)",
        hint="create it with 'skopeo copy ... oci-archive:FILE' or 'docker save'",
    )
