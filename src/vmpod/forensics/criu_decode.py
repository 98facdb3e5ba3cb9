"""Decode CRIU images to JSON with pycriu, the decoder Debian's ``criu`` package ships.

Run by the system interpreter, isolated (``/usr/bin/python3 -I criu_decode.py DIR
NAME...``), never imported by vmpod: pycriu lives in the system's dist-packages
and its generated protobuf modules need the system's protobuf, which vmpod's own
environment does not see. Standard library (and pycriu) only.

Prints one JSON object: ``{NAME: {"entries": [...]}}`` or ``{NAME: {"error": "..."}}``
per image named. The images come from an evidence archive and are hostile: each
is a regular file of bounded size (no symlink followed), a decoding failure is
that image's error, and what is printed is bounded. Core images are cut down to
what inspection shows (the registers and FPU state are large and of no use here).
"""

from __future__ import annotations

import importlib
import json
import os
import stat
import sys

MAX_IMAGE = 64 << 20  # bytes of one image decoded
MAX_OUTPUT = 256 << 20  # bytes of JSON printed in all
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def _core(entry: dict[str, object]) -> dict[str, object]:
    """A core image's entry without registers: the task's comm, state and creds."""
    tc, thread = entry.get("tc"), entry.get("thread_core")
    out: dict[str, object] = {}
    if isinstance(tc, dict):
        out["tc"] = {k: tc[k] for k in ("comm", "task_state", "exit_code") if k in tc}
    if isinstance(thread, dict) and isinstance(thread.get("creds"), dict):
        creds = thread["creds"]
        out["thread_core"] = {"creds": {k: creds[k] for k in ("uid", "gid", "euid", "egid") if k in creds}}
    return out


def _fstype_names(entries: list[dict[str, object]]) -> None:
    """Name each mount's file system type (CRIU stores its own enum number)."""
    mnt = importlib.import_module("pycriu.images.mnt_pb2")
    for entry in entries:
        try:
            entry["fstype_name"] = mnt.fstype.Name(entry.get("fstype", -1)).lower()
        except (ValueError, TypeError):
            entry["fstype_name"] = ""


def decode(root: str, name: str) -> dict[str, object]:
    images = importlib.import_module("pycriu.images")
    if not name.endswith(".img") or not set(name) <= _NAME_OK or name.startswith("."):
        return {"error": "not a CRIU image name"}
    try:
        fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        return {"error": err.strerror or str(err)}
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            return {"error": "not a regular file"}
        if st.st_size > MAX_IMAGE:
            return {"error": f"larger than {MAX_IMAGE} bytes"}
        try:
            img = images.load(fh, False)
        except images.MagicException as err:
            return {"error": f"unknown magic {err.magic:#x}"}
        except Exception as err:  # a hostile image breaks the decoder in any way it can
            return {"error": f"cannot decode: {type(err).__name__}: {str(err)[:200]}"}
    entries = img.get("entries") if isinstance(img, dict) else None
    if not isinstance(entries, list):
        return {"error": "no entries"}
    magic = img.get("magic")
    if magic == "CORE":
        entries = [_core(e) for e in entries if isinstance(e, dict)]
    elif magic == "MNTS":
        _fstype_names(entries)
    return {"magic": magic, "entries": entries}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: criu_decode.py DIR NAME...", file=sys.stderr)
        return 2
    try:
        importlib.import_module("pycriu.images")
    except Exception as err:
        print(f"pycriu cannot be imported: {err}", file=sys.stderr)
        return 3
    root, parts, size = argv[0], [], 0
    for name in dict.fromkeys(argv[1:]):
        text = f"{json.dumps(name)}: {json.dumps(decode(root, name))}"
        size += len(text) + 2
        if size > MAX_OUTPUT:
            print(f"the decoded images exceed {MAX_OUTPUT} bytes", file=sys.stderr)
            return 4
        parts.append(text)
    sys.stdout.write("{" + ", ".join(parts) + "}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
