"""`vmpod forensics capture --runtime-root DIR ID` against a fake monitor: a
vmpod-runtime container's writable layer is the upper dir of the overlay at its
bundle's root; anything else is refused, as are stopped and crun containers."""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpod.errors import ForensicsError
from vmpod.forensics import archive as a
from vmpod.forensics import capture as cap
from vmpod.paths import Paths
from vmpod.runtime import ipc
from vmpod.runtime.state import PAUSED, RUNNING, ContainerState, Store


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(home=tmp_path / "home", run=tmp_path / "run")


def _container(tmp_path: Path, status: str = RUNNING, alive: bool = True) -> Iterator[Store]:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(
        json.dumps({"ociVersion": "1.0.2", "process": {"args": ["sh", "-c", "x"]}})
    )
    store = Store(tmp_path / "root")
    st = ContainerState(
        id="c1", bundle=str(bundle), rootfs=str(bundle / "merged"), created="t", status=status
    )
    _, lock, mon = store.begin(st)
    os.close(lock)
    if not alive:
        os.close(mon)
    yield store
    if alive:
        os.close(mon)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Store]:
    yield from _container(tmp_path)


def _monitor(calls: list[str], runtime: str = "runc") -> object:
    def request(sock: Path, msg: dict[str, object], timeout: float = 30) -> dict[str, object]:
        assert sock.name == "monitor.sock" and sock.parent.name == "c1"
        op = str(msg["op"]) if msg["op"] != "runtime" else str(msg["command"])
        calls.append(op)
        if op == "guest_facts":
            crit = "Version: 3.17.1\n"
            return {"kernel": "6.1", "runc": "1.1", "criu_status": 0, "criu": crit, "guest_runtime": runtime}
        if op == "checkpoint":
            images = Path(str(msg["dir"])) / "checkpoint"
            images.mkdir(parents=True)
            (images / "inventory.img").write_bytes(b"img")
        return {}

    return request


def _upper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "data.log").write_text("1\n")
    monkeypatch.setattr(cap, "overlay_upper", lambda rootfs: upper)
    return upper


def test_capture_of_a_runtime_container(
    running: Store, tmp_path: Path, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    _upper(tmp_path, monkeypatch)
    calls: list[str] = []
    monkeypatch.setattr(ipc, "request", _monitor(calls))
    out = tmp_path / "e.tar"
    got = cap.capture(paths, cap.CaptureRequest("c1", out, runtime_root=running.root))
    assert calls == ["guest_facts", "pause", "checkpoint", "resume"]
    assert a.verify(out).ok and got.manifest.container["id"] == "c1"
    with tarfile.open(out) as tar:
        fh = tar.extractfile("config.dump")
        assert fh is not None
        dump = json.loads(fh.read())
    assert dump["command"] == ["sh", "-c", "x"] and dump["vmpod"]["runtime_root"] == str(running.root)
    assert dump["vmpod"]["guest_runtime"] == "runc"
    assert not list(paths.tmp.iterdir())


def test_paused_stays_paused(tmp_path: Path, paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    _upper(tmp_path, monkeypatch)
    calls: list[str] = []
    monkeypatch.setattr(ipc, "request", _monitor(calls))
    for store in _container(tmp_path, status=PAUSED):
        cap.capture(paths, cap.CaptureRequest("c1", tmp_path / "e.tar", runtime_root=store.root))
    assert calls == ["guest_facts", "checkpoint"]


def test_refusals(tmp_path: Path, paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(ipc, "request", _monitor(calls, runtime="crun"))
    out = tmp_path / "e.tar"
    with pytest.raises(ForensicsError, match="no container nosuch under"):
        cap.capture(paths, cap.CaptureRequest("nosuch", out, runtime_root=tmp_path / "root"))
    for store in _container(tmp_path):
        # the bundle's root is a plain directory here: no overlay, no way to tell its changes
        with pytest.raises(ForensicsError, match="is not an overlay mount"):
            cap.capture(paths, cap.CaptureRequest("c1", out, runtime_root=store.root))
        _upper(tmp_path, monkeypatch)
        with pytest.raises(ForensicsError, match="runs under crun in its VM"):
            cap.capture(paths, cap.CaptureRequest("c1", out, runtime_root=store.root))
    assert calls == ["guest_facts"] and not out.exists()


def test_stopped_is_refused(tmp_path: Path, paths: Paths) -> None:
    for store in _container(tmp_path, alive=False):
        with pytest.raises(ForensicsError, match="c1 is stopped"):
            cap.capture(paths, cap.CaptureRequest("c1", tmp_path / "e.tar", runtime_root=store.root))


def test_overlay_upper_reads_mountinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    upper = tmp_path / "up per"
    upper.mkdir()
    merged = tmp_path / "merged"
    info = tmp_path / "mountinfo"
    esc = str(upper).replace(" ", "\\040")
    info.write_text(
        f"1 0 0:1 / / rw - ext4 /dev/sda rw\n"
        f"2 1 0:2 / {merged} rw shared:1 - overlay overlay rw,lowerdir=l/A:l/B,upperdir={esc},workdir=/w\n"
    )
    real_open = open

    def fake_open(path: str, *args: object, **kw: object) -> object:
        return real_open(info if path == "/proc/self/mountinfo" else path, *args, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", fake_open)
    assert cap.overlay_upper(merged) == upper
    with pytest.raises(ForensicsError, match="not an overlay mount"):
        cap.overlay_upper(tmp_path / "other")
