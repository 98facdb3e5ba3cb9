"""The container output log: JSON lines, size cap, rotation, following across it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from vmpod.runtime.outputlog import LogSink, RotatingLog, follow, read, rotated


def test_lines_keep_their_stream_and_split_at_newlines(tmp_path: Path) -> None:
    log = RotatingLog(LogSink(str(tmp_path / "c.log")))
    log.write("stdout", b"a\nb")
    log.write("stderr", b"\xffoops\n")
    log.close()
    got = [(e.stream, e.text) for e in read(tmp_path / "c.log")]
    assert got == [("stdout", "a\n"), ("stdout", "b"), ("stderr", "\ufffdoops\n")]


def test_rotation_caps_the_size_and_keeps_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = RotatingLog(LogSink(str(path), max_bytes=4096, keep=3))
    for i in range(1000):
        log.write("stdout", f"line {i}\n".encode())
    log.close()
    assert not rotated(path, 3).exists()
    sizes = [rotated(path, i).stat().st_size for i in range(3)]
    assert all(s <= 4096 for s in sizes)
    texts = [e.text for e in read(path, keep=3)]
    assert texts[-1] == "line 999\n"
    numbers = [int(t.split()[1]) for t in texts]
    assert numbers == sorted(numbers) and numbers == list(range(numbers[0], 1000))


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RotatingLog(LogSink(str(tmp_path / "x"), max_bytes=10))


def test_follow_reads_across_rotations_until_the_writer_ends(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = RotatingLog(LogSink(str(path), max_bytes=2048, keep=2))
    done = threading.Event()

    def writer() -> None:
        for i in range(300):
            log.write("stdout", f"n {i}\n".encode())
            if i % 20 == 0:
                time.sleep(0.01)
        log.close()
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    got = [int(e.text.split()[1]) for e in follow(path, lambda: not done.is_set(), keep=2, poll=0.005)]
    t.join()
    assert got[-1] == 299
    assert got == sorted(got) and len(set(got)) == len(got)  # in order, nothing twice


def test_a_torn_last_line_is_not_read_until_it_is_whole(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    path.write_bytes(b'{"time": "t", "stream": "stdout", "log": "x\\n"}\n{"time": "t", "str')
    alive = iter([True, False])
    got = list(follow(path, lambda: next(alive, False), poll=0.001))
    assert [e.text for e in got] == ["x\n"]
