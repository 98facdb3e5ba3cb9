"""Which pod a container joins: engines' annotations, or a monitor's netns path."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from vmpod.runtime.bundle import Plan, pod_sandbox
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.member import pod_of
from vmpod.runtime.state import ContainerState, Store

PLAN = Plan(
    spec={},
    rootfs=Path("/"),
    volumes=(),
    cpus=1,
    memory_mb=512,
    kernel="6.1",
    terminal=False,
    hooks={},
    annotations={},
)


@pytest.mark.parametrize(
    ("annotations", "pod"),
    [
        ({}, ""),
        ({"io.kubernetes.cri-o.ContainerType": "container", "io.kubernetes.cri-o.SandboxID": "inf"}, "inf"),
        ({"io.kubernetes.cri-o.ContainerType": "sandbox", "io.kubernetes.cri-o.SandboxID": "inf"}, ""),
        ({"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "sb"}, "sb"),
        ({"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "sb"}, ""),
        ({"io.kubernetes.cri.container-type": "container"}, ""),  # no id: a pod of its own
    ],
)
def test_pod_annotations(annotations: dict[str, str], pod: str) -> None:
    assert pod_sandbox(annotations) == pod


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "root")


def _running_infra(store: Store, cid: str, pid: int) -> list[int]:
    _, lock, mon = store.begin(ContainerState(id=cid, bundle="/b", rootfs="/r", created="now"))
    store.update(cid, pid=pid)
    (store.dir(cid) / "pod.sock").touch()
    return [lock, mon]  # the monitor lock held: the infra's monitor "lives"


def test_a_member_joins_a_running_pod(store: Store) -> None:
    fds = _running_infra(store, "infra", 4242)
    try:
        assert pod_of(store, dataclasses.replace(PLAN, pod="infra")) == "infra"
        # podman's members have the infra monitor's netns path and no annotation needed
        assert pod_of(store, dataclasses.replace(PLAN, netns="/proc/4242/ns/net")) == "infra"
        assert pod_of(store, dataclasses.replace(PLAN, netns="/proc/999/ns/net")) == ""
        assert pod_of(store, dataclasses.replace(PLAN, netns="/run/netns/x")) == ""
    finally:
        for fd in fds:
            os.close(fd)


def test_a_pod_that_is_not_running_is_a_clear_error(store: Store) -> None:
    with pytest.raises(RuntimeCliError, match="not a vmpod-runtime container"):
        pod_of(store, dataclasses.replace(PLAN, pod="nosuch"))
    for fd in _running_infra(store, "dead", 4243):
        os.close(fd)  # its monitor is gone
    with pytest.raises(RuntimeCliError, match="not running"):
        pod_of(store, dataclasses.replace(PLAN, pod="dead"))


def test_shared_namespaces_and_the_guests_join() -> None:
    from vmpod.agent.guest.bundles import join_namespaces
    from vmpod.runtime.bundle import _shared_namespaces

    linux: dict[str, object] = {
        "namespaces": [
            {"type": "pid"},
            {"type": "ipc", "path": "/proc/7/ns/ipc"},
            {"type": "uts", "path": "/proc/7/ns/uts"},
            {"type": "network", "path": "/proc/7/ns/net"},
            {"type": "mount"},
        ]
    }
    assert _shared_namespaces(linux) == ("ipc", "uts")
    spec: dict[str, object] = {"linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}]}}
    joined = join_namespaces(spec, {"ipc": "/proc/42/ns/ipc"})
    assert joined["linux"] == {  # the member's ipc is the pod's; the rest stay its own
        "namespaces": [{"type": "pid"}, {"type": "uts"}, {"type": "ipc", "path": "/proc/42/ns/ipc"}]
    }
    assert join_namespaces(spec, {}) is spec


def test_a_pod_vm_is_sized_for_the_pod() -> None:
    from vmpod.runtime.bundle import pod_resources, vm_size

    ann = {
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-cpu-quota": "200000",
        "io.kubernetes.cri.sandbox-cpu-period": "100000",
        "io.kubernetes.cri.sandbox-memory": str(768 << 20),
    }
    res = pod_resources(ann)
    assert res == {"cpu": {"quota": 200000, "period": 100000}, "memory": {"limit": 768 << 20}}
    assert vm_size(res, host_cpus=4, host_mb=8192) == (2, 768 + 256)
    assert pod_resources({"io.kubernetes.cri.sandbox-cpu-period": "100000"}) == {}
    assert pod_resources({"io.kubernetes.cri.sandbox-memory": "0"}) == {}
