"""Kernel headers + kbuild for out-of-tree module builds, from Debian packages.

Debian splits them into linux-headers-<release>, linux-headers-<abi>-common and
linux-kbuild-<series>, all expecting to live in /usr/src and /usr/lib. We unpack
them under the kernel's cache dir and relocate the one absolute path that
matters (the release Makefile's ``include /usr/src/...``); the other links are
relative and keep working.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from vmpod.errors import AssetError
from vmpod.fsutil import owned_tmpdir
from vmpod.guest.kernel import Kernel
from vmpod.paths import Paths
from vmpod.proc import run


def headers_dir(kernel: Kernel) -> Path | None:
    """The kbuild directory (``make -C DIR M=...``) if headers are installed."""
    local = kernel.root / "headers.path"
    if local.is_file():  # a local kernel added with --headers
        path = Path(local.read_text().strip())
        return path if path.is_dir() else None
    build = kernel.root / "headers" / "usr/src" / f"linux-headers-{kernel.release}"
    return build if (build / "Makefile").is_file() else None


def ensure_headers(paths: Paths, kernel: Kernel) -> Path:
    """Headers for ``kernel`` (Debian kernels only), downloading them on first use."""
    found = headers_dir(kernel)
    if found is not None:
        return found
    if kernel.package == "local":
        raise AssetError(f"kernel {kernel.release} has no headers", hint="add it again with --headers DIR")
    top = f"linux-headers-{kernel.release}"
    deps = run(
        ["apt-cache", "depends", top], what=f"resolve {top}", hint="run 'apt-get update'"
    ).stdout.decode()
    packages = [top] + [
        d for d in re.findall(r"Depends: (\S+)", deps) if d.startswith(("linux-headers-", "linux-kbuild-"))
    ]
    paths.tmp.mkdir(parents=True, exist_ok=True)
    with owned_tmpdir(paths.tmp, "headers-") as tmp:
        work = Path(tmp)
        run(
            ["apt-get", "download", "-q", *packages],
            what=f"download headers of {kernel.release}",
            cwd=work,
            hint="run 'apt-get update' and check that the Debian mirror is reachable",
        )
        tree = work / "tree"
        for deb in sorted(work.glob("*.deb")):
            run(["dpkg-deb", "-x", deb, tree], what=f"unpack {deb.name}")
        final = kernel.root / "headers"
        build = tree / "usr/src" / top
        makefile = build / "Makefile"
        if not makefile.is_file():
            raise AssetError(f"{top} has no Makefile: unexpected package layout")
        makefile.write_text(makefile.read_text().replace("/usr/src/", f"{final}/usr/src/"))
        shutil.rmtree(tree / "usr/share", ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        tree.rename(final)
    result = headers_dir(kernel)
    assert result is not None
    return result
