"""Matrix logic without VMs: verdicts, build error extraction, module plans, catalog."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmpod.errors import ConfigError
from vmpod.guest import kernel as kernel_mod
from vmpod.guest.modules import load_order, parse_module_arg
from vmpod.matrix.build import first_error
from vmpod.matrix.verdict import judge
from vmpod.paths import Paths


@pytest.mark.parametrize(
    "line, status",
    [
        ("[ 2.4] BUG: kernel NULL pointer dereference, address: 0000000000000000", "oops"),
        ("[ 2.4] Oops: 0002 [#1] PREEMPT SMP NOPTI", "oops"),
        ("[ 3.0] Kernel panic - not syncing: Fatal exception", "panic"),
        ("[ 1.0] WARNING: CPU: 0 PID: 1 at mm/slub.c:42 foo+0x1/0x2", "warn"),
        ("[ 9.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s!", "bug"),
        ("[ 1.0] UBSAN: shift-out-of-bounds in drivers/x.c:1:2", "bug"),
        ("[ 1.0] vmpod_echo: loaded", "clean"),
    ],
)
def test_judge_lines(line: str, status: str) -> None:
    v = judge(f"[ 0.1] boot\n{line}\n[ 5.0] done")
    assert v.status == status
    if status == "clean":
        assert v.findings == ()
    else:
        assert line in v.findings[0]


def test_most_severe_wins_and_taint() -> None:
    v = judge("WARNING: CPU: 0 PID: 1 at x\nKernel panic - not syncing: y")
    assert v.status == "panic" and len(v.findings) == 2
    # O (12) and E (13) are expected for an out-of-tree module: clean
    assert judge("", tainted=(1 << 12) | (1 << 13)).clean
    assert judge("", tainted=1 << 7).status == "oops"
    assert judge("", tainted=1 << 9).status == "warn"


def test_first_error_prefers_the_module_sources(tmp_path: Path) -> None:
    work = tmp_path / "build"
    log = (
        f"/usr/src/linux/include/linux/init.h:180:22: error: passing argument 1\n"
        f"{work}/api_break.c:13:15: error: too many arguments to function 'class_create'\n"
    )
    assert first_error(log, work) == "api_break.c:13:15: error: too many arguments to function 'class_create'"
    assert "init.h" in first_error(log)
    assert first_error("") == "build failed"


def test_parse_module_arg() -> None:
    assert parse_module_arg("dummy") == ("dummy", ())
    assert parse_module_arg("dummy=numdummies=3 x=1") == ("dummy", ("numdummies=3", "x=1"))
    with pytest.raises(ConfigError):
        parse_module_arg("=x")


def _tree(root: Path) -> Path:
    d = root / "lib/modules/6.1.0-1-amd64"
    (d / "kernel").mkdir(parents=True)
    (d / "modules.dep").write_text(
        "kernel/lib/libcrc32c.ko:\n"
        "kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko\n"
        "kernel/crypto/crc32c_generic.ko:\n"
        "kernel/arch/x86/crypto/crc32c-intel.ko:\n"
    )
    (d / "modules.softdep").write_text("# soft dependencies\nsoftdep libcrc32c pre: crc32c\n")
    (d / "modules.alias").write_text("alias crc32c crc32c_intel\nalias crc32c crc32c_generic\n")
    (d / "modules.builtin").write_text("")
    return d


def test_softdeps_come_first_and_prefer_generic(tmp_path: Path) -> None:
    d = _tree(tmp_path)
    names = [p.name for p in load_order(d, ("erofs",))]
    assert names == ["crc32c_generic.ko", "libcrc32c.ko", "erofs.ko"]


def test_softdep_satisfied_by_a_builtin(tmp_path: Path) -> None:
    d = _tree(tmp_path)
    (d / "modules.builtin").write_text("kernel/crypto/crc32c_generic.ko\n")
    (d / "modules.builtin.modinfo").write_bytes(b"crc32c_generic.alias=crc32c\0")
    names = [p.name for p in load_order(d, ("erofs",))]
    assert names == ["libcrc32c.ko", "erofs.ko"]


def test_local_kernel_never_replaces_a_debian_kernel(tmp_path: Path) -> None:
    paths = Paths(home=tmp_path / "home", run=tmp_path / "run")
    release = "6.1.0-1-amd64"
    debian = paths.kernels / release
    debian.mkdir(parents=True)
    (debian / "kernel.json").write_text(
        json.dumps({"release": release, "package": "linux-image-6.1.0-1-amd64", "version": "1", "pvh": True})
    )
    image = tmp_path / "bzImage"
    image.write_bytes(b"\0" * 1024)
    mods = _tree(tmp_path / "src")
    local = kernel_mod.add_local(paths, image, mods, name="mine")
    assert local.id == "local-mine" and local.release == release
    assert kernel_mod.load_cached(paths, release) is not None  # Debian one intact
    assert kernel_mod.load_cached(paths, "mine") == local
    assert kernel_mod.aliases_of(paths, "local-mine") == ["mine"]
    assert kernel_mod.remove(paths, "mine") == "local-mine"
    assert kernel_mod.load_cached(paths, "mine") is None
    assert (debian / "kernel.json").exists()
    with pytest.raises(ConfigError):
        kernel_mod.add_local(paths, image, tmp_path / "nope")
