"""`vmpod system df` and `vmpod system prune`: what the caches hold, and removing
what nothing uses.

Kinds (docker's `system df`, plus vmpod's own caches):

    images          the image store's blobs (pulled images) and pull leftovers
    image trees     unpacked images under containers' overlays (images/trees)
    disk images     erofs images of images and rootfs dirs (images/disks)
    kernels         guest kernels and assets (kernels/, guest/): never pruned
    containers      containers' writable layers: never pruned (that is `vmpod rm`)
    temp            scratch dirs (tmp/): those whose owner died are pruned

In use, never removed: an entry leased by a live process (a run about to record
or boot it, a running VM: storage/cache.py), a tree named by any container
record (running or stopped), an image a container record was made from.
Without ``all_``, the caches of tagged images stay (like docker's dangling-only
prune); with it, unused images and every unused cache entry go. "Reclaimable"
is what ``prune(all_=True)`` would free.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from vmpod.containers.records import Records
from vmpod.errors import ImageError
from vmpod.fsutil import OWNER_LOCK, collect_stale_tmp, is_locked
from vmpod.images.store import ImageStore, StoredImage, image_entry
from vmpod.paths import Paths
from vmpod.storage import cache
from vmpod.storage.usage import Seen, disk_usage

IMAGES, TREES, DISKS, KERNELS, CONTAINERS, TEMP = (
    "images",
    "image trees",
    "disk images",
    "kernels and guest assets",
    "containers",
    "temp",
)


@dataclass(frozen=True)
class Usage:
    """One row of `system df`; sizes in bytes of disk actually used."""

    kind: str
    count: int
    size: int
    reclaimable: int

    def to_json(self) -> dict[str, object]:
        return {"type": self.kind, "count": self.count, "size": self.size, "reclaimable": self.reclaimable}


@dataclass(frozen=True)
class Candidate:
    """Something prune would remove, and the bytes that frees."""

    kind: str
    path: Path
    size: int
    name: str = ""  # images: the ref to untag


@dataclass(frozen=True)
class Users:
    """What containers use: image digests and (real) paths of trees and disks."""

    digests: frozenset[str]
    trees: frozenset[str]

    @classmethod
    def of(cls, paths: Paths) -> Users:
        records = Records(paths.home / "containers").all()
        return cls(frozenset(r.image_digest for r in records), frozenset(cache.referenced(paths)))


def _unused_images(store: ImageStore, users: Users) -> list[StoredImage]:
    return [
        i
        for i in store.images()
        if i.digest not in users.digests and not cache.in_use(image_entry(store.root, i.digest))
    ]


def candidates(paths: Paths, *, all_: bool) -> list[Candidate]:
    """What ``prune`` would remove now (an estimate: it checks each again under lock)."""
    store = ImageStore(paths.images)
    users = Users.of(paths)
    out: list[Candidate] = []
    seen: Seen = set()
    removed: set[str] = set()
    if all_:
        unused = _unused_images(store, users)
        removed = {i.digest for i in unused}
        freed = _blobs_of(store, [i for i in store.images() if i.digest not in removed])  # still needed
        for image in unused:
            mine = _blobs_of(store, [image]) - freed  # a shared blob is counted once
            freed |= mine
            size = sum(disk_usage(store.blob_path(d), seen) for d in sorted(mine))
            out.append(Candidate(IMAGES, store.root, size, image.name))
    out += [Candidate(IMAGES, p, disk_usage(p, seen)) for p in _garbage(store)]
    tagged = {cache.key_of(i.digest) for i in store.images() if i.digest not in removed}
    for entry in cache.entries(paths):
        key = entry.path.name.removesuffix(".erofs")
        if not all_ and key in tagged:
            continue
        if os.path.realpath(entry.path) in users.trees or cache.in_use(entry.path):
            continue
        out.append(
            Candidate(TREES if entry.kind == cache.TREES else DISKS, entry.path, disk_usage(entry.path, seen))
        )
    out += [Candidate(TEMP, p, disk_usage(p, seen)) for p in _stale_tmp(paths)]
    return out


def _garbage(store: ImageStore) -> list[Path]:
    try:
        return store.garbage()
    except ImageError:  # an unreadable manifest: no blob is garbage for sure (prune says why)
        return []


def _blobs_of(store: ImageStore, images: list[StoredImage]) -> set[str]:
    out: set[str] = set()
    for image in images:
        # an unreadable image: its blobs are not counted (prune -a reports its error)
        with contextlib.suppress(ImageError, OSError, KeyError, TypeError):
            out |= store.blobs_of(image.digest)
    return out


def _stale_tmp(paths: Paths) -> list[Path]:
    try:
        dirs = [p for p in paths.tmp.iterdir() if p.is_dir() and not p.is_symlink()]
    except FileNotFoundError:
        return []
    return [p for p in dirs if (p / OWNER_LOCK).exists() and not is_locked(p / OWNER_LOCK)]


def df(paths: Paths) -> list[Usage]:
    """`system df`: one row per kind."""
    seen: Seen = set()
    store = ImageStore(paths.images)
    reclaim: dict[str, int] = {}
    for c in candidates(paths, all_=True):
        reclaim[c.kind] = reclaim.get(c.kind, 0) + c.size
    parts = [store.root / "blobs", store.root / "incoming", store.root / "index.json"]
    tmp = _children(paths.tmp)
    entries = cache.entries(paths)
    records = Records(paths.home / "containers")
    rows = [
        Usage(IMAGES, len(store.images()), sum(disk_usage(p, seen) for p in parts), 0),
        *(
            Usage(name, len(group), sum(disk_usage(e.path, seen) for e in group), 0)
            for name, group in (
                (TREES, [e for e in entries if e.kind == cache.TREES]),
                (DISKS, [e for e in entries if e.kind == cache.DISKS]),
            )
        ),
        Usage(
            KERNELS,
            sum(p.is_dir() for p in _children(paths.kernels)),
            sum(disk_usage(p, seen) for p in [*_children(paths.kernels), *_children(paths.guest)]),
            0,
        ),
        Usage(
            CONTAINERS,
            len(records.ids()),
            sum(disk_usage(records.root / cid / "rootfs" / "upper", seen) for cid in records.ids()),
            0,
        ),
        Usage(TEMP, len(tmp), sum(disk_usage(p, seen) for p in tmp), 0),
    ]
    return [Usage(r.kind, r.count, r.size, min(reclaim.get(r.kind, 0), r.size)) for r in rows]


def _children(path: Path) -> list[Path]:
    """What a cache dir holds (its own directory block is not cache content)."""
    try:
        return sorted(path.iterdir())
    except FileNotFoundError:
        return []


def _drop_image_locks(store: ImageStore) -> None:
    """Lock files of images no longer in the store (`vmpod rmi` leaves them)."""
    keys = {cache.key_of(i.digest) for i in store.images()}
    for use in store.root.glob(".image-*.use"):
        entry = use.with_name(use.name[1 : -len(".use")])
        if entry.name.removeprefix("image-") in keys:
            continue
        with cache.exclusive(entry) as free:
            if free:
                use.unlink(missing_ok=True)


@dataclass(frozen=True)
class Pruned:
    removed: tuple[Candidate, ...]
    skipped: tuple[str, ...]  # why something planned stayed (in use meanwhile, store busy)

    @property
    def freed(self) -> int:
        return sum(c.size for c in self.removed)


def prune(paths: Paths, *, all_: bool) -> Pruned:
    """Remove what ``candidates`` names, each checked again under the lock its users take."""
    store = ImageStore(paths.images)
    removed: list[Candidate] = []
    skipped: list[str] = []
    plan = candidates(paths, all_=all_)
    for c in (c for c in plan if c.kind == IMAGES and c.name):
        digest = store.lookup(c.name)
        if digest is None:
            continue  # removed meanwhile
        entry = image_entry(store.root, digest)
        with cache.exclusive(entry) as free:
            # a run that leased the image (or a container made from it meanwhile) keeps it
            if not free or store.lookup(c.name) in Users.of(paths).digests:
                skipped.append(f"image {c.name}: in use")
                continue
            try:
                store.remove(c.name)
            except ImageError as err:  # e.g. another image's manifest is unreadable
                skipped.append(f"image {c.name}: {err}")
                continue
            cache.use_file(entry).unlink(missing_ok=True)
        removed.append(c)
    garbage = sum(c.size for c in plan if c.kind == IMAGES and not c.name)
    if store.root.is_dir():
        try:
            if store.collect_garbage() is None:
                skipped.append("image store: a pull is running; its garbage stays")
            elif garbage:
                removed.append(Candidate(IMAGES, store.root, garbage))
        except ImageError as err:
            skipped.append(f"image store garbage: {err}")
        _drop_image_locks(store)
    for c in (c for c in plan if c.kind in (TREES, DISKS)):
        if cache.remove_unused(c.path, lambda: cache.referenced(paths)):
            removed.append(c)
        else:
            skipped.append(f"{c.path}: in use")
    cache.collect_trash(paths)
    gone = set(collect_stale_tmp(paths.tmp))
    removed += [c for c in plan if c.kind == TEMP and c.path in gone]
    return Pruned(tuple(removed), tuple(skipped))
