"""The initramfs: static busybox, the kernel's boot modules and /init.

Uncompressed newc cpio: under TCG decompressing costs more than reading.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from importlib import resources
from pathlib import Path

from vmpod.errors import AssetError
from vmpod.fsutil import owned_tmpdir
from vmpod.guest.kernel import Kernel
from vmpod.guest.modules import (
    BOOT_MODULES,
    CRIU_MODULES,
    NET_MODULES,
    VSOCK_MODULES,
    available,
    load_order,
    module_name,
    read_module,
)
from vmpod.paths import Paths
from vmpod.proc import run

FORMAT = "2"  # bump when the layout below changes


def init_script() -> bytes:
    return resources.files("vmpod.guest").joinpath("init.sh").read_bytes()


def initramfs_key(kernel: Kernel, busybox: Path) -> str:
    """Inputs that decide the initramfs content."""
    h = hashlib.sha256()
    modules = [
        p.name
        for p in load_order(kernel.modules_dir, BOOT_MODULES + VSOCK_MODULES + NET_MODULES + CRIU_MODULES)
    ]
    for part in (FORMAT, kernel.release, kernel.version, ",".join(modules)):
        h.update(part.encode() + b"\0")
    h.update(init_script())
    h.update(hashlib.sha256(busybox.read_bytes()).digest())
    return h.hexdigest()[:16]


def ensure_initramfs(paths: Paths, kernel: Kernel, busybox: Path) -> Path:
    """Cached initramfs for ``kernel``; rebuilt when any input changes."""
    key = initramfs_key(kernel, busybox)
    final = paths.guest / f"initramfs-{kernel.id}-{key}.cpio"
    if final.is_file():
        return final
    # Owned: a vmpod killed while packing leaves a dir the next owned_tmpdir collects.
    with owned_tmpdir(paths.tmp, "initramfs-") as tmp:
        stage = tmp / "root"
        _stage(stage, kernel, busybox)
        names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
        out = tmp / "initramfs.cpio"
        with out.open("wb") as fh:
            proc = run(
                ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
                what="pack initramfs",
                cwd=stage,
                input=("\n".join([".", *names]) + "\n").encode(),
            )
            fh.write(proc.stdout)
        for old in paths.guest.glob(f"initramfs-{kernel.id}-*.cpio"):
            old.unlink()
        out.rename(final)
    return final


EXTRA_MODULES_DIR = "vmpod-modules"  # in the initramfs; /init copies it to the agent


def with_modules(base: Path, modules: dict[str, bytes], dest: Path) -> Path:
    """``base`` plus an appended cpio holding ``modules`` (name -> .ko bytes).

    The kernel unpacks concatenated archives; each must start on a 4-byte
    boundary or it is silently ignored (field notes).
    """
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix="extra-") as tmp:
        stage = Path(tmp)
        (stage / EXTRA_MODULES_DIR).mkdir()
        names = [EXTRA_MODULES_DIR]
        for name, data in modules.items():
            if "/" in name or not name.endswith(".ko"):
                raise AssetError(f"invalid module file name {name!r}")
            (stage / EXTRA_MODULES_DIR / name).write_bytes(data)
            names.append(f"{EXTRA_MODULES_DIR}/{name}")
        extra = run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            what="pack modules",
            cwd=stage,
            input=("\n".join(names) + "\n").encode(),
        ).stdout
    data = base.read_bytes()
    dest.write_bytes(data + b"\0" * (-len(data) % 4) + extra)
    return dest


def _stage(stage: Path, kernel: Kernel, busybox: Path) -> None:
    for d in ("bin", "dev", "proc", "sys", "sysroot", "etc", "lib/modules"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, stage / "bin/busybox")
    os.chmod(stage / "bin/busybox", 0o755)
    (stage / "bin/sh").symlink_to("busybox")
    init = stage / "init"
    init.write_bytes(init_script())
    init.chmod(0o755)
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    try:
        os.mknod(stage / "dev/console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    except PermissionError as err:
        raise AssetError(
            "building the initramfs needs root (mknod /dev/console)", hint="run as root"
        ) from err
    boot = _install(stage, load_order(kernel.modules_dir, BOOT_MODULES))
    vsock = [m for m in _install(stage, load_order(kernel.modules_dir, VSOCK_MODULES)) if m not in boot]
    net = [m for m in _install(stage, load_order(kernel.modules_dir, NET_MODULES)) if m not in boot]
    (stage / "etc/modules.load").write_text("\n".join(boot) + "\n")
    (stage / "etc/modules.vsock").write_text("\n".join(vsock) + "\n")
    (stage / "etc/modules.net").write_text("\n".join(net) + "\n")
    criu = [m for m in _install(stage, load_order(kernel.modules_dir, _criu(kernel))) if m not in boot]
    (stage / "etc/modules.criu").write_text("\n".join(criu) + "\n")


def _criu(kernel: Kernel) -> tuple[str, ...]:
    return available(kernel.modules_dir, CRIU_MODULES)


def _install(stage: Path, paths: list[Path]) -> list[str]:
    names = []
    for path in paths:
        name = module_name(path.name)
        (stage / "lib/modules" / f"{name}.ko").write_bytes(read_module(path))
        names.append(name)
    return names
