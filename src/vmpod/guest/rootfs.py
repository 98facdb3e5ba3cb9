"""The guest root image: a read-only erofs with python3, runc, crun, CRIU, busybox and the agent.

Two cached stages: the Debian tree from mmdebstrap (slow, keyed by the package
list) and the erofs image (fast, keyed by the tree and the agent's sources), so
editing the agent rebuilds only the image.
"""

from __future__ import annotations

import hashlib
import shutil
from importlib import resources
from pathlib import Path

from vmpod.fsutil import owned_tmpdir
from vmpod.guest.progress import Progress
from vmpod.paths import Paths
from vmpod.proc import run

SUITE = "bookworm"
# python3-minimal lacks json & co.; libpython3.11-stdlib brings them. CRIU dumps tmpfs
# mounts (the container's /dev) with GNU tar --gzip: busybox's tar lacks its flags.
PACKAGES = (
    "python3-minimal",
    "libpython3.11-stdlib",
    "runc",
    "crun",
    "busybox-static",
    "criu",
    "tar",
    "gzip",
    "iptables",
)
# CRIU locks established TCP connections with iptables-restore while it dumps them
# (--tcp-established); extract runs no maintainer script, so the alternatives
# update-alternatives would make are made here: the nftables backend (nf_tables
# is among the modules the agent loads for CRIU).
IPTABLES_ALTERNATIVES = tuple(f"{v}tables{s}" for v in ("ip", "ip6") for s in ("", "-restore", "-save"))
TREE_FORMAT = "2"
AGENT_ROOT = "opt/vmpod"  # on sys.path in the guest
_ENTRY = b"import sys\nsys.path.insert(0, '/opt/vmpod')\nfrom vmpod.agent.guest.main import main\nmain()\n"
MOUNT_POINTS = ("proc", "sys", "dev", "run", "tmp", "opt/vmpod/vmpod/agent/guest")


def tree_key() -> str:
    return hashlib.sha256("\0".join((TREE_FORMAT, SUITE, *PACKAGES)).encode()).hexdigest()[:16]


def agent_sources() -> dict[str, bytes]:
    """What the guest runs, by path under AGENT_ROOT: every module of vmpod.agent.guest,
    the protocol it shares with the host, and the package __init__ files on the way."""
    top = resources.files("vmpod")
    agent = top.joinpath("agent")
    guest = agent.joinpath("guest")
    files = {
        "vmpod/__init__.py": top.joinpath("__init__.py"),
        "vmpod/agent/__init__.py": agent.joinpath("__init__.py"),
        "vmpod/agent/protocol.py": agent.joinpath("protocol.py"),
    }
    for item in guest.iterdir():
        if item.name.endswith(".py") and item.is_file():
            files[f"vmpod/agent/guest/{item.name}"] = item
    return {rel: files[rel].read_bytes() for rel in sorted(files)}


def image_key(tree: str) -> str:
    h = hashlib.sha256(tree.encode() + _ENTRY)
    for name, data in sorted(agent_sources().items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


def ensure_tree(paths: Paths, progress: Progress) -> Path:
    """Cached Debian tree for the guest root (mmdebstrap --variant=extract)."""
    final = paths.guest / f"tree-{tree_key()}"
    if (final / ".complete").exists():
        return final
    paths.tmp.mkdir(parents=True, exist_ok=True)
    paths.guest.mkdir(parents=True, exist_ok=True)
    progress(f"building guest root from Debian {SUITE} packages (mmdebstrap)")
    with owned_tmpdir(paths.tmp, "tree-") as tmp:
        tree = Path(tmp) / "tree"
        run(
            ["mmdebstrap", "--quiet", "--variant=extract", f"--include={','.join(PACKAGES)}", SUITE, tree],
            what="build guest root with mmdebstrap",
            timeout=900,
            hint="check that Debian's mirror is reachable and the disk has 200 MB free",
        )
        for d in MOUNT_POINTS:
            (tree / d).mkdir(parents=True, exist_ok=True)
        # GNU tar runs its compressor (CRIU's tmpfs dumps) through /bin/sh
        if not (tree / "bin/sh").exists():
            (tree / "bin/sh").symlink_to("busybox")
        for name in IPTABLES_ALTERNATIVES:
            link = tree / "usr/sbin" / name
            if not link.exists():
                link.unlink(missing_ok=True)
                link.symlink_to("xtables-nft-multi")
        # extract runs no maintainer scripts and the root is read-only at run
        # time, so compile bytecode now (unchecked: sources never change there).
        progress("compiling Python bytecode for the guest")
        _compile(tree, "/usr/lib/python3.11", "compile guest Python bytecode", timeout=900)
        (tree / ".complete").touch()
        for old in paths.guest.glob("tree-*"):
            shutil.rmtree(old, ignore_errors=True)
        tree.rename(final)
    return final


def ensure_image(paths: Paths, tree: Path, progress: Progress) -> Path:
    """Cached erofs image: the tree plus the current agent sources."""
    final = paths.guest / f"rootfs-{image_key(tree.name)}.erofs"
    if final.is_file():
        return final
    progress("installing the agent into the guest root image")
    root = tree / AGENT_ROOT
    shutil.rmtree(root, ignore_errors=True)
    for rel, data in agent_sources().items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "agent.py").write_bytes(_ENTRY)
    _compile(tree, "/opt/vmpod/vmpod", "compile agent bytecode")
    paths.tmp.mkdir(parents=True, exist_ok=True)
    with owned_tmpdir(paths.tmp, "erofs-") as tmp:
        out = Path(tmp) / "rootfs.erofs"
        # Uncompressed: the image sits in the host page cache; lz4 would only add CPU.
        run(["mkfs.erofs", "--quiet", "-T0", out, tree], what="make guest root image")
        for old in paths.guest.glob("rootfs-*.erofs"):
            old.unlink()
        out.rename(final)
    return final


def _compile(tree: Path, where: str, what: str, timeout: float = 600) -> None:
    """Bytecode for the read-only guest root (unchecked: its sources never change)."""
    argv: list[str | Path] = ["chroot", tree, "/usr/bin/python3", "-m", "compileall", "-q"]
    run([*argv, "--invalidation-mode", "unchecked-hash", where], what=what, timeout=timeout)
