"""Hostile input to `vmpod run` and vmpod-runtime: refused early, with one clear line."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from vmpod.runtime import lifecycle
from vmpod.runtime.errors import NotFound
from vmpod.runtime.state import ContainerState, Store


def _state(cid: str) -> ContainerState:
    return ContainerState(id=cid, bundle="/b", rootfs="/b/rootfs", created="now")


# -- defect 10: concurrent delete --force ------------------------------------------


def test_delete_force_that_loses_the_race_succeeds(tmp_path: Path) -> None:
    store = Store(tmp_path / "root")
    _, lock, mon = store.begin(_state("c1"))
    os.close(mon)  # a stopped container
    errors: list[BaseException] = []

    def loser() -> None:
        try:
            lifecycle.delete(store, "c1", force=True)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=loser)
    thread.start()
    time.sleep(0.3)  # the loser waits for the lock the winner holds
    store.remove("c1")  # the winner deletes the container...
    os.close(lock)  # ...and lets go
    thread.join(10)
    assert not thread.is_alive()
    assert errors == []
    # a delete --force of a container that is gone by the time it looks also succeeds
    lifecycle.delete(store, "c1", force=True)


def test_delete_without_force_of_a_vanished_container_still_fails(tmp_path: Path) -> None:
    store = Store(tmp_path / "root")
    with pytest.raises(NotFound):
        lifecycle.delete(store, "gone", force=False)
