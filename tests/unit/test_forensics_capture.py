"""Capture's order and cleanup against a fake monitor: pause, diff, dump, resume;
a failed dump resumes the container (even with --kill) and leaves no archive."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from vmpod.containers.manager import RUNNING_S
from vmpod.errors import ConfigError, ForensicsError, VmpodError
from vmpod.forensics import archive as a
from vmpod.forensics import capture as cap
from vmpod.paths import Paths
from vmpod.runtime import ipc


class FakeManager:
    """One running container whose record dir and overlay live under ``root``."""

    def __init__(self, root: Path, runtime: str = "runc") -> None:
        self.root = root
        self.rec = SimpleNamespace(
            id="c" * 64,
            name="suspect",
            image="/rootfs",
            image_digest="sha256:x",
            root_disk="",
            to_json=self._json,
        )
        (root / "rec" / "bundle").mkdir(parents=True)
        (root / "rec" / "bundle" / "config.json").write_text('{"ociVersion": "1.0.2"}')
        (root / "rec" / "runtime.json").write_text(json.dumps({"guest_runtime": runtime}))
        (root / "upper").mkdir()
        (root / "upper" / "data.log").write_text("1\n2\n")
        self.store = SimpleNamespace(dir=lambda cid: root / "state")

    def _json(self) -> dict[str, object]:
        return {
            "id": self.rec.id,
            "name": "suspect",
            "image": "/rootfs",
            "image_digest": "x",
            "created": "t",
            "command": ["sh"],
        }

    def locked(self, ref: str) -> object:
        rec = self.rec

        class Ctx:
            def __enter__(self) -> object:
                return rec

            def __exit__(self, *exc: object) -> None:
                return None

        return Ctx()

    def view(self, rec: object) -> object:
        return SimpleNamespace(state=RUNNING_S)

    def dir(self, rec: object) -> Path:
        return self.root / "rec"

    def overlay(self, rec: object) -> object:
        return SimpleNamespace(upper=self.root / "upper")


def _monitor(calls: list[str], fail_dump: bool) -> object:
    def request(sock: Path, msg: dict[str, object], timeout: float = 30) -> dict[str, object]:
        op = str(msg["op"]) if msg["op"] != "runtime" else str(msg["command"])
        calls.append(op)
        if op == "guest_facts":
            return {
                "kernel": "6.1",
                "runc": "runc 1.1.5",
                "criu_status": 0,
                "criu": "Version: 3.17.1\nLooks good.",
            }
        if op == "checkpoint":
            if fail_dump:
                raise VmpodError("criu failed: type DUMP")
            images = Path(str(msg["dir"])) / "checkpoint"
            images.mkdir(parents=True)
            (images / "inventory.img").write_bytes(b"img")
        return {}

    return request


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(home=tmp_path / "home", run=tmp_path / "run")


@pytest.mark.parametrize("kill", [False, True])
def test_capture_order_and_archive(
    tmp_path: Path, paths: Paths, monkeypatch: pytest.MonkeyPatch, kill: bool
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(cap, "Manager", lambda p: FakeManager(tmp_path))
    monkeypatch.setattr(ipc, "request", _monitor(calls, fail_dump=False))
    out = tmp_path / "e.tar"
    got = cap.capture(paths, cap.CaptureRequest("suspect", out, kill=kill, command_line=("vmpod", "x")))
    assert calls == ["guest_facts", "pause", "checkpoint"] + ([] if kill else ["resume"])
    v = a.verify(out)
    assert v.ok and v.manifest.criu == "3.17.1" and v.manifest.leave_running is not kill
    assert {
        "checkpoint/inventory.img",
        "rootfs-diff.tar",
        "deleted.files",
        "spec.dump",
        "config.dump",
    } <= set(got.manifest.files)
    assert not list((paths.tmp).iterdir())  # the scratch is gone


@pytest.mark.parametrize("kill", [False, True])
def test_failed_dump_resumes_and_leaves_nothing(
    tmp_path: Path, paths: Paths, monkeypatch: pytest.MonkeyPatch, kill: bool
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(cap, "Manager", lambda p: FakeManager(tmp_path))
    monkeypatch.setattr(ipc, "request", _monitor(calls, fail_dump=True))
    out = tmp_path / "e.tar"
    with pytest.raises(VmpodError, match="criu failed"):
        cap.capture(paths, cap.CaptureRequest("suspect", out, kill=kill))
    assert calls == ["guest_facts", "pause", "checkpoint", "resume"]
    assert not out.exists() and not list(paths.tmp.iterdir())


def test_refusals(tmp_path: Path, paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "exists.tar").write_text("")
    with pytest.raises(ConfigError, match="exists"):
        cap.capture(paths, cap.CaptureRequest("x", tmp_path / "exists.tar"))
    monkeypatch.setattr(cap, "Manager", lambda p: FakeManager(tmp_path / "crun", runtime="crun"))
    with pytest.raises(ForensicsError, match="needs runc"):
        cap.capture(paths, cap.CaptureRequest("x", tmp_path / "n.tar"))
