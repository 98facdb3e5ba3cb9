"""The local image store: pulled images kept as one OCI image layout in <home>/images.

Blobs are content-addressed (``blobs/sha256/HEX``) and shared between images,
so a base layer is downloaded and stored once. ``index.json`` is the refs
index: one descriptor per pulled reference, named by its
``org.opencontainers.image.ref.name`` annotation (the full reference, e.g.
``127.0.0.1:5000/bb:v1``). Being a standard layout, the store is readable by
the existing layout code (and by skopeo: ``oci:<home>/images:REF``).

Locking: a pull holds ``.lock`` shared while it runs and garbage collection
holds it exclusively, so GC never deletes a blob that a pull has written but
not referenced yet. Index updates take ``.index.lock`` and replace
``index.json`` atomically, so readers need no lock.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from vmpod.errors import ImageError
from vmpod.fsutil import LockTimeout, atomic_write, atomic_writer, lock_file, locked
from vmpod.guest.progress import Progress, silent
from vmpod.images.blobs import DirStore, blob_location, parse_json
from vmpod.images.layout import read_oci
from vmpod.images.oci import (
    REF_NAME,
    Manifest,
    diff_ids,
    index_descriptors,
    manifest_blobs,
    parse_config,
    parse_manifest,
    pick_platform,
)
from vmpod.images.reference import Reference, parse_reference
from vmpod.images.registry import RegistryClient
from vmpod.images.source import ImageSource
from vmpod.paths import Paths
from vmpod.storage import cache
from vmpod.storage.usage import disk_usage
from vmpod.storage.usage import human_size as human_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredImage:
    """One reference in the store. ``size``: stored bytes (compressed layers), -1 if unknown."""

    name: str
    digest: str
    size: int
    created: str  # the image config's "created" timestamp, "" when absent


@dataclass(frozen=True)
class Removal:
    image: StoredImage
    blobs_removed: int
    bytes_freed: int


@dataclass(frozen=True)
class PullOptions:
    insecure: bool = False
    creds: tuple[str, str] | None = None
    timeout: float = 30.0


def parse_creds(text: str) -> tuple[str, str]:
    """``USER:PASSWORD`` → (user, password)."""
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise ImageError(
            "credentials must look like USER:PASSWORD",
            hint="pass --creds USER:PASSWORD or set REGISTRY_AUTH=USER:PASSWORD",
        )
    return user, password


def disk_path(images_root: Path, digest: str) -> Path:
    """The cached erofs disk of an image (storage/erofs.py)."""
    return images_root / cache.DISKS / f"{cache.key_of(digest)}.erofs"


def image_entry(images_root: Path, digest: str) -> Path:
    """What a user of a stored image leases (storage/cache.py): no file, only its lock."""
    return images_root / f"image-{cache.key_of(digest)}"


class ImageStore:
    """Blobs, refs index and garbage collection under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def blob_path(self, digest: str) -> Path:
        return self.root / blob_location(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def _locked(self, name: str, *, exclusive: bool = True) -> AbstractContextManager[int]:
        """The flock ``name`` under the root, waited for as long as it takes (a pull
        holds ``.lock`` for its whole download)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return locked(self.root / name, exclusive=exclusive, timeout=None)

    @contextmanager
    def pulling(self) -> Iterator[None]:
        """Held (shared) while a pull writes blobs that no ref names yet."""
        with self._locked(".lock", exclusive=False):
            yield

    @contextmanager
    def new_blob(self, digest: str) -> Iterator[IO[bytes]]:
        """A file to write a verified blob into; it appears under its digest on success."""
        incoming = self.root / "incoming"  # not in blobs/: GC removes what a killed pull left
        incoming.mkdir(parents=True, exist_ok=True)
        final = self.blob_path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        # fsync: a crash must not leave a short blob under its digest. A concurrent pull
        # of the same blob renames identical content over it.
        with atomic_writer(final, fsync=True, tmp_dir=incoming) as f:
            yield f

    def put_bytes(self, digest: str, data: bytes) -> None:
        with self.new_blob(digest) as f:
            f.write(data)

    # -- refs ------------------------------------------------------------------

    def _entries(self) -> list[dict[str, Any]]:
        try:
            data = (self.root / "index.json").read_bytes()
        except FileNotFoundError:
            return []
        doc = parse_json(data, f"image store index {self.root / 'index.json'}")
        entries = doc.get("manifests") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise ImageError(
                f"image store index {self.root / 'index.json'} is malformed", hint="remove it and pull again"
            )
        return [e for e in entries if isinstance(e, dict)]

    def _write_entries(self, entries: list[dict[str, Any]]) -> None:
        (self.root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        data = json.dumps({"schemaVersion": 2, "manifests": entries}, indent=1).encode()
        atomic_write(self.root / "index.json", data, mode=0o600, fsync=True)  # readers: no lock

    def lookup(self, name: str) -> str | None:
        """The manifest digest ``name`` points to, if it is in the store."""
        for entry in self._entries():
            if _name(entry) == name:
                return str(entry.get("digest"))
        return None

    def tag(self, name: str, manifest: Manifest) -> str | None:
        """Point ``name`` at ``manifest`` (already stored); returns the previous digest."""
        with self._locked(".index.lock"):
            entries = self._entries()
            previous = next((str(e.get("digest")) for e in entries if _name(e) == name), None)
            entries = [e for e in entries if _name(e) != name]
            entries.append(
                {
                    "mediaType": manifest.media_type,
                    "digest": manifest.digest,
                    "size": len(manifest.data),
                    "annotations": {REF_NAME: name},
                }
            )
            self._write_entries(entries)
        return previous

    def image(self, name: str) -> StoredImage:
        for entry in self._entries():
            if _name(entry) == name:
                return self._describe(entry)
        raise ImageError(f"image not known: {name}", hint="see 'vmpod images'")

    def images(self) -> list[StoredImage]:
        return sorted((self._describe(e) for e in self._entries()), key=lambda i: i.name)

    def _describe(self, entry: dict[str, Any]) -> StoredImage:
        name, digest = _name(entry), str(entry.get("digest"))
        try:
            manifest = self._read_json(digest)
            config = manifest["config"]["digest"]
            size = int(entry["size"]) + sum(int(d["size"]) for d in [manifest["config"], *manifest["layers"]])
            created = self._read_json(config).get("created") or ""
        except (ImageError, OSError, KeyError, TypeError, ValueError, AttributeError):
            return StoredImage(name, digest, -1, "")  # listing must not fail on one bad image
        return StoredImage(name, digest, size, str(created))

    def _read_json(self, digest: str) -> Any:
        return parse_json(self.blob_path(digest).read_bytes(), f"blob {digest} in {self.root}")

    def source(self, name: str, label: str) -> ImageSource:
        """The stored image ``name`` as an ImageSource (unpacked by the layout code).

        Leased for the rest of the process, so ``vmpod system prune -a`` does not
        remove its blobs before the caller has unpacked them."""
        digest = self.lookup(name)
        if digest is not None:
            cache.lease(image_entry(self.root, digest))
        with DirStore(self.root) as store:
            return read_oci(label, "oci-layout", store, name)

    # -- removal and garbage collection ---------------------------------------

    def remove(self, name: str) -> Removal:
        """Untag ``name``, drop its erofs disk if no ref shares it, then collect garbage."""
        with self._locked(".lock"):
            image = self.image(name)
            with self._locked(".index.lock"):
                entries = [e for e in self._entries() if _name(e) != name]
                self._write_entries(entries)
            if all(str(e.get("digest")) != image.digest for e in entries):
                cache.remove_unused(disk_path(self.root, image.digest), set)  # unless a VM uses it
            removed, freed = self._collect()
        return Removal(image, removed, freed)

    def collect_unused(self, digest: str) -> None:
        """After a tag moved away from ``digest``: collect it unless a pull is running."""
        try:
            fd = lock_file(self.root / ".lock", timeout=0)
        except LockTimeout:
            return  # another pull runs; the next rmi collects instead
        try:
            if any(str(e.get("digest")) == digest for e in self._entries()):
                return
            cache.remove_unused(disk_path(self.root, digest), set)
            self._collect()
        except ImageError as err:  # the pull itself succeeded; rmi will report this
            log.warning("%s", err)
        finally:
            os.close(fd)

    def collect_garbage(self) -> tuple[int, int] | None:
        """Delete unreachable blobs and what killed pulls left: (blobs, bytes freed),
        or None when a pull or removal runs (try again later)."""
        try:
            fd = lock_file(self.root / ".lock", timeout=0)
        except (LockTimeout, FileNotFoundError):
            return None
        try:
            return self._collect()
        finally:
            os.close(fd)

    def garbage(self) -> list[Path]:
        """What ``collect_garbage`` would delete now (unlocked: an estimate)."""
        keep = self._reachable()
        found = [self.root / "incoming", *self.root.glob(".index.json.*")]
        for algorithm in _subdirs(self.root / "blobs"):
            found += [b for b in _subdirs(algorithm, files=True) if f"{algorithm.name}:{b.name}" not in keep]
        return [p for p in found if p.exists()]

    def _reachable(self) -> set[str]:
        """The digests of every blob some ref reaches (manifest, config, layers)."""
        keep: set[str] = set()
        for entry in self._entries():
            digest = str(entry.get("digest"))
            try:
                keep |= self.blobs_of(digest)
            except (ImageError, OSError, KeyError, TypeError) as err:
                # Deleting blobs based on a partial picture could break other images.
                raise ImageError(
                    f"image store: cannot read manifest {digest} of "
                    f"{_name(entry)!r}: {err}; not collecting garbage",
                    hint=f"remove it with 'vmpod rmi {_name(entry)}'",
                ) from err
        return keep

    def blobs_of(self, digest: str) -> set[str]:
        """The blobs of the image whose manifest is ``digest``: manifest, config, layers.
        Raises ImageError, OSError, KeyError or TypeError for an unreadable manifest."""
        manifest = self._read_json(digest)
        return {digest, manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])}

    def _collect(self) -> tuple[int, int]:
        """Delete every blob no ref reaches; the caller holds .lock exclusively."""
        keep = self._reachable()
        removed = freed = 0
        for algorithm in _subdirs(self.root / "blobs"):
            for blob in _subdirs(algorithm, files=True):
                if f"{algorithm.name}:{blob.name}" not in keep:
                    freed += disk_usage(blob)
                    blob.unlink()
                    removed += 1
        # No pull runs now, so whatever a killed one left behind is stale.
        freed += disk_usage(self.root / "incoming")
        shutil.rmtree(self.root / "incoming", ignore_errors=True)
        for tmp in self.root.glob(".index.json.*"):
            tmp.unlink(missing_ok=True)
        return removed, freed


def _name(entry: dict[str, Any]) -> str:
    annotations = entry.get("annotations")
    return str(annotations.get(REF_NAME, "")) if isinstance(annotations, dict) else ""


def _subdirs(path: Path, *, files: bool = False) -> list[Path]:
    try:
        return [p for p in path.iterdir() if (p.is_file() if files else p.is_dir())]
    except FileNotFoundError:
        return []


# -- pull --------------------------------------------------------------------


def pull(
    paths: Paths, text: str, options: PullOptions = PullOptions(), progress: Progress = silent
) -> StoredImage:
    """Pull REGISTRY/NAME:TAG or @DIGEST into the store, skipping layers it already has."""
    store = ImageStore(paths.images)
    try:
        return _pull(store, parse_reference(text), options, progress)
    except OSError as err:  # network errors became ImageErrors in the client: this is local
        raise ImageError(
            f"image store {store.root}: {err.strerror or err}", hint="check free space and permissions"
        ) from err


def _pull(store: ImageStore, ref: Reference, options: PullOptions, progress: Progress) -> StoredImage:
    name = str(ref)
    client = RegistryClient(
        ref,
        insecure=options.insecure,
        creds=options.creds,
        timeout=options.timeout,
        # skopeo's scratch layouts on the store's file system (a layer is not
        # copied across file systems), where GC collects what a killed pull left
        work_dir=store.root / "incoming",
    )
    progress(f"pulling {name}")
    with store.pulling():
        manifest = parse_manifest(
            client.manifest(ref.digest or ref.tag, digest=ref.digest), f"manifest of {name}"
        )
        if manifest.is_index:
            where = f"image index of {name}"
            chosen = pick_platform(index_descriptors(manifest.doc, where), where)
            manifest = parse_manifest(
                client.manifest(chosen.digest, digest=chosen.digest, size=chosen.size),
                f"manifest {chosen.digest} of {name}",
            )
            if manifest.is_index:
                raise ImageError(
                    f"{name}: the linux/amd64 entry is itself an index",
                    hint="nested image indexes are not supported",
                )
        where = f"manifest {manifest.digest} of {name}"
        config, layers = manifest_blobs(manifest.doc, where)
        config_data = client.blob_bytes(config)
        config_doc = parse_json(config_data, f"image config of {name}")
        parse_config(config_doc, f"image config of {name}")  # refuse bad images before tagging
        diff_ids(config_doc, len(layers), f"image config of {name}")
        for index, layer in enumerate(layers, 1):
            short = layer.digest.partition(":")[2][:12]
            if store.has_blob(layer.digest):
                progress(f"layer {index}/{len(layers)} {short} already present")
                continue
            progress(f"copying layer {index}/{len(layers)} {short} ({human_size(layer.size)})")
            with store.new_blob(layer.digest) as out:
                client.download(layer, out)
        store.put_bytes(config.digest, config_data)
        store.put_bytes(manifest.digest, manifest.data)
        previous = store.tag(name, manifest)
    if previous not in (None, manifest.digest):
        store.collect_unused(str(previous))
    return store.image(name)
