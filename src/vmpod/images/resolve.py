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
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from vmpod.errors import ImageError
from vmpod.guest.progress import Progress
from vmpod.images.blobs import (
    BlobStore,
    DirStore,
    TarStore,
    blob_location,
    check_digest_format,
    parse_json,
)
from vmpod.images.source import ImageConfig, ImageSource
from vmpod.images.stream import LayerBlob
from vmpod.paths import Paths, default_paths

log = logging.getLogger(__name__)

PLATFORM = ("linux", "amd64")  # the guests vmpod boots
_TRANSPORTS = {"oci": "oci-layout", "oci-archive": "oci-archive",
               "docker-archive": "docker-archive"}
_INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json"}
_MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json",
                   "application/vnd.docker.distribution.manifest.v2+json"}
_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
_NAME_ANNOTATIONS = ("org.opencontainers.image.ref.name", "io.containerd.image.name")
_MAX_NESTING = 4
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class _Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str]
    platform: tuple[str, ...]  # (os, architecture[, variant]) or ()


def resolve_image(ref: str, *, paths: Paths | None = None,
                  progress: Progress | None = None) -> ImageSource:
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
            raise ImageError(f"image {ref!r}: {path} is a directory, not a {transport}",
                             hint="use oci:DIR for an OCI layout directory")
        if not (path / "oci-layout").is_file() or not (path / "index.json").is_file():
            raise ImageError(f"image {ref!r}: {path} is a directory but not an OCI layout "
                             "(no oci-layout and index.json)",
                             hint="use --rootfs DIR for a root filesystem directory")
        with DirStore(path) as store:
            return _from_oci(ref, "oci-layout", store, tag)
    if transport == "oci-layout":
        raise ImageError(f"image {ref!r}: {path} is not an OCI layout directory",
                         hint="use oci-archive:FILE for an OCI archive")
    if not path.is_file():  # a fifo or device would block or never end
        raise ImageError(f"image {ref!r}: {path} is not a regular file or directory",
                         hint="pass an OCI layout directory or an image archive")
    with TarStore(path) as store:
        kind = transport or _archive_kind(store, ref)
        if kind == "oci-archive":
            return _from_oci(ref, kind, store, tag)
        return _from_docker(ref, store, tag)


def registry_reference(ref: str) -> str | None:
    """The registry reference ``ref`` names, or None when it names a local image."""
    if ref.startswith("docker://"):
        return ref.removeprefix("docker://")
    if _split_transport(ref)[0] is not None or not any(c in ref for c in "/:@"):
        return None
    if os.path.exists(ref) or any(c == ":" and os.path.exists(ref[:i]) for i, c in enumerate(ref)):
        return None
    if ref.rpartition("/")[2].partition(":")[0].endswith((".tar", ".tgz", ".tar.gz")):
        return None   # a mistyped archive name: say "not found", do not go online
    from vmpod.images.registry import parse_reference  # lazy: keeps urllib off local runs
    try:
        parse_reference(ref)
    except ImageError:
        return None
    return ref


def _from_registry(ref: str, remote: str, paths: Paths, progress: Progress) -> ImageSource:
    from vmpod.images.registry import DEFAULT_REGISTRY, parse_reference
    from vmpod.images.store import resolve_stored
    try:
        return resolve_stored(remote, paths, progress)
    except ImageError as err:
        if parse_reference(remote).registry != DEFAULT_REGISTRY:
            raise
        # A mistyped local path parses as a docker.io name too: mention both readings.
        local = "for a local image give its path, or use --rootfs DIR for a rootfs directory"
        raise ImageError(f"image {ref!r} not found: not a local image, and pulling it from "
                         f"{DEFAULT_REGISTRY} failed: {err.message}",
                         hint="; ".join(filter(None, (err.hint, local)))) from err


def _split_transport(ref: str) -> tuple[str | None, str]:
    for prefix, kind in _TRANSPORTS.items():
        if ref.startswith(prefix + ":"):
            return kind, ref[len(prefix) + 1:]
    return None, ref


def _split_tag(rest: str, ref: str) -> tuple[Path, str]:
    if rest and os.path.exists(rest):
        return Path(rest), ""
    for i, char in enumerate(rest):
        if char == ":" and i and os.path.exists(rest[:i]):
            return Path(rest[:i]), rest[i + 1:]
    raise ImageError(f"image {ref!r} not found: not a directory, OCI layout or image archive",
                     hint="use --rootfs DIR for a root filesystem directory")


def _archive_kind(store: BlobStore, ref: str) -> str:
    # Docker >= 25 writes both files; the OCI index carries real digests, so prefer it.
    if store.exists("index.json"):
        return "oci-archive"
    if store.exists("manifest.json"):
        return "docker-archive"
    raise ImageError(f"image {ref!r}: {store.path} is neither an OCI archive nor a docker archive "
                     "(no index.json or manifest.json)",
                     hint="create it with 'skopeo copy ... oci-archive:FILE' or 'docker save'")


# -- OCI layouts and archives ------------------------------------------------

def _from_oci(ref: str, kind: str, store: BlobStore, tag: str) -> ImageSource:
    where = f"{'OCI layout' if kind == 'oci-layout' else 'OCI archive'} {store.path}"
    descriptors = _descriptors(store.read_json("index.json"), f"index.json of {where}")
    matches = descriptors
    if tag:
        matches = [d for d in descriptors if tag in _names(d)]
        if not matches:
            raise ImageError(f"tag {tag!r} not in {where} (available: {_available(descriptors)})",
                             hint=f"use {store.path}:TAG with an available tag")
    desc = _choose(matches, where, store.path, descriptors)
    manifest_desc, manifest = _load_manifest(store, desc, where, 0)
    config_desc = _descriptor(manifest.get("config"), f"config descriptor in {where}")
    config_doc = store.read_json(blob_location(config_desc.digest), digest=config_desc.digest,
                                 size=config_desc.size)
    layer_descs = manifest.get("layers")
    if not isinstance(layer_descs, list):
        raise ImageError(f"manifest {manifest_desc.digest} in {where} has no layers list")
    layers = [_descriptor(d, f"layer descriptor in {where}") for d in layer_descs]
    for layer in layers:
        if layer.media_type not in _LAYER_TYPES:
            raise ImageError(f"layer {layer.digest} in {where} has unsupported media type "
                             f"{layer.media_type!r}", hint="only plain, gzip and zstd tar "
                             "layers can be unpacked (not encrypted ones)")
    diff_ids = _diff_ids(config_doc, len(layers), where)
    blobs = tuple(LayerBlob(location=blob_location(d.digest), media_type=d.media_type,
                            digest=d.digest, size=d.size,
                            diff_id=diff_ids[i] if diff_ids else "")
                  for i, d in enumerate(layers))
    return ImageSource(ref=ref, kind=kind, digest=manifest_desc.digest,
                       config=parse_config(config_doc, where),
                       _store=store.path.absolute(), _layers=blobs)


def _names(desc: _Descriptor) -> set[str]:
    return {desc.annotations[key] for key in _NAME_ANNOTATIONS if key in desc.annotations}


def _available(descriptors: list[_Descriptor]) -> str:
    names = sorted({desc.annotations.get(_NAME_ANNOTATIONS[0], "") for desc in descriptors} - {""})
    return ", ".join(names) or "no tagged images"


def _choose(matches: list[_Descriptor], where: str, path: Path,
            descriptors: list[_Descriptor]) -> _Descriptor:
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ImageError(f"{where} holds no images", hint="the layout is empty; copy an image in")
    if all(d.platform for d in matches):
        return _pick_platform(matches, where)  # per-platform manifests listed directly
    raise ImageError(f"{where} holds {len(matches)} images (available: "
                     f"{_available(descriptors)})", hint=f"pick one with {path}:TAG")


def _pick_platform(descriptors: list[_Descriptor], where: str) -> _Descriptor:
    for desc in descriptors:
        if desc.platform[:2] == PLATFORM:
            return desc
    found = ", ".join("/".join(d.platform) or "unknown" for d in descriptors) or "none"
    raise ImageError(f"{where} has no {'/'.join(PLATFORM)} image (available: {found})",
                     hint=f"vmpod runs {'/'.join(PLATFORM)} guests; export that platform")


def _load_manifest(store: BlobStore, desc: _Descriptor, where: str,
                   depth: int) -> tuple[_Descriptor, dict[str, Any]]:
    """Follow image indexes (picking our platform) down to an image manifest."""
    doc = store.read_json(blob_location(desc.digest), digest=desc.digest, size=desc.size)
    if not isinstance(doc, dict):
        raise ImageError(f"manifest {desc.digest} in {where} is not a JSON object")
    media = desc.media_type or str(doc.get("mediaType", ""))
    if media in _INDEX_TYPES or (not media and "manifests" in doc):
        if depth >= _MAX_NESTING:
            raise ImageError(f"{where}: image indexes nested more than {_MAX_NESTING} deep")
        chosen = _pick_platform(_descriptors(doc, f"index {desc.digest} in {where}"), where)
        return _load_manifest(store, chosen, where, depth + 1)
    if media in _MANIFEST_TYPES or (not media and "layers" in doc):
        return desc, doc
    raise ImageError(f"{where}: {desc.digest} has unsupported media type {media!r}",
                     hint="expected an OCI or docker v2 image manifest or index")


def _descriptors(doc: Any, where: str) -> list[_Descriptor]:
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
        raise ImageError(f"{where} has no manifests list", hint="the image is malformed")
    return [_descriptor(item, where) for item in doc["manifests"]]


def _descriptor(obj: Any, where: str) -> _Descriptor:
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
    return _Descriptor(media_type=str(obj.get("mediaType", "")), digest=digest, size=size,
                       annotations={str(k): str(v) for k, v in annotations.items()},
                       platform=plat)


def _diff_ids(config_doc: Any, count: int, where: str) -> list[str]:
    rootfs = config_doc.get("rootfs") if isinstance(config_doc, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if ids is None:
        return []
    if not isinstance(ids, list) or len(ids) != count:
        raise ImageError(f"image config in {where} lists {len(ids) if isinstance(ids, list) else 0}"
                         f" diff_ids for {count} layers", hint="the image is malformed")
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

    return ImageConfig(env=strings("Env"), entrypoint=strings("Entrypoint"), cmd=strings("Cmd"),
                       working_dir=string("WorkingDir"), user=string("User"))


# -- docker save archives ----------------------------------------------------

def _from_docker(ref: str, store: BlobStore, tag: str) -> ImageSource:
    where = f"docker archive {store.path}"
    entries = store.read_json("manifest.json")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ImageError(f"manifest.json of {where} is not a list of images")
    tags = sorted(t for e in entries for t in _repo_tags(e))
    available = ", ".join(tags) or "no tagged images"
    if tag:
        matches = [e for e in entries if _norm_tag(tag) in map(_norm_tag, _repo_tags(e))]
        if not matches:
            raise ImageError(f"tag {tag!r} not in {where} (available: {available})",
                             hint=f"use {store.path}:NAME:TAG with an available tag")
    elif len(entries) != 1:
        raise ImageError(f"{where} holds {len(entries)} images (available: {available})",
                         hint=f"pick one with {store.path}:NAME:TAG")
    entry = matches[0] if tag else entries[0]
    config_loc, layer_locs = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_loc, str) or not isinstance(layer_locs, list) \
            or not all(isinstance(loc, str) for loc in layer_locs):
        raise ImageError(f"manifest.json of {where} lacks Config or Layers")
    config_bytes = store.read(config_loc)
    digest = f"sha256:{hashlib.sha256(config_bytes).hexdigest()}"
    # docker names the config after its own digest ("<hex>.json" or "blobs/sha256/<hex>").
    stem = PurePosixPath(config_loc).name.removesuffix(".json")
    if _HEX64.fullmatch(stem) and f"sha256:{stem}" != digest:
        raise ImageError(f"{config_loc} in {where}: digest mismatch (got {digest})",
                         hint="the image is corrupt or was modified; re-export it")
    config_doc = parse_json(config_bytes, f"{config_loc} in {where}")
    diff_ids = _diff_ids(config_doc, len(layer_locs), where)
    if not diff_ids and layer_locs:
        raise ImageError(f"image config in {where} has no rootfs.diff_ids to verify layers",
                         hint="re-export the image with 'docker save'")
    blobs = []
    for loc, diff_id in zip(layer_locs, diff_ids, strict=True):
        parts = PurePosixPath(loc).parts
        named = len(parts) == 3 and parts[:2] == ("blobs", "sha256") and _HEX64.fullmatch(parts[2])
        blobs.append(LayerBlob(location=loc, digest=f"sha256:{parts[2]}" if named else "",
                               diff_id=diff_id))
    return ImageSource(ref=ref, kind="docker-archive", digest=digest,
                       config=parse_config(config_doc, where),
                       _store=store.path.absolute(), _layers=tuple(blobs))


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
