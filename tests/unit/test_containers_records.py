"""Container records: unique names, lookup by name, id or id prefix, truth after a
dead monitor or a lost runtime state (a host reboot)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from vmpod.containers.manager import Manager
from vmpod.containers.records import ContainerError, NoSuchContainer, Record, Records, check_name
from vmpod.errors import ConfigError
from vmpod.paths import Paths
from vmpod.runtime.state import RUNNING, STOPPED, ContainerState, now_rfc3339


def rec(cid: str, name: str, **kw: Any) -> Record:
    base = Record(cid, name, "img", "sha256:x", "/l", ("sh",), "t")
    return replace(base, **kw)


def test_names_are_unique_and_lookups_find_names_ids_and_prefixes(tmp_path: Path) -> None:
    r = Records(tmp_path)
    a, b = "ab" + "0" * 62, "ac" + "1" * 62
    r.add(rec(a, "web"))
    r.add(rec(b, "db"))
    with pytest.raises(ContainerError, match="already in use"):
        r.add(rec("f" * 64, "web"))
    assert r.resolve("web").id == a
    assert r.resolve(b).name == "db"
    assert r.resolve("ab").id == a
    with pytest.raises(ContainerError, match="'a' matches 2 containers"):
        r.resolve("a")
    with pytest.raises(NoSuchContainer, match="no such container: nope"):
        r.resolve("nope")
    with pytest.raises(NoSuchContainer):
        r.resolve("ff")


def test_a_name_wins_over_an_id_prefix(tmp_path: Path) -> None:
    r = Records(tmp_path)
    r.add(rec("a" * 64, "web"))
    r.add(rec("b" * 64, "aaaa-not-an-id"))
    assert r.resolve("aaaa-not-an-id").id == "b" * 64
    assert r.resolve("aaaa").id == "a" * 64


@pytest.mark.parametrize("bad", ["", "-x", "a b", "a/b", "x" * 65, "0123456789ab"])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError):
        check_name(bad)


def test_records_round_trip_with_mounts(tmp_path: Path) -> None:
    from vmpod.containers.records import Mount

    r = Records(tmp_path)
    r.add(rec("c" * 64, "x", mounts=(Mount("/h", "/c", True),), exit_code=3))
    got = r.load("c" * 64)
    assert got.mounts == (Mount("/h", "/c", True),) and got.exit_code == 3 and got.command == ("sh",)


def _manager(tmp: Path) -> Manager:
    return Manager(Paths(home=tmp / "home", run=tmp / "run"))


def test_ps_tells_the_truth_about_a_dead_monitor_and_a_lost_runtime_state(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    cid = "d" * 64
    m.records.add(rec(cid, "web", started="t1"))
    # the monitor wrote "running" and was killed -9: its lock is free
    _, lock, mon = m.store.begin(ContainerState(id=cid, bundle="/b", rootfs="/r", created=now_rfc3339()))
    m.store.update(cid, status=RUNNING, pid=os.getpid())
    v = m.view(m.records.load(cid))
    assert v.state == "running" and v.alive  # the monitor lock is still held here
    os.close(mon)
    os.close(lock)
    [v] = m.views()
    # started, and its VM died with the monitor: as if SIGKILLed (fault matrix)
    assert v.state == "exited" and v.exit_code == 137 and not v.alive
    assert v.status_text() == "Exited (137)"
    assert m.records.load(cid).finished  # settled into the record
    # a host reboot: the runtime state is gone, the record alone never says running
    m.store.remove(cid)
    [v] = m.views()
    assert v.state == "exited" and not v.alive


def test_an_exit_status_survives_the_runtime_state(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    cid = "e" * 64
    m.records.add(rec(cid, "job", started="t1"))
    _, lock, mon = m.store.begin(ContainerState(id=cid, bundle="/b", rootfs="/r", created=now_rfc3339()))
    m.store.update(cid, status=STOPPED, exit_status=7)
    os.close(mon)
    os.close(lock)
    [v] = m.views()
    assert v.status_text() == "Exited (7)"
    m.store.remove(cid)
    [v] = m.views()
    assert v.status_text() == "Exited (7)"


def test_rm_of_a_running_container_needs_force_and_racing_rm_f_both_succeed(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    cid = "f" * 64
    m.records.add(rec(cid, "web", started="t1"))
    _, lock, mon = m.store.begin(ContainerState(id=cid, bundle="/b", rootfs="/r", created=now_rfc3339()))
    m.store.update(cid, status=RUNNING)
    with pytest.raises(ContainerError, match="stop it first or use rm -f"):
        m.remove("web", force=False)
    os.close(mon)  # the monitor dies: now it is an exited container
    os.close(lock)
    m.remove("web", force=True)
    assert m.records.ids() == [] and not m.store.dir(cid).exists()
    with pytest.raises(NoSuchContainer):
        m.remove("web", force=True)  # unknown names stay an error
