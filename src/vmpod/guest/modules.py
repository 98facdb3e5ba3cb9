"""Which kernel modules the guest needs at boot, and in which order to load them.

busybox insmod knows no dependencies (and modprobe ignores softdeps), so the
order is computed on the host from the kernel's modules.dep.
"""
from __future__ import annotations

import lzma
from pathlib import Path

from vmpod.errors import AssetError

# virtio transport and devices, the guest root and container root filesystems.
BOOT_MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "erofs", "overlay")
# loaded by /init only with vmpod.channel=vsock (hosts with vhost-vsock)
VSOCK_MODULES = ("vmw_vsock_virtio_transport",)


def module_name(relpath: str) -> str:
    base = Path(relpath).name
    for ext in (".xz", ".zst", ".gz"):
        base = base.removesuffix(ext)
    return base.removesuffix(".ko").replace("-", "_")


def load_order(modules_dir: Path, wanted: tuple[str, ...] = BOOT_MODULES) -> list[Path]:
    """Module files to insmod, dependencies first; built-in modules are skipped."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[module_name(path)] = (path, [module_name(d) for d in rest.split()])
    builtin_file = modules_dir / "modules.builtin"
    builtin = {module_name(p) for p in builtin_file.read_text().split()} \
        if builtin_file.exists() else set()
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in deps:
            raise AssetError(f"kernel module '{name}' is missing from {modules_dir}")
        path, requires = deps[name]
        # modules.dep lists the full closure; visiting each keeps the order valid.
        for dep in reversed(requires):
            visit(dep)
        order.append(modules_dir / path)

    for name in wanted:
        visit(name.replace("-", "_"))
    return order


def read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox insmod may not read .ko.xz (6.12)."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix in (".zst", ".gz"):
        raise AssetError(f"unsupported module compression: {path.name}")
    return data
