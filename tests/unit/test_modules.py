"""Boot module load order from a synthetic modules.dep / modules.builtin."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from vmpod.errors import AssetError
from vmpod.guest.modules import load_order, module_name, plan_modules, read_module

V = "kernel/drivers/virtio"
DEP = f"""\
{V}/virtio_mmio.ko.xz: {V}/virtio_ring.ko.xz {V}/virtio.ko.xz
{V}/virtio_ring.ko.xz: {V}/virtio.ko.xz
{V}/virtio.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz: {V}/virtio_ring.ko.xz {V}/virtio.ko.xz
kernel/drivers/char/virtio_console.ko.xz: {V}/virtio_ring.ko.xz {V}/virtio.ko.xz
kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko.xz kernel/crypto/crc32c-generic.ko.xz
kernel/lib/libcrc32c.ko.xz: kernel/crypto/crc32c-generic.ko.xz
kernel/crypto/crc32c-generic.ko.xz:
kernel/fs/overlayfs/overlay.ko.xz:
kernel/fs/fuse/virtiofs.ko.xz: {V}/virtio.ko.xz {V}/virtio_ring.ko.xz kernel/fs/fuse/fuse.ko.xz
kernel/fs/fuse/fuse.ko.xz:
kernel/fs/fuse/cuse.ko.xz: kernel/fs/fuse/fuse.ko.xz
kernel/net/9p/9pnet.ko.xz:
"""


def moddir(tmp_path: Path, dep: str = DEP, builtin: str | None = None) -> Path:
    d = tmp_path / "lib/modules/6.1.0-test"
    d.mkdir(parents=True)
    (d / "modules.dep").write_text(dep)
    if builtin is not None:
        (d / "modules.builtin").write_text(builtin)
    return d


def names(paths: list[Path]) -> list[str]:
    return [module_name(str(p)) for p in paths]


@pytest.mark.parametrize(
    "path,name",
    [
        ("kernel/drivers/virtio/virtio_mmio.ko.xz", "virtio_mmio"),
        ("kernel/drivers/virtio/virtio_mmio.ko", "virtio_mmio"),
        ("kernel/crypto/crc32c-generic.ko.zst", "crc32c_generic"),
        ("kernel/fs/fuse/cuse.ko.gz", "cuse"),
        ("/abs/path/snd-hda-intel.ko", "snd_hda_intel"),
        ("virtio-blk", "virtio_blk"),
        ("kernel/net/9p/9pnet_virtio.ko.xz", "9pnet_virtio"),
    ],
)
def test_module_name(path: str, name: str) -> None:
    assert module_name(path) == name


def test_dependencies_first_each_once(tmp_path: Path) -> None:
    d = moddir(tmp_path)
    order = load_order(d)
    assert names(order) == [
        "virtio",
        "virtio_ring",
        "virtio_mmio",
        "virtio_blk",
        "virtio_console",
        "crc32c_generic",
        "libcrc32c",
        "erofs",
        "overlay",
        "fuse",
        "virtiofs",
    ]
    assert order[0] == d / f"{V}/virtio.ko.xz"
    assert all(p.is_relative_to(d) for p in order)
    assert order[-1] == d / "kernel/fs/fuse/virtiofs.ko.xz"


def test_every_dependency_precedes_its_user(tmp_path: Path) -> None:
    d = moddir(tmp_path)
    order = names(load_order(d, ("erofs", "virtio_console", "virtio_mmio")))
    deps = {
        module_name(line.partition(":")[0]): [module_name(x) for x in line.partition(":")[2].split()]
        for line in DEP.splitlines()
    }
    for i, m in enumerate(order):
        for dep in deps[m]:
            assert order.index(dep) < i, (dep, m)
    assert len(order) == len(set(order))


def test_builtins_are_skipped(tmp_path: Path) -> None:
    builtin = f"{V}/virtio.ko\n{V}/virtio_ring.ko\n{V}/virtio_mmio.ko\nkernel/fs/overlayfs/overlay.ko\n"
    d = moddir(tmp_path, builtin=builtin)
    assert names(load_order(d)) == [
        "virtio_blk",
        "virtio_console",
        "crc32c_generic",
        "libcrc32c",
        "erofs",
        "fuse",
        "virtiofs",
    ]


def test_builtin_module_missing_from_dep_is_fine(tmp_path: Path) -> None:
    d = moddir(tmp_path, dep="kernel/fs/erofs/erofs.ko:\n", builtin="kernel/fs/overlayfs/overlay.ko\n")
    assert names(load_order(d, ("erofs", "overlay"))) == ["erofs"]


def test_missing_module_is_asset_error(tmp_path: Path) -> None:
    d = moddir(tmp_path)
    with pytest.raises(AssetError, match="'virtio_gpu' is missing"):
        load_order(d, ("virtio_gpu",))


def test_missing_dependency_is_asset_error(tmp_path: Path) -> None:
    d = moddir(tmp_path, dep="kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko\n")
    with pytest.raises(AssetError, match="libcrc32c"):
        load_order(d, ("erofs",))


def test_missing_modules_dep_file(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_order(tmp_path, ("erofs",))


def test_wanted_names_with_dashes_normalised(tmp_path: Path) -> None:
    d = moddir(tmp_path)
    assert names(load_order(d, ("virtio-blk", "crc32c-generic"))) == [
        "virtio",
        "virtio_ring",
        "virtio_blk",
        "crc32c_generic",
    ]


VSOCK_DEP = """\
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz: kernel/net/vmw_vsock/vsock.ko.xz \
kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz
kernel/net/vmw_vsock/vsock.ko.xz:
kernel/drivers/net/dummy.ko.xz:
"""


def test_default_order_is_what_the_guest_boots_with(tmp_path: Path) -> None:
    # With no list, load_order gives what /init insmods: the virtio-mmio transport, the
    # block and console devices, erofs (guest root), overlay (container roots) and
    # virtiofs (the host's shared directory), each after what it needs; the rest of
    # the tree (9p; cuse; vsock, which /init adds only for vmpod.channel=vsock; other
    # drivers) stays out.
    d = moddir(tmp_path, dep=DEP + VSOCK_DEP)
    loaded = names(load_order(d))
    assert {"virtio_mmio", "virtio_blk", "virtio_console", "erofs", "overlay", "fuse", "virtiofs"} <= set(
        loaded
    )
    assert loaded.index("fuse") < loaded.index("virtiofs")
    assert not {"9pnet", "cuse", "vsock", "vmw_vsock_virtio_transport", "dummy"} & set(loaded)


def test_modules_asked_for_skip_those_loaded_at_boot(tmp_path: Path) -> None:
    # A module the guest loads at boot (and its dependencies) is never loaded twice.
    d = moddir(tmp_path, dep=DEP + VSOCK_DEP)
    plan = plan_modules(
        d, "6.1.0-test", names=("virtio_blk", "vmw_vsock_virtio_transport", "dummy=numdummies=2")
    )
    assert [(m.name, m.params) for m in plan] == [
        ("vsock", ()),
        ("vmw_vsock_virtio_transport", ()),
        ("dummy", ("numdummies=2",)),
    ]
    assert all(m.file.is_relative_to(d) for m in plan)


def test_dependency_cycle_terminates(tmp_path: Path) -> None:
    d = moddir(tmp_path, dep="a.ko: b.ko\nb.ko: a.ko\n")
    assert sorted(names(load_order(d, ("a",)))) == ["a", "b"]


def test_read_module_xz(tmp_path: Path) -> None:
    raw = b"\x7fELF" + bytes(range(256)) * 40
    f = tmp_path / "erofs.ko.xz"
    f.write_bytes(lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32))
    assert read_module(f) == raw


def test_read_module_plain(tmp_path: Path) -> None:
    f = tmp_path / "erofs.ko"
    f.write_bytes(b"\x7fELFplain")
    assert read_module(f) == b"\x7fELFplain"


@pytest.mark.parametrize("suffix", [".ko.zst", ".ko.gz"])
def test_read_module_unsupported_compression(tmp_path: Path, suffix: str) -> None:
    f = tmp_path / f"erofs{suffix}"
    f.write_bytes(b"whatever")
    with pytest.raises(AssetError, match="unsupported module compression"):
        read_module(f)
