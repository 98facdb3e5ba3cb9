"""Real disk usage of a file tree, as ``du -sx`` counts it.

Blocks allocated (``st_blocks``, so sparse files count what they hold), every
inode once however many hard links reach it (``Seen`` can span several trees),
symlinks never followed, and no descent into another file system (a mount below
a tree, e.g. a running container's merged overlay, is not its usage).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

Seen = set[tuple[int, int]]  # (st_dev, st_ino) already counted


def disk_usage(path: Path, seen: Seen | None = None) -> int:
    """Bytes allocated to ``path`` and everything below it (0 when it is missing)."""
    seen = set() if seen is None else seen
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return 0
    total = _count(top, seen)
    if not stat.S_ISDIR(top.st_mode):
        return total
    todo = [os.fspath(path)]
    while todo:  # iterative: deep trees must not hit the recursion limit
        current = todo.pop()
        try:
            entries = list(os.scandir(current))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue  # removed meanwhile, or unreadable: count what can be seen
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_dev != top.st_dev:
                continue  # a mount point: another file system's usage
            total += _count(st, seen)
            if stat.S_ISDIR(st.st_mode):
                todo.append(entry.path)
    return total


def _count(st: os.stat_result, seen: Seen) -> int:
    if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return 0
        seen.add(key)
    return st.st_blocks * 512


def human_size(size: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, like docker and podman)."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
