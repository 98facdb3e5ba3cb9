"""Read one image out of a local blob store: an OCI layout or archive, or a docker archive.

``read_oci`` follows ``index.json`` (by tag, then by platform through nested
indexes) to an image manifest; ``read_docker`` reads ``docker save``'s
``manifest.json``. Both return an ImageSource whose layers are read (and
verified) only when it is unpacked. The image store is an OCI layout too, so
it reads its images with ``read_oci``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath
from typing import Any

from vmpod.errors import ImageError
from vmpod.images.blobs import BlobStore, blob_location, parse_json
from vmpod.images.oci import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    NAME_ANNOTATIONS,
    Descriptor,
    check_layer_type,
    diff_ids,
    index_descriptors,
    manifest_blobs,
    parse_config,
    pick_platform,
)
from vmpod.images.source import ImageSource
from vmpod.images.stream import LayerBlob

_MAX_NESTING = 4
_HEX64 = re.compile(r"[0-9a-f]{64}")


# -- OCI layouts and archives ------------------------------------------------


def read_oci(ref: str, kind: str, store: BlobStore, tag: str) -> ImageSource:
    """The image tagged ``tag`` (the only one when "") of an OCI layout or archive.

    ``kind`` is "oci-layout" or "oci-archive"; ``ref`` labels the ImageSource.
    """
    where = f"{'OCI layout' if kind == 'oci-layout' else 'OCI archive'} {store.path}"
    descriptors = index_descriptors(store.read_json("index.json"), f"index.json of {where}")
    matches = descriptors
    if tag:
        matches = [d for d in descriptors if tag in _names(d)]
        if not matches:
            raise ImageError(
                f"tag {tag!r} not in {where} (available: {_available(descriptors)})",
                hint=f"use {store.path}:TAG with an available tag",
            )
    desc = _choose(matches, where, store.path, descriptors)
    manifest_desc, manifest = _load_manifest(store, desc, where, 0)
    config_desc, layers = manifest_blobs(manifest, f"manifest {manifest_desc.digest} in {where}")
    for layer in layers:  # a layout is read as it is: every layer must name its type
        check_layer_type(layer, where)
    config_doc = store.read_json(
        blob_location(config_desc.digest), digest=config_desc.digest, size=config_desc.size
    )
    ids = diff_ids(config_doc, len(layers), where)
    blobs = tuple(
        LayerBlob(
            location=blob_location(d.digest),
            media_type=d.media_type,
            digest=d.digest,
            size=d.size,
            diff_id=ids[i] if ids else "",
        )
        for i, d in enumerate(layers)
    )
    return ImageSource(
        ref=ref,
        kind=kind,
        digest=manifest_desc.digest,
        config=parse_config(config_doc, where),
        _store=store.path.absolute(),
        _layers=blobs,
    )


def _names(desc: Descriptor) -> set[str]:
    return {desc.annotations[key] for key in NAME_ANNOTATIONS if key in desc.annotations}


def _available(descriptors: list[Descriptor]) -> str:
    names = sorted({desc.annotations.get(NAME_ANNOTATIONS[0], "") for desc in descriptors} - {""})
    return ", ".join(names) or "no tagged images"


def _choose(matches: list[Descriptor], where: str, path: Path, descriptors: list[Descriptor]) -> Descriptor:
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ImageError(f"{where} holds no images", hint="the layout is empty; copy an image in")
    if all(d.platform for d in matches):
        return pick_platform(matches, where)  # per-platform manifests listed directly
    raise ImageError(
        f"{where} holds {len(matches)} images (available: {_available(descriptors)})",
        hint=f"pick one with {path}:TAG",
    )


def _load_manifest(
    store: BlobStore, desc: Descriptor, where: str, depth: int
) -> tuple[Descriptor, dict[str, Any]]:
    """Follow image indexes (picking our platform) down to an image manifest."""
    doc = store.read_json(blob_location(desc.digest), digest=desc.digest, size=desc.size)
    if not isinstance(doc, dict):
        raise ImageError(f"manifest {desc.digest} in {where} is not a JSON object")
    media = desc.media_type or str(doc.get("mediaType", ""))
    if media in INDEX_TYPES or (not media and "manifests" in doc):
        if depth >= _MAX_NESTING:
            raise ImageError(f"{where}: image indexes nested more than {_MAX_NESTING} deep")
        chosen = pick_platform(index_descriptors(doc, f"index {desc.digest} in {where}"), where)
        return _load_manifest(store, chosen, where, depth + 1)
    if media in MANIFEST_TYPES or (not media and "layers" in doc):
        return desc, doc
    raise ImageError(
        f"{where}: {desc.digest} has unsupported media type {media!r}",
        hint="expected an OCI or docker v2 image manifest or index",
    )


# -- docker save archives ----------------------------------------------------


def read_docker(ref: str, store: BlobStore, tag: str) -> ImageSource:
    """The image tagged ``tag`` (the only one when "") of a ``docker save`` archive."""
    where = f"docker archive {store.path}"
    entry = _docker_entry(store, tag, where)
    config_loc, layer_locs = entry.get("Config"), entry.get("Layers")
    if (
        not isinstance(config_loc, str)
        or not isinstance(layer_locs, list)
        or not all(isinstance(loc, str) for loc in layer_locs)
    ):
        raise ImageError(f"manifest.json of {where} lacks Config or Layers")
    config_bytes = store.read(config_loc)
    digest = f"sha256:{hashlib.sha256(config_bytes).hexdigest()}"
    # docker names the config after its own digest ("<hex>.json" or "blobs/sha256/<hex>").
    stem = PurePosixPath(config_loc).name.removesuffix(".json")
    if _HEX64.fullmatch(stem) and f"sha256:{stem}" != digest:
        raise ImageError(
            f"{config_loc} in {where}: digest mismatch (got {digest})",
            hint="the image is corrupt or was modified; re-export it",
        )
    config_doc = parse_json(config_bytes, f"{config_loc} in {where}")
    ids = diff_ids(config_doc, len(layer_locs), where)
    if not ids and layer_locs:
        raise ImageError(
            f"image config in {where} has no rootfs.diff_ids to verify layers",
            hint="re-export the image with 'docker save'",
        )
    blobs = []
    for loc, diff_id in zip(layer_locs, ids, strict=True):
        parts = PurePosixPath(loc).parts
        named = len(parts) == 3 and parts[:2] == ("blobs", "sha256") and _HEX64.fullmatch(parts[2])
        blobs.append(LayerBlob(location=loc, digest=f"sha256:{parts[2]}" if named else "", diff_id=diff_id))
    return ImageSource(
        ref=ref,
        kind="docker-archive",
        digest=digest,
        config=parse_config(config_doc, where),
        _store=store.path.absolute(),
        _layers=tuple(blobs),
    )


def _docker_entry(store: BlobStore, tag: str, where: str) -> dict[str, Any]:
    doc = store.read_json("manifest.json")
    if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc):
        raise ImageError(f"manifest.json of {where} is not a list of images")
    entries: list[dict[str, Any]] = doc
    tags = sorted(t for e in entries for t in _repo_tags(e))
    available = ", ".join(tags) or "no tagged images"
    if tag:
        matches = [e for e in entries if _norm_tag(tag) in map(_norm_tag, _repo_tags(e))]
        if not matches:
            raise ImageError(
                f"tag {tag!r} not in {where} (available: {available})",
                hint=f"use {store.path}:NAME:TAG with an available tag",
            )
        return matches[0]
    if len(entries) != 1:
        raise ImageError(
            f"{where} holds {len(entries)} images (available: {available})",
            hint=f"pick one with {store.path}:NAME:TAG",
        )
    return entries[0]


def _repo_tags(entry: dict[str, Any]) -> list[str]:
    tags = entry.get("RepoTags") or []
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def _norm_tag(name: str) -> str:
    """'busybox' == 'busybox:latest' == 'docker.io/library/busybox:latest'."""
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    for prefix in ("docker.io/", "library/"):
        name = name.removeprefix(prefix)
    return name
