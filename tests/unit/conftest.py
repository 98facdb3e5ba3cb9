"""Unit tests run fake VMMs (tests/fixtures/fake_qemu.py) from the source tree: the
QEMU jail, which would hide that tree from them, is tested on its own
(test_qemu_jail.py) and by the VM tests."""

from __future__ import annotations

import pytest

from vmpod.hypervisor.qemu.jail import JAIL_ENV


@pytest.fixture(autouse=True)
def _no_qemu_jail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(JAIL_ENV, "off")
