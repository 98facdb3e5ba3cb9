"""The guest agent imports as it does in the guest: from the files the root image
ships, on the system python3 with -I -S, standard library only, and without the
modules kept off the cold-start path."""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import pytest

import vmpod
from vmpod.guest import rootfs

PYTHON = "/usr/bin/python3"
# Measured under TCG: each costs tens of ms of every cold start (see the guest modules).
KEPT_OFF_THE_HOT_PATH = {"subprocess", "selectors", "typing", "dataclasses", "socket", "inspect"}

_REPORT = (
    "mods = {n: getattr(m, '__file__', None) for n, m in list(sys.modules.items())}; "
    "sys.stdout.write(repr((sorted(sys.stdlib_module_names), mods)) + '\\n')"
)


def _ship(tmp_path: Path) -> Path:
    for rel, data in rootfs.agent_sources().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    return tmp_path


def _imports(directory: Path, statement: str) -> tuple[set[str], dict[str, str | None]]:
    code = f"import sys; sys.path.insert(0, {str(directory)!r}); {statement}; {_REPORT}"
    out = subprocess.run(
        [PYTHON, "-I", "-S", "-c", code],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        cwd=directory,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    stdlib, mods = ast.literal_eval(out.stdout.splitlines()[-1])
    return set(stdlib), mods


def _outsiders(directory: Path, stdlib: set[str], mods: dict[str, str | None]) -> list[str]:
    bad = []
    for name, file in mods.items():
        top = name.split(".")[0]
        if top == "vmpod":
            if file is None or not Path(file).is_relative_to(directory):
                bad.append(f"{name} from {file}")
        elif top not in stdlib and top != "__main__":
            bad.append(f"{name} from {file}")
    return bad


@pytest.mark.skipif(not os.path.exists(PYTHON), reason="needs the system python3")
def test_guest_main_imports_with_the_shipped_files_only(tmp_path: Path) -> None:
    shipped = _ship(tmp_path)
    stdlib, mods = _imports(shipped, "import vmpod.agent.guest.main")
    assert "vmpod.agent.guest.main" in mods
    assert _outsiders(shipped, stdlib, mods) == []
    assert KEPT_OFF_THE_HOT_PATH.isdisjoint(mods), KEPT_OFF_THE_HOT_PATH & set(mods)


@pytest.mark.skipif(not os.path.exists(PYTHON), reason="needs the system python3")
def test_every_shipped_module_is_standard_library_only(tmp_path: Path) -> None:
    shipped = _ship(tmp_path)
    names = sorted(rel[:-3].replace("/", ".").removesuffix(".__init__") for rel in rootfs.agent_sources())
    stdlib, mods = _imports(shipped, "; ".join(f"import {n}" for n in names))
    assert set(names) <= set(mods)
    assert _outsiders(shipped, stdlib, mods) == []


def test_the_image_ships_the_whole_guest_package_and_keys_on_it() -> None:
    sources = rootfs.agent_sources()
    guest = Path(vmpod.__file__).parent / "agent" / "guest"
    expected = {f"vmpod/agent/guest/{f.name}" for f in guest.glob("*.py")}
    expected |= {"vmpod/__init__.py", "vmpod/agent/__init__.py", "vmpod/agent/protocol.py"}
    assert set(sources) == expected
    assert "vmpod/agent/client.py" not in sources  # host side stays on the host
    assert b"from vmpod.agent.guest.main import main" in rootfs._ENTRY
    assert rootfs.image_key("tree-x") == rootfs.image_key("tree-x") != rootfs.image_key("tree-y")
