"""`system df` / `system prune` and the LRU cap on real cache directories: what is in
use stays (container records, leases of live processes), a prune racing a run never
deletes what the run is about to use, and prune asks before it removes."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmpod.cli.main import cli
from vmpod.containers.records import Record, Records, new_id
from vmpod.containers.rootfs import image_tree
from vmpod.images import ImageSource
from vmpod.images.oci import Manifest
from vmpod.images.source import ImageConfig, resolve_rootfs
from vmpod.images.store import ImageStore
from vmpod.paths import Paths
from vmpod.storage import cache
from vmpod.storage.config import CAP_ENV, CONFIG_ENV, CacheSettings
from vmpod.storage.erofs import rootfs_disk
from vmpod.storage.prune import DISKS, IMAGES, TREES, candidates, df, prune

MIB = 1 << 20


@dataclass(frozen=True)
class Filled(ImageSource):
    """An image whose root filesystem is one file of ``fill`` random bytes."""

    fill: int = 4096

    def unpack(self, dest: Path) -> None:
        (dest / "data").write_bytes(os.urandom(self.fill))


def _source(n: int, fill: int = 4096) -> Filled:
    return Filled(f"img{n}", "oci-layout", f"sha256:{n:064x}", ImageConfig(), fill=fill)


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Paths]:
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "no-config.toml"))
    monkeypatch.delenv(CAP_ENV, raising=False)
    yield Paths(home=tmp_path / "home", run=tmp_path / "run")
    cache.release_leases()


def _tree(paths: Paths, n: int, fill: int = 4096) -> Path:
    """A cached tree that this process does not hold (as after the run that made it)."""
    tree = image_tree(paths, _source(n, fill))
    cache.release_leases()
    return tree


def _record(paths: Paths, tree: Path, digest: str) -> Path:
    rec = Record(new_id(), f"c{new_id()[:6]}", "img", digest, str(tree), ("sh",), "2026-01-01T00:00:00Z")
    return Records(paths.home / "containers").add(rec)


def _disk(paths: Paths, n: int) -> Path:
    disk = paths.images / cache.DISKS / f"{cache.key_of(f'sha256:{n:064x}')}.erofs"
    disk.parent.mkdir(parents=True, exist_ok=True)
    disk.write_bytes(os.urandom(64 << 10))
    return disk


def _stored_image(store: ImageStore, name: str) -> str:
    """Tag ``name`` in the store: a config, one layer and the manifest; returns its digest."""

    def put(data: bytes, media_type: str) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        store.put_bytes(digest, data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    config = put(json.dumps({"name": name}).encode(), "application/vnd.oci.image.config.v1+json")
    layer = put(os.urandom(32 << 10), "application/vnd.oci.image.layer.v1.tar")
    doc = {"schemaVersion": 2, "config": config, "layers": [layer]}
    data = json.dumps(doc).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    store.put_bytes(digest, data)
    store.tag(name, Manifest(digest, "application/vnd.oci.image.manifest.v1+json", data, doc))
    return digest


_RUN = """
import dataclasses, os, sys
from pathlib import Path
from vmpod.containers.records import Record, Records, new_id
from vmpod.containers.rootfs import image_tree
from vmpod.images import ImageSource
from vmpod.images.source import ImageConfig
from vmpod.paths import Paths

@dataclasses.dataclass(frozen=True)
class Filled(ImageSource):
    def unpack(self, dest: Path) -> None:
        (dest / "data").write_bytes(b"rebuilt")

home, n, then = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
paths = Paths(home=home, run=home / "run")
digest = f"sha256:{n:064x}"
tree = image_tree(paths, Filled(f"img{n}", "oci-layout", digest, ImageConfig()))
print(tree, flush=True)
sys.stdin.readline()  # the test says when the "run" goes on
if then == "record":  # what make_container does next: the record names the tree
    rec = Record(new_id(), "raced", "img", digest, str(tree), ("sh",), "2026-01-01T00:00:00Z")
    Records(home / "containers").add(rec)
"""


def _run(paths: Paths, n: int, then: str) -> subprocess.Popen[str]:
    """A child doing what `vmpod run` does with a tree: image_tree, pause, record."""
    return subprocess.Popen(
        [sys.executable, "-c", _RUN, str(paths.home), str(n), then],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _proceed(proc: subprocess.Popen[str]) -> None:
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0, err


def _removed(result_paths: list[Path], *expected: Path) -> None:
    assert sorted(result_paths) == sorted(expected)


# -- in use is never removed --------------------------------------------------------


def test_prune_removes_only_what_nothing_uses(paths: Paths) -> None:
    stopped = _tree(paths, 1)
    _record(paths, stopped, "sha256:" + "1" * 64)  # a stopped container's lower layer
    unused, disk = _tree(paths, 2), _disk(paths, 3)
    run = _run(paths, 4, "exit")  # a live process holds a lease
    try:
        leased = Path(run.stdout.readline().strip()) if run.stdout else Path()
        assert leased.is_dir(), run.stderr.read() if run.stderr else ""
        plan = candidates(paths, all_=True)
        _removed([c.path for c in plan], unused, disk)
        result = prune(paths, all_=True)
        _removed([c.path for c in result.removed], unused, disk)
        assert result.freed >= 64 << 10
        assert stopped.is_dir() and leased.is_dir() and not unused.exists() and not disk.exists()
        assert not cache.use_file(unused).exists()  # the lock file goes with its entry
    finally:
        _proceed(run)
    result = prune(paths, all_=True)  # its process ended: nothing uses it now
    _removed([c.path for c in result.removed], leased)
    assert stopped.is_dir()


def test_without_all_tagged_images_and_their_caches_stay(paths: Paths) -> None:
    store = ImageStore(paths.images)
    tagged = _stored_image(store, "127.0.0.1:5000/app:v1")
    used = _stored_image(store, "127.0.0.1:5000/used:v1")
    garbage = store.blob_path("sha256:" + "e" * 64)
    store.put_bytes("sha256:" + "e" * 64, b"no image references this")
    tree = _tree(paths, int(tagged.split(":")[1], 16))  # the tagged image's unpacked tree
    _record(paths, tree.with_name("elsewhere"), used)  # a container made from `used`
    dangling = _tree(paths, 7)

    result = prune(paths, all_=False)
    assert not garbage.exists() and not dangling.exists()
    assert tree.is_dir() and [i.name for i in store.images()] == [
        "127.0.0.1:5000/app:v1",
        "127.0.0.1:5000/used:v1",
    ]
    assert {c.kind for c in result.removed} == {IMAGES, TREES}

    result = prune(paths, all_=True)
    assert [c.name for c in result.removed if c.name] == ["127.0.0.1:5000/app:v1"]
    assert not tree.exists() and [i.name for i in store.images()] == ["127.0.0.1:5000/used:v1"]
    assert not store.blob_path(tagged).exists() and store.blob_path(used).exists()


def test_df_counts_real_usage_and_what_prune_all_frees(paths: Paths) -> None:
    kept = _tree(paths, 1, fill=MIB)
    _record(paths, kept, "sha256:" + "1" * 64)
    free = _tree(paths, 2, fill=2 * MIB)
    disk = _disk(paths, 3)
    rows = {r.kind: r for r in df(paths)}
    usage = {p: sum(os.lstat(f).st_blocks * 512 for f in [p, *p.rglob("*")]) for p in (kept, free, disk)}
    assert (rows[TREES].count, rows[TREES].size) == (2, usage[kept] + usage[free])
    assert rows[TREES].reclaimable == usage[free]
    assert (rows[DISKS].count, rows[DISKS].size, rows[DISKS].reclaimable) == (1, usage[disk], usage[disk])
    assert rows["containers"].count == 1 and rows["kernels and guest assets"].size == 0
    assert prune(paths, all_=True).freed == usage[free] + usage[disk]


# -- LRU cap --------------------------------------------------------------------------


def _used_at(tree: Path, when: float) -> None:
    os.utime(cache.use_file(tree), (when, when))


def test_cap_evicts_the_least_recently_used_unused_entries(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    trees = [_tree(paths, n, fill=MIB) for n in range(1, 5)]
    now = time.time()
    for age, tree in zip((400, 300, 200, 100), trees, strict=True):
        _used_at(tree, now - age)
    _record(paths, trees[0], "sha256:" + "1" * 64)  # oldest, but a container's
    cache.lease(trees[1])  # next oldest, but this process uses it
    entry = trees[0].stat().st_blocks * 512 + MIB  # about one tree
    # a use refreshes the stamp: tree 3 (used long ago) is used again now
    run = _run(paths, 3, "exit")
    _proceed(run)
    assert os.stat(cache.use_file(trees[2])).st_mtime > now - 10

    monkeypatch.setenv(CAP_ENV, str(4 * entry + entry // 2))  # five trees: one must go
    new = image_tree(paths, _source(5, fill=MIB))
    assert new.is_dir()
    left = sorted(p for p in trees if p.exists())
    assert left == sorted([trees[0], trees[1], trees[2]])  # tree 4 was least recently used

    evicted = cache.enforce_cap(paths, CacheSettings(max_bytes=1))  # everything that may go
    assert evicted == [trees[2]] and trees[0].is_dir() and trees[1].is_dir() and new.is_dir()


# -- races with a run -----------------------------------------------------------------


def test_prune_racing_a_run_never_deletes_the_tree_it_is_about_to_record(paths: Paths) -> None:
    run = _run(paths, 9, "record")
    try:
        tree = Path(run.stdout.readline().strip()) if run.stdout else Path()
        assert tree.is_dir(), run.stderr.read() if run.stderr else ""
        # the run has its tree but no record yet: prune and the cap leave it
        assert prune(paths, all_=True).removed == ()
        assert cache.enforce_cap(paths, CacheSettings(max_bytes=1)) == []
        assert tree.is_dir()
    finally:
        _proceed(run)  # it writes the record and ends
    assert prune(paths, all_=True).removed == () and tree.is_dir()  # the record keeps it
    (rec,) = Records(paths.home / "containers").all()
    Records(paths.home / "containers").dir(rec.id).joinpath("record.json").unlink()  # `vmpod rm`
    _removed([c.path for c in prune(paths, all_=True).removed], tree)


def _waiting_on_flock(path: Path) -> bool:
    """True when some process blocks in flock() on ``path`` (/proc/locks shows '->')."""
    ino = os.stat(path).st_ino
    lines = Path("/proc/locks").read_text().splitlines()
    return any("->" in line and line.split()[-3].endswith(f":{ino}") for line in lines)


def test_a_run_waiting_on_a_remover_gets_a_new_tree(paths: Paths) -> None:
    tree = _tree(paths, 11)
    (tree / "data").write_bytes(b"old")
    started: list[subprocess.Popen[str]] = []

    def keep() -> set[str]:
        # called with the entry locked: a run arrives now and must wait for the removal
        started.append(_run(paths, 11, "exit"))
        deadline = time.monotonic() + 60
        while not _waiting_on_flock(cache.use_file(tree)):
            assert started[0].poll() is None and time.monotonic() < deadline, "the run did not wait"
            time.sleep(0.01)
        return set()

    try:
        assert cache.remove_unused(tree, keep)
        run = started[0]
        line = run.stdout.readline().strip() if run.stdout else ""
        assert Path(line) == tree, run.stderr.read() if run.stderr else ""
        assert (tree / "data").read_bytes() == b"rebuilt"  # unpacked again, not half-removed
        assert cache.in_use(tree)  # its lease is on the live lock file, not the removed one
        assert prune(paths, all_=True).removed == () and tree.is_dir()
    finally:
        for proc in started:
            _proceed(proc)


# -- the command ------------------------------------------------------------------------


def test_prune_without_a_terminal_or_force_refuses(paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMPOD_HOME", str(paths.home))
    monkeypatch.setenv("VMPOD_RUN", str(paths.run))
    tree = _tree(paths, 1)
    runner = CliRunner()
    r = runner.invoke(cli, ["system", "prune", "-a"], input="y\n")
    assert r.exit_code == 125 and tree.is_dir()
    assert r.output == "vmpod: error: system prune needs confirmation and stdin is not a terminal (use -f)\n"
    r = runner.invoke(cli, ["system", "prune", "-a", "--dry-run"])
    assert r.exit_code == 0 and str(tree) in r.output and tree.is_dir()
    r = runner.invoke(cli, ["system", "df", "--format", "json"])
    rows = {row["type"]: row for row in json.loads(r.output)}
    assert rows[TREES]["count"] == 1 and rows[TREES]["reclaimable"] == rows[TREES]["size"] > 0
    r = runner.invoke(cli, ["system", "prune", "-a", "-f"])
    assert r.exit_code == 0 and f"Deleted image trees: {tree}" in r.output and not tree.exists()


def test_an_unreadable_image_keeps_df_working_and_its_blobs(paths: Paths) -> None:
    store = ImageStore(paths.images)
    broken = _stored_image(store, "127.0.0.1:5000/broken:v1")
    store.blob_path(broken).write_bytes(b"not json")
    store.put_bytes("sha256:" + "e" * 64, b"would be garbage")
    unused = _tree(paths, 2)
    assert {r.kind: r.count for r in df(paths)}[IMAGES] == 1
    result = prune(paths, all_=False)
    assert any("cannot read manifest" in why for why in result.skipped)
    assert store.blob_path("sha256:" + "e" * 64).exists()  # no blob is deleted on a partial picture
    assert not unused.exists()  # the rest of the prune went on


def test_prune_drops_the_lock_files_of_removed_images(paths: Paths) -> None:
    store = ImageStore(paths.images)
    _stored_image(store, "127.0.0.1:5000/app:v1")
    store.source("127.0.0.1:5000/app:v1", "app")  # a run's lease on the image
    (use,) = paths.images.glob(".image-*.use")
    assert [c.name for c in candidates(paths, all_=True) if c.name] == []  # leased: not a candidate
    cache.release_leases()
    store.remove("127.0.0.1:5000/app:v1")  # `vmpod rmi` leaves the lock file
    prune(paths, all_=False)
    assert not use.exists()


def _confirm(paths: Paths, answer: bytes) -> tuple[int, bytes]:
    """`vmpod system prune -a` on a terminal, answering ``answer``; (status, output)."""
    master, slave = pty.openpty()
    env = {**os.environ, "VMPOD_HOME": str(paths.home), "VMPOD_RUN": str(paths.run)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmpod.cli", "system", "prune", "-a"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    out = b""
    try:
        while b"continue?" not in out:
            chunk = os.read(master, 4096)
            assert chunk, out
            out += chunk
        os.write(master, answer)
        while chunk := _read(master):
            out += chunk
        return proc.wait(timeout=60), out
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: the child closed the terminal
        return b""


def test_prune_on_a_terminal_asks_first(paths: Paths) -> None:
    tree = _tree(paths, 1)
    status, out = _confirm(paths, b"n\n")
    assert status == 1 and b"WARNING! This will remove" in out and b"Aborted." in out and tree.is_dir()
    status, out = _confirm(paths, b"y\n")
    assert status == 0 and f"Deleted image trees: {tree}".encode() in out and not tree.exists()


def test_a_running_vm_s_disk_is_never_pruned(paths: Paths, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "hello").write_text("hi\n")
    source = resolve_rootfs(str(rootfs))
    disk = rootfs_disk(paths, source)  # what `vmpod run` holds while its VM runs
    os.utime(cache.use_file(disk), (1, 1))
    assert prune(paths, all_=True).removed == () and disk.is_file()
    assert cache.enforce_cap(paths, CacheSettings(max_bytes=1)) == []
    cache.release_leases()  # the run ended
    assert rootfs_disk(paths, source) == disk and os.stat(cache.use_file(disk)).st_mtime > 1  # a hit is a use
    cache.release_leases()
    assert cache.enforce_cap(paths, CacheSettings(max_bytes=1)) == [disk] and not disk.exists()
