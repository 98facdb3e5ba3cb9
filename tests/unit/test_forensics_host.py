"""Host-side capture (--runc, --podman) without a working host CRIU: the checks
that say why it cannot work here (real criu and fakes), and the runc path's
order and archive against a real overlay mount with fake runc/criu tools."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpod.errors import ForensicsError
from vmpod.forensics import archive as a
from vmpod.forensics import host
from vmpod.paths import Paths

_ALL_CAPS = "CapEff:\t000001ffffffffff\n"


def _tool(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def _status(tmp_path: Path, caps: str) -> str:
    path = tmp_path / "status"
    path.write_text(f"Name:\tx\n{caps}")
    return str(path)


def test_real_criu_here_agrees_with_criu_check(tmp_path: Path) -> None:
    found = host.host_criu()
    check = subprocess.run(["criu", "check"], capture_output=True, check=False)
    assert found.version and found.version[0].isdigit()
    if check.returncode != 0:  # this host: CRIU 3.17 and a 6.18 kernel
        assert not found.ok and "`criu check` fails: " in found.detail
        assert check.stderr.decode().count("Error (") >= 1
    else:
        assert found.ok or "vmpod runs without CAP_" in found.detail


def test_each_failing_check_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    _tool(
        bin_dir,
        "criu",
        'case "$1" in --version) echo "Version: 9.9";; check) '
        'echo "Error (criu/vdso.c:1): vdso: Unexpected rt vDSO area bounds" >&2; exit 1;; esac\n',
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    found = host.host_criu(_status(tmp_path, "CapEff:\t000001fffeffffff\n"))
    assert not found.ok and found.version == "9.9"
    assert "`criu check` fails: vdso: Unexpected rt vDSO area bounds (criu/vdso.c:1)" in found.detail
    assert "cannot parse the vDSO" in found.detail
    assert "without CAP_SYS_RESOURCE" in found.detail and "CAP_SYS_ADMIN" not in found.detail

    _tool(bin_dir, "criu", 'case "$1" in --version) echo "Version: 9.9";; esac\n')
    assert host.host_criu(_status(tmp_path, _ALL_CAPS)).ok
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert host.host_criu().detail == "criu is not installed (apt-get install criu)"


def test_capture_refuses_with_the_reason_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host, "host_criu", lambda: host.HostCriu(False, "3.17.1", "`criu check` fails: vdso"))
    paths = Paths(home=tmp_path / "home", run=tmp_path / "run")
    req = host.HostCaptureRequest("runc", "web", tmp_path / "a.tar")
    with pytest.raises(
        ForensicsError, match="host-side capture needs CRIU to work on this host: `criu check`"
    ):
        host.capture_host(paths, req)
    assert not (tmp_path / "a.tar").exists() and not list((tmp_path / "home").glob("tmp/*"))


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[Path]:
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "etc").mkdir()
    (lower / "etc" / "motd").write_text("hi\n")
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], check=True)
    (merged / "data.log").write_text("1\n2\n")
    (merged / "etc" / "motd").unlink()
    yield merged
    subprocess.run(["umount", str(merged)], check=True)


def test_runc_capture_pauses_diffs_dumps_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overlay: Path
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text('{"ociVersion": "1.0.2", "process": {"args": ["sh"]}}')
    state = {"id": "web", "status": "running", "bundle": str(bundle), "rootfs": str(overlay), "created": "t"}
    log = tmp_path / "runc.log"
    bin_dir = tmp_path / "bin"
    _tool(
        bin_dir,
        "runc",
        f'echo "$*" >> {log}\n'
        'while [ "$1" = --root ]; do shift 2; done\n'
        f"case \"$1\" in --version) echo 'runc version 1.1.5';; state) echo '{json.dumps(state)}';;\n"
        ' checkpoint) mkdir -p "$3" "$5"; echo img > "$3/inventory.img"; echo log > "$5/dump.log";; esac\n',
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(host, "host_criu", lambda: host.HostCriu(True, "4.1.1", "ok"))
    paths = Paths(home=tmp_path / "home", run=tmp_path / "run")
    out = tmp_path / "evidence.tar"
    got = host.capture_host(paths, host.HostCaptureRequest("runc", "web", out, root="/run/r"))

    calls = log.read_text().splitlines()
    verbs = [c.split()[2] for c in calls if c.startswith("--root /run/r")]
    assert verbs == ["state", "pause", "checkpoint", "resume"]
    assert any("--leave-running web" in c for c in calls)
    assert a.verify(out).ok and got.manifest.criu == "4.1.1" and got.manifest.guest_kernel == ""
    assert got.manifest.container["name"] == "web" and got.manifest.leave_running
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        spec = tar.extractfile(a.SPEC_DUMP)
        diff = tar.extractfile(a.ROOTFS_DIFF)
        deleted = tar.extractfile(a.DELETED_FILES)
        assert spec and diff and deleted
        assert json.loads(spec.read())["process"]["args"] == ["sh"]
        with tarfile.open(fileobj=io.BytesIO(diff.read())) as d:
            assert "data.log" in d.getnames()
        assert json.loads(deleted.read()) == ["/etc/motd"]
    assert {"checkpoint/inventory.img", "dump.log", "config.dump"} <= names
    assert not list((tmp_path / "home" / "tmp").iterdir())


def test_runc_root_that_is_no_overlay_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"id": "web", "status": "running", "bundle": str(tmp_path), "rootfs": str(tmp_path)}
    bin_dir = tmp_path / "bin"
    _tool(bin_dir, "runc", f"echo '{json.dumps(state)}'\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(host, "host_criu", lambda: host.HostCriu(True, "4.1.1", "ok"))
    paths = Paths(home=tmp_path / "home", run=tmp_path / "run")
    with pytest.raises(ForensicsError, match="is not an overlay mount"):
        host.capture_host(paths, host.HostCaptureRequest("runc", "web", tmp_path / "a.tar"))
