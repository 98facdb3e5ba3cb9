"""Guest kernels from Debian packages: resolve a name, fetch, unpack, prepare for boot.

A kernel lives in ``<home>/kernels/<release>/`` with ``kernel.json`` written last,
so a half-built directory is never mistaken for a usable one.
"""

from __future__ import annotations

import gzip
import json
import lzma
import re
import shutil
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from vmpod.errors import AssetError, CommandError, ConfigError
from vmpod.fsutil import atomic_write, owned_tmpdir
from vmpod.paths import Paths
from vmpod.proc import run

DEFAULT_KERNEL = "6.1"
# Names users type: a series with an optional flavour ("6.1", "6.12-generic",
# "debian:6.12-amd64", "6.1-rt"; the newest package of it wins) or an exact
# release ("debian:6.1.0-47-cloud-amd64"). No flavour means cloud: it boots fastest.
_SERIES_RE = re.compile(
    r"^(?P<series>[0-9]+\.[0-9]+)(?:-(?P<flavour>cloud|rt|generic|amd64|cloud-amd64|rt-amd64))?$"
)
_FLAVOURS = {
    None: "cloud-",
    "cloud": "cloud-",
    "cloud-amd64": "cloud-",
    "rt": "rt-",
    "rt-amd64": "rt-",
    "generic": "",
    "amd64": "",
}
_RELEASE_RE = re.compile(r"^[0-9]+\.[0-9]+[0-9A-Za-z.+_-]*$")
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,127}$")  # catalog keys and names
_EXACT_RE = re.compile(r"^[0-9]+\.[0-9]+(\.[0-9]+)?(-[0-9]+|\+deb[0-9]+)-(cloud-|rt-)?amd64$")


@dataclass(frozen=True)
class Kernel:
    """An unpacked guest kernel ready to boot."""

    release: str  # what `uname -r` prints in the guest
    package: str  # Debian package it came from
    version: str  # Debian package version
    root: Path  # cache directory of this kernel
    pvh: bool  # vmlinux has a PVH entry point (boots without decompression)

    @property
    def id(self) -> str:
        """Catalog key: the release for Debian kernels, ``local-NAME`` for local ones
        (so a local build never replaces a Debian kernel of the same release)."""
        return self.root.name

    @property
    def bzimage(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def vmlinux(self) -> Path:
        return self.root / "vmlinux"

    @property
    def boot_image(self) -> Path:
        """The file QEMU's ``-kernel`` gets: the ELF vmlinux (PVH) when it has one."""
        return self.vmlinux if self.pvh else self.bzimage

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib/modules" / self.release

    @property
    def config(self) -> Path:
        return self.root / "config"


def load_cached(paths: Paths, name: str) -> Kernel | None:
    """The cached kernel for ``name`` (alias, release or debian:release), if any."""
    key = _alias_index(paths).get(name, _strip(name))
    meta = paths.kernels / key / "kernel.json"
    if not _KEY_RE.match(key) or not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    return Kernel(
        release=data["release"],
        package=data["package"],
        version=data["version"],
        root=meta.parent,
        pvh=bool(data["pvh"]),
    )


def ensure_kernel(paths: Paths, name: str = DEFAULT_KERNEL) -> Kernel:
    """Cached kernel for ``name``, fetching and unpacking it on first use."""
    cached = load_cached(paths, name)
    if cached is not None:
        return cached
    package = resolve_package(name)
    kernel = _fetch(paths, package)
    index = _alias_index(paths)
    index[name] = kernel.id
    _write_json(paths.kernels / "aliases.json", index)
    return kernel


def add_local(
    paths: Paths, vmlinuz: Path, modules: Path, headers: Path | None = None, name: str = ""
) -> Kernel:
    """Catalog a kernel built elsewhere: a bzImage (or ELF vmlinux), its modules
    directory (lib/modules/<release>, whose name is the release) and optionally a
    kbuild directory for module builds. Boots as given; modules are re-indexed."""
    if not vmlinuz.is_file():
        raise ConfigError(f"kernel image '{vmlinuz}' not found")
    if not modules.is_dir():
        raise ConfigError(
            f"modules directory '{modules}' not found",
            hint="pass the lib/modules/<release> directory of that kernel",
        )
    release = modules.name
    if not _RELEASE_RE.match(release):
        raise ConfigError(
            f"'{modules}' is not named after a kernel release",
            hint="pass the lib/modules/<release> directory itself",
        )
    key = f"local-{name or release}"
    if name and not _KEY_RE.match(name):
        raise ConfigError(f"invalid kernel name '{name}'", hint="use letters, digits, . _ + -")
    if headers is not None and not (headers / "Makefile").is_file():
        raise ConfigError(f"'{headers}' is not a kernel build directory (no Makefile)")
    paths.tmp.mkdir(parents=True, exist_ok=True)
    paths.kernels.mkdir(parents=True, exist_ok=True)
    with owned_tmpdir(paths.tmp, "kernel-") as tmp:
        out = Path(tmp) / "out"
        (out / "lib/modules").mkdir(parents=True)
        shutil.copytree(
            modules,
            out / "lib/modules" / release,
            symlinks=True,
            ignore=shutil.ignore_patterns("build", "source"),
        )
        run(["depmod", "-b", out, release], what=f"index modules of {release}")
        data = vmlinuz.read_bytes()
        is_elf = data[:4] == b"\x7fELF"
        (out / ("vmlinux" if is_elf else "vmlinuz")).write_bytes(data)
        config = modules / "build" / ".config"
        (out / "config").write_text(config.read_text() if config.is_file() else "")
        if headers is not None:
            (out / "headers.path").write_text(str(headers.resolve()))
        _write_json(
            out / "kernel.json", {"release": release, "package": "local", "version": "local", "pvh": is_elf}
        )
        final = paths.kernels / key
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
    index = _alias_index(paths)
    if name:
        index[name] = key
    _write_json(paths.kernels / "aliases.json", index)
    kernel = load_cached(paths, key)
    assert kernel is not None
    return kernel


def remove(paths: Paths, name: str) -> str:
    """Delete a cached kernel and the names that point at it; returns its release."""
    kernel = load_cached(paths, name)
    if kernel is None:
        raise ConfigError(f"kernel '{name}' is not in the catalog", hint="see 'vmpod kernel list'")
    shutil.rmtree(kernel.root)
    index = {k: v for k, v in _alias_index(paths).items() if v != kernel.id}
    _write_json(paths.kernels / "aliases.json", index)
    for initrd in paths.guest.glob(f"initramfs-{kernel.id}-*.cpio"):
        initrd.unlink()
    return kernel.id


def aliases_of(paths: Paths, key: str) -> list[str]:
    """Short names that point at the kernel with catalog key ``key``."""
    return sorted(k for k, v in _alias_index(paths).items() if v == key and k != key)


def cached_kernels(paths: Paths) -> list[Kernel]:
    """Every complete kernel in the cache."""
    found = []
    for meta in sorted(paths.kernels.glob("*/kernel.json")):
        k = load_cached(paths, meta.parent.name)
        if k is not None:
            found.append(k)
    return found


def resolve_package(name: str) -> str:
    """Debian package name for a kernel name, asking apt (newest version wins)."""
    bare = _strip(name)
    series = _SERIES_RE.match(bare)
    if series:
        flavour = _FLAVOURS[series.group("flavour")]
        pattern = (
            rf"linux-image-{re.escape(series.group('series'))}"
            rf"(\.0-[0-9]+|\.[0-9]+\+deb[0-9]+)-{flavour}amd64(-unsigned)?"
        )
    elif _EXACT_RE.match(bare):
        pattern = rf"linux-image-{re.escape(bare)}(-unsigned)?"
    elif name.startswith("debian:") or _RELEASE_RE.match(name):
        raise ConfigError(
            f"invalid kernel name '{name}'", hint="use e.g. 6.1, 6.12-generic or debian:6.1.0-47-amd64"
        )
    else:
        raise ConfigError(
            f"unknown kernel '{name}'",
            hint="use 6.1, 6.1-generic, 6.1-rt, 6.12, 6.12-generic, "
            "debian:RELEASE or a kernel from 'vmpod kernel list'",
        )
    names = _apt_names(pattern)
    if not names:
        raise ConfigError(
            f"kernel '{name}' not found in the Debian package lists",
            hint="check the name, or run 'apt-get update'",
        )
    return names[-1]


def _apt_names(pattern: str) -> list[str]:
    prefix = re.match(r"[a-z0-9-]+", pattern)
    assert prefix is not None
    out = run(
        ["apt-cache", "pkgnames", prefix.group(0)], what="list kernel packages", timeout=60
    ).stdout.decode()
    rx = re.compile(pattern + "$")
    names = [n for n in out.split() if rx.match(n)]
    # newest version last; at equal version prefer the signed package
    return sorted(
        names, key=lambda n: ([int(x) for x in re.findall(r"[0-9]+", n)], not n.endswith("-unsigned"))
    )


def _fetch(paths: Paths, package: str) -> Kernel:
    """Download the package (apt verifies it against the signed archive), unpack it."""
    paths.tmp.mkdir(parents=True, exist_ok=True)
    paths.kernels.mkdir(parents=True, exist_ok=True)
    with owned_tmpdir(paths.tmp, "kernel-") as tmp:
        work = Path(tmp)
        deb = _download(package, work)
        version = run(["dpkg-deb", "-f", deb, "Version"], what="read kernel package").stdout
        tree = work / "tree"
        run(["dpkg-deb", "-x", deb, tree], what=f"unpack {package}")
        kernel = _assemble(paths, tree, work / "out", package, version.decode().strip())
        final = paths.kernels / kernel.release
        if final.exists():
            shutil.rmtree(final)
        (work / "out").rename(final)
        return Kernel(kernel.release, kernel.package, kernel.version, final, kernel.pvh)


def _download(package: str, work: Path) -> Path:
    run(
        ["apt-get", "download", "-q", package],
        what=f"download {package}",
        cwd=work,
        hint="run 'apt-get update' and check that the Debian mirror is reachable",
    )
    debs = list(work.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise AssetError(f"download of {package} produced {len(debs)} packages")
    return debs[0]


def _assemble(paths: Paths, tree: Path, out: Path, package: str, version: str) -> Kernel:
    boot = tree / "boot"
    images = sorted(boot.glob("vmlinuz-*"))
    if not images:
        raise AssetError(f"{package} has no /boot/vmlinuz-*: not a kernel image package")
    release = images[0].name.removeprefix("vmlinuz-")
    mods = next(
        (p for p in (tree / "lib/modules" / release, tree / "usr/lib/modules" / release) if p.is_dir()), None
    )
    if mods is None:
        raise AssetError(f"{package} ships no modules for {release}")
    out.mkdir()
    shutil.copy2(images[0], out / "vmlinuz")
    shutil.copy2(boot / f"config-{release}", out / "config")
    shutil.copy2(boot / f"System.map-{release}", out / "System.map")
    # depmod wants <base>/lib/modules/<release>; Debian packages ship no modules.dep.
    (out / "lib/modules").mkdir(parents=True)
    mods.rename(out / "lib/modules" / release)
    run(["depmod", "-b", out, release], what=f"index modules of {release}")
    pvh = "CONFIG_PVH=y" in (out / "config").read_text().splitlines()
    if pvh:
        try:
            (out / "vmlinux").write_bytes(extract_vmlinux((out / "vmlinuz").read_bytes()))
        except AssetError:
            pvh = False  # fall back to the bzImage: slower under TCG but boots
    _write_json(out / "kernel.json", {"release": release, "package": package, "version": version, "pvh": pvh})
    return Kernel(release, package, version, out, pvh)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage, located by the boot protocol header.

    Booting the ELF through its PVH entry skips in-guest decompression, which is
    slow under TCG (field notes: 2.5 s for XZ).
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise AssetError("not a bzImage (no HdrS boot header)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    elf = _decompress(payload)
    if elf[:4] != b"\x7fELF" or elf[18:20] != b"\x3e\x00":
        raise AssetError("bzImage payload is not an x86-64 ELF kernel")
    return elf


def _decompress(payload: bytes) -> bytes:
    try:
        if payload[:2] == b"\x1f\x8b":
            return gzip.decompress(payload)
        if payload[:6] == b"\xfd7zXZ\x00":
            dec = lzma.LZMADecompressor()
            out = dec.decompress(payload)
            if not dec.eof:
                raise AssetError("kernel payload is truncated (xz stream has no end)")
            return out
    except (OSError, lzma.LZMAError, EOFError, zlib.error) as err:
        raise AssetError(f"cannot decompress kernel payload: {err}") from err
    tools = {b"\x02\x21\x4c\x18": ["lz4", "-dc"], b"\x28\xb5\x2f\xfd": ["zstd", "-dcq"]}
    argv = tools.get(payload[:4])
    if argv is None:
        raise AssetError(f"unsupported kernel compression (magic {payload[:4].hex()})")
    # lz4 exits 1 on the size trailer the kernel appends; the ELF check validates output.
    try:
        return run(argv, what="unpack the kernel payload", input=payload, timeout=120, check=False).stdout
    except CommandError as err:  # the caller falls back to the bzImage on AssetError
        raise AssetError(err.message, hint=err.hint) from err


def _strip(name: str) -> str:
    return name.removeprefix("debian:")


def _alias_index(paths: Paths) -> dict[str, str]:
    try:
        data = json.loads((paths.kernels / "aliases.json").read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_json(path: Path, data: object) -> None:
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True).encode())


def kernel_summary(k: Kernel) -> dict[str, object]:
    """Plain dict for `vmpod doctor` / JSON output."""
    return {**asdict(k), "root": str(k.root)}
