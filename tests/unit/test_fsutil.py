"""fsutil: atomic writes, flocks, paths resolved below a root, /proc/meminfo."""

from __future__ import annotations

import errno
import multiprocessing
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from vmpod.fsutil import (
    MAX_SYMLINKS,
    LockTimeout,
    atomic_write,
    atomic_writer,
    is_locked,
    lock_file,
    locked,
    meminfo,
    resolve_below,
)

# -- atomic writes ---------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    atomic_write(target, b"new", mode=0o600, fsync=True)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    atomic_write(target, b"newer")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # the default, whatever the umask
    assert os.listdir(tmp_path) == ["state.json"]


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    target = tmp_path / "index.json"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as fh:
        fh.write(b"half")
        raise RuntimeError("disk full, say")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["index.json"]


def test_failed_rename_removes_the_temp(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "child").touch()
    with pytest.raises(OSError):
        atomic_write(tmp_path / "dir", b"x")  # cannot replace a non-empty directory
    assert sorted(os.listdir(tmp_path)) == ["dir"]


def test_temp_in_another_directory(tmp_path: Path) -> None:
    (tmp_path / "incoming").mkdir()
    with atomic_writer(tmp_path / "blob", tmp_dir=tmp_path / "incoming") as fh:
        fh.write(b"data")
        assert len(os.listdir(tmp_path / "incoming")) == 1
        assert not (tmp_path / "blob").exists()
    assert (tmp_path / "blob").read_bytes() == b"data"
    assert os.listdir(tmp_path / "incoming") == []


def _writer(path: str, byte: bytes, rounds: int) -> None:
    data = byte * (256 << 10)
    for _ in range(rounds):
        atomic_write(path, data)


def test_concurrent_writers_never_show_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "aliases.json"
    full = {b"a" * (256 << 10), b"b" * (256 << 10)}
    atomic_write(target, b"a" * (256 << 10))
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_writer, args=(str(target), byte, 150)) for byte in (b"a", b"b")]
    for proc in writers:
        proc.start()
    reads = 0
    while any(proc.is_alive() for proc in writers) or reads == 0:
        assert target.read_bytes() in full
        reads += 1
    for proc in writers:
        proc.join()
        assert proc.exitcode == 0  # a shared fixed temp name would make one writer fail
    assert target.read_bytes() in full
    assert os.listdir(tmp_path) == ["aliases.json"]


# -- flocks ----------------------------------------------------------------------


def test_exclusive_lock_times_out_while_held(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    fd = lock_file(path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with pytest.raises(LockTimeout) as err:
            lock_file(path)  # timeout 0: one try
        assert err.value.path == path
        start = time.monotonic()
        with pytest.raises(LockTimeout, match="timed out after 0.2s"):
            lock_file(path, timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 2
        with pytest.raises(LockTimeout):
            lock_file(path, exclusive=False)
    finally:
        os.close(fd)
    os.close(lock_file(path))  # released by the close


def test_shared_locks_coexist_and_exclude_writers(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    with locked(path, exclusive=False), locked(path, exclusive=False), pytest.raises(LockTimeout):
        lock_file(path)
    with locked(path):
        pass


def test_no_timeout_waits_for_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    fd = lock_file(path)
    timer = threading.Timer(0.2, os.close, (fd,))
    timer.start()
    start = time.monotonic()
    with locked(path, timeout=None):
        assert time.monotonic() - start >= 0.15
    timer.join()


def test_is_locked(tmp_path: Path) -> None:
    path = tmp_path / "monitor.lock"
    assert not is_locked(path)
    assert not path.exists()  # probing never creates the file
    with locked(path):
        assert is_locked(path)
    assert not is_locked(path)
    with locked(path, exclusive=False):
        assert not is_locked(path)  # only an exclusive holder counts as an owner
        with locked(path, exclusive=False):  # and a probe does not block other readers
            pass


def test_a_dead_holder_releases_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    child = os.fork()
    if child == 0:
        lock_file(path)
        time.sleep(60)
        os._exit(0)
    deadline = time.monotonic() + 10
    while not is_locked(path):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(child, 9)
    os.waitpid(child, 0)
    assert not is_locked(path)


# -- paths below a root ----------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "usr/bin").mkdir(parents=True)
    (r / "usr/bin/busybox").write_bytes(b"bb")
    (r / "etc").mkdir()
    (r / "etc/passwd").write_text("root")
    (tmp_path / "outside").write_text("host secret")
    return r


def test_plain_path(root: Path) -> None:
    found = resolve_below(root, "/usr/bin/busybox")
    assert found.exists and found.path == root / "usr/bin/busybox"
    assert found.parts == ("usr", "bin", "busybox") and found.escape == ""
    assert resolve_below(root, "usr//./bin/").path == root / "usr/bin"
    assert resolve_below(root, "/").path == root


def test_dotdot_never_climbs_above_the_root(root: Path) -> None:
    found = resolve_below(root, "../outside")
    assert found.path == root and found.missing == ("outside",)
    assert "escapes the root with '..'" in found.escape
    found = resolve_below(root, "/etc/../../../usr/bin")
    assert found.path == root / "usr/bin" and found.escape


def test_absolute_symlink_stays_in_the_root(root: Path, tmp_path: Path) -> None:
    (root / "bin").symlink_to("/usr/bin")
    found = resolve_below(root, "/bin/busybox")
    assert found.path == root / "usr/bin/busybox"
    assert found.escape == "goes through absolute symlink 'bin' -> '/usr/bin'"
    (root / "host").symlink_to(tmp_path / "outside")  # the host's file, seen from root
    found = resolve_below(root, "host")
    assert not found.exists and found.path == root
    assert found.missing == tuple(str(tmp_path / "outside").strip("/").split("/"))


def test_relative_symlink_escaping_with_dotdot_is_confined(root: Path) -> None:
    (root / "etc/up").symlink_to("../../../outside")
    found = resolve_below(root, "/etc/up")
    assert found.path == root and found.missing == ("outside",)
    assert found.escape == "escapes the root with '..' through symlink 'etc/up' -> '../../../outside'"


def test_symlink_chain(root: Path) -> None:
    (root / "bin").symlink_to("usr/bin")  # relative
    (root / "usr/bin/sh").symlink_to("busybox")  # relative, in the link's directory
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("/bin/sh")  # absolute, through another link
    found = resolve_below(root, "a")
    assert found.exists and found.path == root / "usr/bin/busybox"
    (root / "c").symlink_to("usr/bin/../../etc/passwd")  # '..' after a symlinked component
    assert resolve_below(root, "c").path == root / "etc/passwd"
    (root / "d").symlink_to("bin/..")  # '..' goes to the *real* parent: usr
    assert resolve_below(root, "d").path == root / "usr"


def test_symlink_loop_ends_with_eloop(root: Path) -> None:
    (root / "loop").symlink_to("loop")
    (root / "ping").symlink_to("pong")
    (root / "pong").symlink_to("/ping")
    for path in ("loop", "ping/x"):
        with pytest.raises(OSError) as err:
            resolve_below(root, path)
        assert err.value.errno == errno.ELOOP
    for i in range(MAX_SYMLINKS):  # a long but finite chain resolves
        (root / f"l{i}").symlink_to(f"l{i + 1}" if i + 1 < MAX_SYMLINKS else "etc")
    assert resolve_below(root, "l0/passwd").path == root / "etc/passwd"


def test_missing_components_and_non_directories(root: Path) -> None:
    found = resolve_below(root, "usr/lib/x/../y")
    assert found.path == root / "usr" and found.missing == ("lib", "x", "..", "y")
    with pytest.raises(NotADirectoryError):
        resolve_below(root, "etc/passwd/x")
    assert resolve_below(root, "etc/passwd").path == root / "etc/passwd"


# -- /proc/meminfo ----------------------------------------------------------------

MEMINFO = """\
MemTotal:        8029524 kB
MemFree:          312844 kB
MemAvailable:    5127936 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
garbage line
Broken:          x kB
"""


def test_meminfo_parses_a_sample(tmp_path: Path) -> None:
    sample = tmp_path / "meminfo"
    sample.write_text(MEMINFO)
    assert meminfo(sample) == {
        "MemTotal": 8029524,
        "MemFree": 312844,
        "MemAvailable": 5127936,
        "HugePages_Total": 0,
        "Hugepagesize": 2048,
    }


def test_meminfo_of_this_host() -> None:
    info = meminfo()
    assert info["MemTotal"] >= info["MemAvailable"] > 0
