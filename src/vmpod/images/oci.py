"""The OCI image document model: media types, descriptors, manifests, indexes, configs.

Parsing only, no I/O: the layout readers (``layout.py``), the registry client
(``registry.py``) and the image store (``store.py``) all validate the documents
they read here, so every image reaches the unpacker checked the same way.
Docker's v2 schema 2 types are accepted alongside the OCI ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vmpod.errors import ImageError
from vmpod.images.blobs import check_digest_format, parse_json
from vmpod.images.source import ImageConfig

PLATFORM = ("linux", "amd64")  # the guests vmpod boots
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPES = frozenset({OCI_INDEX, "application/vnd.docker.distribution.manifest.list.v2+json"})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"})
LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
REF_NAME = "org.opencontainers.image.ref.name"
NAME_ANNOTATIONS = (REF_NAME, "io.containerd.image.name")  # what names an image in an index


@dataclass(frozen=True)
class Descriptor:
    """A reference to a blob: what it is, its digest and size, and a few annotations."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str]
    platform: tuple[str, ...]  # (os, architecture[, variant]) or ()


def parse_descriptor(obj: Any, where: str) -> Descriptor:
    """A descriptor object; its digest and size are checked, since both bound a download."""
    if not isinstance(obj, dict):
        raise ImageError(f"{where}: descriptor is not a JSON object")
    digest = check_digest_format(obj.get("digest", ""), where)
    size = obj.get("size", -1)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{where}: descriptor {digest} has invalid size {size!r}")
    annotations = obj.get("annotations") or {}
    platform = obj.get("platform") or {}
    if not isinstance(annotations, dict) or not isinstance(platform, dict):
        raise ImageError(f"{where}: descriptor {digest} has malformed annotations or platform")
    plat = tuple(str(platform[k]) for k in ("os", "architecture", "variant") if platform.get(k))
    return Descriptor(
        media_type=str(obj.get("mediaType", "")),
        digest=digest,
        size=size,
        annotations={str(k): str(v) for k, v in annotations.items()},
        platform=plat,
    )


def index_descriptors(doc: Any, where: str) -> list[Descriptor]:
    """The ``manifests`` of an image index (or of a layout's index.json)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
        raise ImageError(f"{where} has no manifests list", hint="the image is malformed")
    return [parse_descriptor(item, where) for item in doc["manifests"]]


def pick_platform(descriptors: list[Descriptor], where: str) -> Descriptor:
    """The entry for the guests' platform (PLATFORM) among per-platform manifests."""
    for desc in descriptors:
        if desc.platform[:2] == PLATFORM:
            return desc
    found = ", ".join("/".join(d.platform) or "unknown" for d in descriptors) or "none"
    raise ImageError(
        f"{where} has no {'/'.join(PLATFORM)} image (available: {found})",
        hint=f"vmpod runs {'/'.join(PLATFORM)} guests; export that platform",
    )


def manifest_blobs(doc: dict[str, Any], where: str) -> tuple[Descriptor, list[Descriptor]]:
    """(config, layers) of an image manifest, checked before any layer is read or fetched.

    A layer must have a media type vmpod can unpack; one without a media type is
    let through (its compression is sniffed when it is read).
    """
    config = parse_descriptor(doc.get("config"), f"config descriptor in {where}")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageError(f"{where} has no layers list")
    layers = [parse_descriptor(d, f"layer descriptor in {where}") for d in raw_layers]
    for layer in layers:
        if layer.media_type:
            check_layer_type(layer, where)
    return config, layers


def check_layer_type(layer: Descriptor, where: str) -> None:
    """Refuse a layer whose media type the unpacker does not know (e.g. encrypted)."""
    if layer.media_type not in LAYER_TYPES:
        raise ImageError(
            f"layer {layer.digest} in {where} has unsupported media type {layer.media_type!r}",
            hint="only plain, gzip and zstd tar layers can be unpacked (not encrypted ones)",
        )


def diff_ids(config_doc: Any, count: int, where: str) -> list[str]:
    """The config's ``rootfs.diff_ids`` (one per layer), or [] when it has none."""
    rootfs = config_doc.get("rootfs") if isinstance(config_doc, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if ids is None:
        return []
    if not isinstance(ids, list) or len(ids) != count:
        raise ImageError(
            f"image config in {where} lists {len(ids) if isinstance(ids, list) else 0}"
            f" diff_ids for {count} layers",
            hint="the image is malformed",
        )
    return [check_digest_format(i, f"diff_id in {where}") for i in ids]


def parse_config(doc: Any, where: str) -> ImageConfig:
    """ImageConfig from an OCI/docker image config document."""
    cfg = doc.get("config") if isinstance(doc, dict) else None
    if cfg is None:
        return ImageConfig()
    if not isinstance(cfg, dict):
        raise ImageError(f"image config in {where}: 'config' is not an object")

    def strings(key: str) -> tuple[str, ...]:
        value = cfg.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ImageError(f"image config in {where}: {key} is not a list of strings")
        return tuple(value)

    def string(key: str) -> str:
        value = cfg.get(key) or ""
        if not isinstance(value, str):
            raise ImageError(f"image config in {where}: {key} is not a string")
        return value

    return ImageConfig(
        env=strings("Env"),
        entrypoint=strings("Entrypoint"),
        cmd=strings("Cmd"),
        working_dir=string("WorkingDir"),
        user=string("User"),
    )


# -- manifests as fetched ----------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """A manifest body as fetched, checked against the digest it was asked or announced by."""

    digest: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Manifest:
    """A fetched, verified image manifest or index and its media type."""

    digest: str
    media_type: str
    data: bytes
    doc: dict[str, Any]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


def parse_manifest(fetched: Document, where: str) -> Manifest:
    """Classify a fetched manifest body; refuses what vmpod cannot pull."""
    doc = parse_json(fetched.data, where)
    if not isinstance(doc, dict):
        raise ImageError(f"{where} is not a JSON object")
    if doc.get("schemaVersion") == 1:
        raise ImageError(
            f"{where} is a docker schema 1 manifest, which is not supported",
            hint="push the image again with a current client",
        )
    # OCI makes mediaType optional in the body; then the header or the shape says.
    media = str(doc.get("mediaType") or "")
    if not media and fetched.content_type in INDEX_TYPES | MANIFEST_TYPES:
        media = fetched.content_type
    elif not media:
        media = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media not in INDEX_TYPES | MANIFEST_TYPES:
        raise ImageError(
            f"{where} has unsupported media type {media!r}",
            hint="expected an OCI or docker v2 image manifest or index",
        )
    return Manifest(fetched.digest, media, fetched.data, doc)
