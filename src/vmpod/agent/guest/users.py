"""Guest side: user and group names resolved in a container image. Standard library only."""

from __future__ import annotations

import os

from vmpod.agent.guest.errors import AgentFailure


def resolve_user(rootfs: str, user: str) -> dict[str, object]:
    """``name``, ``uid``, ``name:group`` or ``uid:gid`` -> OCI user, read from the image."""
    name, _, group = user.partition(":")
    passwd = _table(rootfs, "etc/passwd")
    if _is_num(name):
        uid = int(name)
        match = [r for r in passwd if _field(r, 2) == name]
        home_gid = _number(_field(match[0], 3)) if match else 0
    else:
        match = [r for r in passwd if r[0] == name and _is_num(_field(r, 2))]
        if not match:
            raise AgentFailure(f"unable to find user {name}: no matching entries in passwd file", "invalid")
        uid, home_gid = int(match[0][2]), _number(_field(match[0], 3))
    if not group:
        return {"uid": uid, "gid": home_gid}
    if _is_num(group):
        return {"uid": uid, "gid": int(group)}
    rows = [r for r in _table(rootfs, "etc/group") if r[0] == group and _is_num(_field(r, 2))]
    if not rows:
        raise AgentFailure(f"unable to find group {group}", "invalid")
    return {"uid": uid, "gid": int(rows[0][2])}


def _field(row: list[str], i: int) -> str:
    # The image is untrusted: a short line must not raise IndexError.
    return row[i] if len(row) > i else ""


def _is_num(text: str) -> bool:
    return text.isascii() and text.isdigit()  # "²".isdigit() too, but int() refuses it


def _number(text: str) -> int:
    return int(text) if _is_num(text) else 0


def _table(rootfs: str, rel: str) -> list[list[str]]:
    # Plain read, no symlink following outside the rootfs: open with O_NOFOLLOW on
    # the last component and refuse huge files (the image is untrusted).
    path = os.path.join(rootfs, rel)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(1 << 20)
    return [
        line.split(":")
        for line in data.decode(errors="replace").splitlines()
        if line and not line.startswith("#")
    ]
