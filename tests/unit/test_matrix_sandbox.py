"""The module build sandbox of `vmpod matrix`, with real bwrap and real make:
a hostile Makefile cannot write the headers or /etc, reach the network, read
/root, the host's processes or vmpod's environment, or outlive its build."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from pathlib import Path

import pytest

from vmpod.errors import ConfigError
from vmpod.guest.headers import headers_dir
from vmpod.guest.kernel import load_cached
from vmpod.matrix import build
from vmpod.matrix.build import SANDBOX_ID, build_module, require_bwrap
from vmpod.paths import default_paths

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

# Stand-in for a kernel's kbuild dir: hands the module's own Makefile to make,
# as kbuild does with a module's Kbuild/Makefile.
_FAKE_HEADERS = "modules:\n\t@$(MAKE) --no-print-directory -C $(M) -f Makefile M=$(M) HEADERS=$(CURDIR)\n"
_PROBES = r"""
probe() { if sh -c "$2" >/dev/null 2>&1; then echo "PROBE $1 DONE"; else echo "PROBE $1 blocked"; fi; }
probe headers "touch $HEADERS/pwned"
probe etc "touch /etc/vmpod-pwned"
probe net "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", $PORT), 3)'"
probe root "ls /root"
probe secret "cat $SECRET"
echo "ENV $(cat /proc/[0-9]*/environ 2>/dev/null | tr '\0' ' ') $(env | tr '\n' ' ')"
echo "ID $(id -u):$(id -g) $(grep CapEff /proc/self/status)"
echo "PIDS $(ls -d /proc/[0-9]* | wc -l)"
touch m.ko
"""
MARKER = "VMPOD_SANDBOX_TEST_MARKER"


def _module(tmp_path: Path, makefile: str) -> tuple[Path, Path]:
    src, headers = tmp_path / "src", tmp_path / "headers"
    src.mkdir()
    headers.mkdir()
    (headers / "Makefile").write_text(_FAKE_HEADERS)
    (src / "Makefile").write_text(makefile)
    return src, headers


def _lines(log: str, prefix: str) -> list[str]:
    return [ln for ln in log.splitlines() if ln.startswith(prefix)]


def test_hostile_makefile_is_contained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MARKER, "host-secret")
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0)
    port = listener.getsockname()[1]
    script = tmp_path / "src-probes.sh"
    script.write_text(_PROBES)
    makefile = f"all:\n\tPORT={port} SECRET={secret} HEADERS=$(HEADERS) sh ./probes.sh\n"
    src, headers = _module(tmp_path, makefile)
    shutil.copy(script, src / "probes.sh")
    res = asyncio.run(build_module(src, headers, tmp_path / "work"))
    assert res.ok, res.log  # the build itself ran and produced its .ko
    probes = _lines(res.log, "PROBE ")
    assert len(probes) == 5 and all(p.endswith("blocked") for p in probes), probes
    assert not (headers / "pwned").exists() and not Path("/etc/vmpod-pwned").exists()
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing reached the host's loopback
    listener.close()
    (env,) = _lines(res.log, "ENV ")
    assert MARKER not in env and "s3cret" not in env
    (ident,) = _lines(res.log, "ID ")
    assert ident.split() == ["ID", f"{SANDBOX_ID}:{SANDBOX_ID}", "CapEff:", "0000000000000000"]
    (pids,) = _lines(res.log, "PIDS ")
    assert int(pids.split()[1]) < 10  # its own pid namespace, not the host's processes


def _running(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("finish", ["times out", "exits"])
def test_background_processes_die_with_the_build(tmp_path: Path, finish: str) -> None:
    # a leftover holds the log pipe: before the sandbox the step waited for it forever
    tail = "sleep 987654" if finish == "times out" else "touch m.ko"
    src, headers = _module(tmp_path, f"all:\n\tsleep 987653 & \n\t{tail}\n")
    res = asyncio.run(build_module(src, headers, tmp_path / "work", timeout=5))
    assert res.ok == (finish == "exits"), res.log
    if finish == "times out":
        assert "build timed out after 5s" in res.log
    assert _running("sleep 98765") == []


def test_missing_bwrap_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vmpod.matrix.build.shutil.which", lambda _name: None)
    with pytest.raises(ConfigError) as err:
        require_bwrap()
    assert str(err.value).endswith("(apt-get install bubblewrap)")
    src, headers = _module(tmp_path, "all:\n\ttouch m.ko\n")
    with pytest.raises(ConfigError, match="bwrap is not installed"):
        asyncio.run(build_module(src, headers, tmp_path / "work"))
    assert not (tmp_path / "work").exists()  # nothing ran, nothing left


def _cached_headers() -> Path | None:
    kernel = load_cached(default_paths(), "6.1")
    return headers_dir(kernel) if kernel is not None else None


@pytest.mark.skipif(_cached_headers() is None, reason="no cached 6.1 headers (the VM tests fetch them)")
def test_real_module_builds_and_cannot_touch_the_headers(tmp_path: Path) -> None:
    headers = _cached_headers()
    assert headers is not None
    before = {p: p.stat().st_mtime_ns for p in headers.parent.parent.parent.rglob("*") if not p.is_symlink()}
    res = asyncio.run(build_module(REPO / "examples/modules/vmpod_echo", headers, tmp_path / "ok"))
    assert res.ok, res.log
    assert [m.name for m in res.modules] == ["vmpod_echo.ko"]
    assert res.modules[0].stat().st_uid == SANDBOX_ID
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "Kbuild").write_text(
        "obj-m += h.o\n$(shell touch $(srctree)/pwned; echo x >> $(srctree)/Makefile)\n"
        "$(info WROTE $(shell test -e $(srctree)/pwned && echo yes || echo no))\n"
    )
    (hostile / "h.c").write_text('#include <linux/module.h>\nMODULE_LICENSE("GPL");\n')
    res = asyncio.run(build_module(hostile, headers, tmp_path / "h"))
    assert "WROTE no" in res.log, res.log
    after = {p: p.stat().st_mtime_ns for p in headers.parent.parent.parent.rglob("*") if not p.is_symlink()}
    assert after == before  # the shared cache is as it was
    assert os.access(headers, os.W_OK)  # (read-only only inside the sandbox)


def test_cli_refuses_without_bwrap_before_fetching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from vmpod.cli.matrix_cmd import matrix

    def no_fetch(*_a: object, **_k: object) -> None:
        raise AssertionError("fetched a kernel")

    monkeypatch.setattr("vmpod.guest.assets.ensure_assets", no_fetch)
    monkeypatch.setattr("vmpod.matrix.build.shutil.which", lambda _name: None)
    src, _ = _module(tmp_path, "all:\n")
    test = tmp_path / "t.sh"
    test.write_text("true\n")
    argv = ["--kernels", "6.1", "--module-src", str(src), "--test", str(test), "--logs", str(tmp_path / "l")]
    res = CliRunner().invoke(matrix, argv)
    assert res.exit_code == 125, res.output
    assert "bwrap is not installed (apt-get install bubblewrap)" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_headers_that_include_another_tree_build(tmp_path: Path) -> None:
    # A cached Debian kernel's Makefile includes its -common dir by absolute path,
    # which points where the cache was when it was unpacked (the VM tests' seeded
    # home): that tree is mounted read-only too, and nothing else is.
    common = tmp_path / "old-cache/usr/src/linux-headers-6.1-common"
    common.mkdir(parents=True)
    (common / "Makefile").write_text(_FAKE_HEADERS)
    headers = tmp_path / "cache/usr/src/linux-headers-6.1-cloud"
    headers.mkdir(parents=True)
    (headers / "Makefile").write_text(f"include {common}/Makefile\n-include /usr/share/nothing/Makefile\n")
    assert build.headers_roots(headers) == [tmp_path / "cache", tmp_path / "old-cache"]
    src = tmp_path / "src"
    src.mkdir()
    (src / "Makefile").write_text("all:\n\ttouch m.ko\n\ttouch $(HEADERS)/pwned || true\n")
    res = asyncio.run(build_module(src, headers, tmp_path / "work"))
    assert res.ok, res.log
    assert not (headers / "pwned").exists()


def test_a_ko_symlink_to_a_host_file_is_not_shipped(tmp_path: Path) -> None:
    # inside the sandbox /etc/hostname is not there; outside, vmpod (root) would read it
    src, headers = _module(tmp_path, "all:\n\tln -s /etc/hostname m.ko\n\ttouch real.ko\n")
    res = asyncio.run(build_module(src, headers, tmp_path / "work"))
    assert [m.name for m in res.modules] == ["real.ko"], res.log
    assert "ignored .ko files that are not regular files (symlinks): m.ko" in res.log
