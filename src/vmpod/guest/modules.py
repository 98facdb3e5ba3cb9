"""Which kernel modules the guest needs at boot, and in which order to load them.

busybox insmod knows no dependencies (and modprobe ignores softdeps), so the
order is computed on the host from the kernel's modules.dep.
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass
from pathlib import Path

from vmpod.errors import AssetError, ConfigError
from vmpod.proc import run

# virtio transport and devices, the guest root and container root filesystems.
BOOT_MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "erofs", "overlay", "virtiofs")
# loaded by /init only with vmpod.channel=vsock (hosts with vhost-vsock)
VSOCK_MODULES = ("vmw_vsock_virtio_transport",)
# loaded by /init only in a VM that has a virtio-net device (a NIC)
NET_MODULES = ("virtio_net",)
# CRIU's socket diagnostics and its nftables probe (kerndat fails without
# nf_tables): shipped with every guest, loaded by the agent on first use.
CRIU_MODULES = (
    "unix_diag",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
    "af_packet_diag",
    "netlink_diag",
    "nf_tables",
    "nft_compat",  # iptables-nft's matches without a native nftables form (CRIU's lock)
    "xt_mark",
)


def module_name(relpath: str) -> str:
    base = Path(relpath).name
    for ext in (".xz", ".zst", ".gz"):
        base = base.removesuffix(ext)
    return base.removesuffix(".ko").replace("-", "_")


def available(modules_dir: Path, names: tuple[str, ...]) -> tuple[str, ...]:
    """Those of ``names`` that ``modules_dir`` has as loadable modules (optional sets)."""
    have = {
        module_name(line.partition(":")[0]) for line in (modules_dir / "modules.dep").read_text().splitlines()
    }
    return tuple(n for n in names if n in have)


def load_order(modules_dir: Path, wanted: tuple[str, ...] = BOOT_MODULES) -> list[Path]:
    """Module files to insmod, dependencies first; built-in modules are skipped."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[module_name(path)] = (path, [module_name(d) for d in rest.split()])
    builtin_file = modules_dir / "modules.builtin"
    builtin = {module_name(p) for p in builtin_file.read_text().split()} if builtin_file.exists() else set()
    softdeps = _softdeps(modules_dir, set(deps), builtin)
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in deps:
            raise AssetError(f"kernel module '{name}' is missing from {modules_dir}")
        path, requires = deps[name]
        # "softdep X pre: Y" (e.g. libcrc32c needs a crc32c provider) come first,
        # then hard dependencies: modules.dep lists the closure, so order holds.
        for dep in softdeps.get(name, []):
            visit(dep)
        for dep in reversed(requires):
            visit(dep)
        order.append(modules_dir / path)

    for name in wanted:
        visit(name.replace("-", "_"))
    return order


@dataclass(frozen=True)
class ModuleLoad:
    """One module to insmod in the guest, in order, with its parameters."""

    name: str
    file: Path
    params: tuple[str, ...] = ()


def parse_module_arg(arg: str) -> tuple[str, tuple[str, ...]]:
    """``NAME[=p1=v1 p2=v2]`` -> (NAME, ("p1=v1", "p2=v2"))."""
    name, _, params = arg.partition("=")
    if not name:
        raise ConfigError(f"invalid module argument '{arg}'", hint="use NAME[=param=value ...]")
    return name, tuple(params.split())


def modinfo(path: Path, field: str) -> str:
    return run(["modinfo", "-F", field, path], what=f"read {path.name}").stdout.decode().strip()


def plan_modules(
    modules_dir: Path, release: str, names: tuple[str, ...] = (), files: tuple[str, ...] = ()
) -> list[ModuleLoad]:
    """Load plan for kernel modules by name (from the kernel's tree) and .ko files
    built elsewhere, dependencies first, skipping what the guest loads at boot."""
    booted = {module_name(p.name) for p in load_order(modules_dir)}
    plan: list[ModuleLoad] = []
    seen = set(booted)

    def add_tree(name: str, params: tuple[str, ...]) -> None:
        for path in load_order(modules_dir, (name,)):
            mod = module_name(path.name)
            if mod not in seen:
                seen.add(mod)
                plan.append(ModuleLoad(mod, path, params if mod == module_name(name) else ()))

    for arg in names:
        add_tree(*parse_module_arg(arg))
    for arg in files:
        file, params = parse_module_arg(arg)
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"module file '{file}' not found")
        vermagic = modinfo(path, "vermagic").split(" ")[0]
        if vermagic != release:
            raise ConfigError(
                f"{path.name} was built for kernel {vermagic or '?'}, the guest runs {release}",
                hint="rebuild it against that kernel",
            )
        for dep in filter(None, modinfo(path, "depends").split(",")):
            add_tree(dep, ())
        mod = module_name(path.name)
        seen.add(mod)
        plan.append(ModuleLoad(mod, path, params))
    return plan


def _softdeps(modules_dir: Path, loadable: set[str], builtin: set[str]) -> dict[str, list[str]]:
    """``pre:`` soft dependencies, each resolved to one module through modules.alias
    (busybox modprobe ignores softdeps, so the host resolves them)."""
    softdep_file = modules_dir / "modules.softdep"
    if not softdep_file.exists():
        return {}
    known = loadable | builtin
    aliases: dict[str, list[str]] = {}
    for alias_file in (modules_dir / "modules.alias", modules_dir / "modules.builtin.alias"):
        if alias_file.exists():
            for line in alias_file.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == "alias":
                    aliases.setdefault(parts[1], []).append(module_name(parts[2]))
    modinfo = modules_dir / "modules.builtin.modinfo"  # NUL-separated "mod.alias=name"
    if modinfo.exists():
        for entry in modinfo.read_bytes().decode(errors="replace").split("\0"):
            mod, _, alias = entry.partition(".alias=")
            if alias:
                aliases.setdefault(alias, []).append(module_name(mod))
    out: dict[str, list[str]] = {}
    for line in softdep_file.read_text().splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[0] != "softdep":
            continue
        pre = parts[parts.index("pre:") + 1 :] if "pre:" in parts else []
        pre = pre[: pre.index("post:")] if "post:" in pre else pre
        resolved = []
        for name in pre:
            name = module_name(name)
            # a built-in provider needs nothing; else prefer the generic one:
            # CPU-specific implementations may not load under TCG
            candidates = (
                [name]
                if name in known
                else sorted(
                    aliases.get(name, []), key=lambda m: (m not in builtin, not m.endswith("_generic"))
                )
            )
            resolved += [c for c in candidates if c in known][:1]
        out[module_name(parts[1])] = resolved
    return out


def read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox insmod may not read .ko.xz (6.12)."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix in (".zst", ".gz"):
        raise AssetError(f"unsupported module compression: {path.name}")
    return data
