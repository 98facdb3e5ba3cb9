"""Overlay rootfs and removal that never crosses a mount (root only: real mounts)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmpod.containers.rootfs import Overlay, is_mounted, mount, unmount
from vmpod.errors import MountError
from vmpod.mounts import remove_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def test_overlay_writes_land_in_the_upper_layer_and_unmount(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_text("image")
    ov = Overlay.of(tmp_path / "rec", lower)
    mount(ov)
    mount(ov)  # idempotent
    try:
        assert (ov.merged / "f").read_text() == "image"
        (ov.merged / "f").write_text("changed")
        assert (ov.upper / "f").read_text() == "changed" and (lower / "f").read_text() == "image"
    finally:
        unmount(ov)
    assert not is_mounted(ov.merged)
    remove_tree(tmp_path / "rec")
    assert not (tmp_path / "rec").exists() and (lower / "f").exists()


def test_remove_tree_refuses_to_cross_a_mount(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "precious").write_text("user data")
    rec = tmp_path / "rec"
    (rec / "mnt").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(volume), str(rec / "mnt")], check=True)
    try:
        with pytest.raises(MountError, match="mounted below"):
            remove_tree(rec)
    finally:
        subprocess.run(["umount", str(rec / "mnt")], check=True)
    assert (volume / "precious").read_text() == "user data"
    (rec / "link").symlink_to(volume)
    remove_tree(rec)
    assert not rec.exists() and (volume / "precious").exists()
