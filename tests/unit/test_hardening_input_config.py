"""vmpod-runtime create refuses every config.json runc refuses (OCI: create MUST fail)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vmpod.runtime.bundle import load_spec, translate
from vmpod.runtime.config import RuntimeConfig
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.specgen import default_spec

RUNTIME = [sys.executable, "-c", "from vmpod.runtime.cli import main; main()"]
Edit = Callable[[dict[str, Any]], None]


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    (tmp_path / "rootfs/bin").mkdir(parents=True)
    (tmp_path / "rootfs/bin/sh").write_bytes(b"\x7fELF")
    (tmp_path / "rootfs/bin/sh").chmod(0o755)
    return tmp_path


def _write(bundle: Path, edit: Edit) -> None:
    spec: dict[str, Any] = default_spec()
    spec["process"]["terminal"] = False
    edit(spec)
    (bundle / "config.json").write_text(json.dumps(spec))


def _translate(bundle: Path, edit: Edit) -> list[str]:
    _write(bundle, edit)
    return list(translate(load_spec(bundle), bundle, "c1", RuntimeConfig()).warnings)


def _set(path: str, value: object) -> Edit:
    def edit(spec: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return edit


def _ns(*namespaces: dict[str, object]) -> Edit:
    return _set("linux.namespaces", [{"type": "network"}, *namespaces])


REFUSED = [
    (_set("linux.resources.memory.limit", "lots"), "linux.resources.memory.limit must be an integer"),
    (_set("linux.resources.memory.limit", 1.5), "memory.limit must be an integer"),
    (_set("linux.resources.memory.swappiness", -1), "swappiness must be between 0 and"),
    (_set("linux.resources.cpu.quota", True), "cpu.quota must be an integer"),
    (_set("linux.resources.cpu.shares", "2"), "cpu.shares must be an integer"),
    (_set("linux.resources.cpu.cpus", 3), "cpu.cpus must be a string"),
    (_set("linux.resources.pids.limit", "max"), "pids.limit must be an integer"),
    (_set("linux.resources.memory", []), "linux.resources.memory must be an object"),
    (_set("linux.resources.devices", [{"allow": "yes"}]), "devices\\[0\\].allow must be a boolean"),
    (_set("linux.resources.devices", [{"access": "rwm"}]), "devices\\[0\\].allow must be specified"),
    (_set("linux.resources.unified", {"memory.max": 5}), "unified must be an object mapping strings"),
    (_set("process.rlimits", [{"type": "RLIMIT_TEST", "hard": 1, "soft": 1}]), "unknown rlimit type"),
    (_set("process.rlimits", [{"type": "RLIMIT_NOFILE", "hard": -1, "soft": 1}]), "hard must be between"),
    (_set("process.rlimits", [{"type": "RLIMIT_NOFILE", "hard": 1}]), "soft must be specified"),
    (_set("process.rlimits", [{"type": "RLIMIT_NOFILE", "hard": 1, "soft": 2}]), "soft limit .* exceeds"),
    (_set("process.rlimits", {"type": "RLIMIT_NOFILE"}), "process.rlimits must be a list"),
    (
        _set("process.rlimits", [{"type": "RLIMIT_CORE", "hard": 1, "soft": 1}] * 2),
        "duplicate rlimit type",
    ),
    (_set("process.capabilities.bounding", [1]), "capabilities.bounding must be a list of capability"),
    (_set("process.capabilities.effective", ["chown"]), "capabilities.effective must be a list"),
    (_set("process.capabilities.permitted", "CAP_KILL"), "capabilities.permitted must be a list"),
    (_set("process.user.uid", -1), "process.user.uid must be between"),
    (_set("process.user.additionalGids", ["wheel"]), "additionalGids\\[\\] must be an integer"),
    (_ns({"type": "pid"}, {"type": "pid"}), "duplicated ns 'pid'"),
    (_ns({"type": "pidns"}), "unknown namespace type 'pidns'"),
    (_ns({"type": 5}), "namespaces\\[1\\].type must be a string"),
    (_ns({"type": "cgroup", "path": "/proc/self/ns/ipc"}), "is a ipc namespace, not a cgroup namespace"),
    (_ns({"type": "uts", "path": "/proc/self/status"}), "/proc/self/status is not a namespace file"),
]


@pytest.mark.parametrize("edit,message", REFUSED, ids=[m for _, m in REFUSED])
def test_runc_refusals_are_refused_at_create(bundle: Path, edit: Edit, message: str) -> None:
    with pytest.raises(RuntimeCliError, match=message):
        _translate(bundle, edit)


def test_valid_configs_still_pass(bundle: Path) -> None:
    assert _translate(bundle, lambda spec: None) == []
    _translate(bundle, _ns({"type": "ipc", "path": "/proc/self/ns/ipc"}, {"type": "uts", "path": "/no/such"}))
    _translate(bundle, _set("linux.resources.memory.limit", -1))  # unlimited
    warnings = _translate(bundle, _set("process.capabilities.bounding", ["CAP_KILL", "CAP_FUTURE"]))
    assert warnings == ["ignoring unknown or unavailable capabilities: ['CAP_FUTURE']"]


def test_create_fails_with_one_line_and_leaves_nothing(bundle: Path, tmp_path: Path) -> None:
    _write(bundle, _set("linux.resources.memory.limit", "lots"))
    root = tmp_path / "state"
    res = subprocess.run(
        [*RUNTIME, "--root", str(root), "create", "--bundle", str(bundle), "c1"],
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == 1, res.stderr
    assert b"linux.resources.memory.limit must be an integer" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (root / "c1").exists()
