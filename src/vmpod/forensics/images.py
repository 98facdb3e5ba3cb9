"""CRIU images decoded by pycriu (``criu_decode.py`` under the system's python3)
and read back with checked types: every value comes from a hostile archive.

Why a helper process and not ``import pycriu``: pycriu is Debian's (package
``criu``), in the system's dist-packages; vmpod's virtualenv does not see them,
and pycriu's generated ``*_pb2`` modules need the system's protobuf, not
whichever one the virtualenv has. ``/usr/bin/python3 -I`` (isolated: no
PYTHONPATH, no user site, not the script's directory) runs it with exactly the
system's modules, by argv, with a time limit, and prints JSON we check here.
One process decodes every image needed (a ``crit decode`` per image would start
Python and protobuf hundreds of times).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vmpod.errors import CommandError, ForensicsError
from vmpod.jsonsafe import parse_json
from vmpod.proc import run

SYSTEM_PYTHON = "/usr/bin/python3"
HELPER = Path(__file__).with_name("criu_decode.py")
DECODE_TIMEOUT = 300.0  # seconds
MAX_IMAGES = 50_000  # images decoded from one checkpoint
# the images inspection reads (pages-*.img are raw pages, read directly)
PREFIXES = (
    "inventory",
    "pstree",
    "core-",
    "ids-",
    "fdinfo-",
    "files",
    "fs-",
    "mm-",
    "pagemap-",
    "mountpoints-",
    "utsns-",
    "reg-files",
    "pipes",
    "inetsk",
    "unixsk",
)
Entry = dict[str, object]


class Images:
    """The decoded images of one checkpoint directory; failures kept per image."""

    def __init__(self, root: Path, decoded: dict[str, object]) -> None:
        self.root = root
        self._decoded = decoded
        self.warnings: list[str] = []

    def entries(self, name: str, *, required: bool = False) -> list[Entry] | None:
        """The entries of image ``name`` (objects only); None if it is absent or
        could not be decoded (a warning, or ForensicsError if ``required``)."""
        got = self._decoded.get(name)
        if got is None:
            if required:
                raise ForensicsError(f"the checkpoint has no {name}: it is not a CRIU image directory")
            return None
        err = got.get("error") if isinstance(got, dict) else "not an object"
        entries = got.get("entries") if isinstance(got, dict) else None
        if err or not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            msg = f"{name}: {err or 'malformed entries'}"
            if required:
                raise ForensicsError(f"cannot read the checkpoint's {msg}")
            self.warn(msg)
            return None
        return entries

    def first(self, name: str) -> Entry | None:
        entries = self.entries(name)
        if entries is None:
            return None
        if not entries:
            self.warn(f"{name}: no entries")
            return None
        return entries[0]

    def has(self, name: str) -> bool:
        return name in self._decoded

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self._decoded if n.startswith(prefix))

    def warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)


def image_names(root: Path) -> list[str]:
    """The regular ``*.img`` files below ``root`` that inspection decodes."""
    names = []
    with os.scandir(root) as it:
        for e in it:
            if e.name.endswith(".img") and e.name.startswith(PREFIXES) and e.is_file(follow_symlinks=False):
                names.append(e.name)
                if len(names) > MAX_IMAGES:
                    raise ForensicsError(f"the checkpoint has more than {MAX_IMAGES} images")
    return sorted(names)


def decode(root: Path) -> Images:
    """Decode the images of the CRIU image directory ``root`` with pycriu."""
    st = root.lstat() if root.exists() or root.is_symlink() else None
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise ForensicsError(f"{root} is not a CRIU image directory")
    argv = [SYSTEM_PYTHON, "-I", str(HELPER), str(root), *image_names(root)]
    try:
        proc = run(argv, what="decode the CRIU images (pycriu)", timeout=DECODE_TIMEOUT, check=False)
    except CommandError as err:
        raise ForensicsError(err.message, hint="install Debian's criu package (it ships pycriu)") from err
    if proc.returncode == 3:
        raise ForensicsError(
            f"pycriu does not load in {SYSTEM_PYTHON}: {proc.stderr.decode(errors='replace').strip()[-300:]}",
            hint="install Debian's criu package (it ships pycriu and crit)",
        )
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise ForensicsError(f"decoding the CRIU images failed: {tail[-1] if tail else proc.returncode}")
    try:
        decoded = parse_json(proc.stdout)
    except ValueError as err:
        raise ForensicsError(f"the CRIU image decoder printed bad JSON: {err}") from None
    if not isinstance(decoded, dict):
        raise ForensicsError("the CRIU image decoder printed no object")
    return Images(root, decoded)
