"""The default test image of `vmpod matrix`: busybox, from the guest's own packages."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from vmpod.paths import Paths
from vmpod.proc import run

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"


def busybox_rootfs(paths: Paths, busybox: Path) -> Path:
    """A minimal root filesystem with ``busybox`` and its applet links (built once)."""
    final = paths.images / "busybox-rootfs"
    if (final / "bin/busybox").is_file():
        return final
    paths.images.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=paths.images, prefix="busybox-") as tmp:
        root = Path(tmp) / "rootfs"
        for d in ("bin", "etc", "tmp", "root", "dev", "proc", "sys"):
            (root / d).mkdir(parents=True)
        shutil.copy2(busybox, root / "bin/busybox")
        applets = run([busybox, "--list"], what="list busybox applets", timeout=60).stdout.decode().split()
        for applet in applets:
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        (root / "tmp").chmod(0o1777)
        (root / "etc/passwd").write_text(_PASSWD)
        (root / "etc/group").write_text(_GROUP)
        root.rename(final)
    return final
