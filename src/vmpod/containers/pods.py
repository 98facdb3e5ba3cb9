"""`vmpod pod`: several containers in one VM, as podman's pods are.

A pod is an infra container named ``<pod>-infra`` that holds the VM and the
network (its CNI attachment, its published ports): catatonit in pause mode,
bind-mounted from the host, on an empty root filesystem. `vmpod run --pod NAME`
makes containers that join that VM (vmpod-runtime joins them by CRI-O's
SandboxID annotation, as it does podman's pod members), each with its own root
filesystem and processes, all sharing the pod's network. The VM ends with the
infra container; `vmpod pod rm` removes the members first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from vmpod.containers.manager import Manager
from vmpod.containers.options import RunRequest, pod_infra_name
from vmpod.containers.records import ContainerError, Mount, Record, check_name
from vmpod.guest.progress import Progress, silent
from vmpod.runspec import INIT_PATH, ProcessOptions, init_binary

PAUSE_ROOT = "pause-rootfs"  # an empty tree under the home: the infra needs no image


@dataclass(frozen=True)
class Pod:
    name: str
    infra: Record
    members: tuple[Record, ...]


def pods(m: Manager) -> list[Pod]:
    records = m.records.all()
    return [
        Pod(r.pod, r, tuple(x for x in records if x.pod == r.pod and not x.pod_infra))
        for r in records
        if r.pod_infra
    ]


def find(m: Manager, name: str) -> Pod:
    for pod in pods(m):
        if pod.name == name:
            return pod
    raise ContainerError(f"no such pod: {name}", hint="vmpod pod ls lists them")


def create(m: Manager, name: str, template: RunRequest, progress: Progress = silent) -> Record:
    """Make and start the pod's infra container (its VM, network and ports);
    ``template`` carries the VM's settings (kernel, cpus, memory, network, -p)."""
    from vmpod.containers.launch import make_container, start_container

    check_name(name)
    if any(p.name == name for p in pods(m)):
        raise ContainerError(f"pod {name} exists already")
    root = m.paths.home / PAUSE_ROOT
    root.mkdir(parents=True, exist_ok=True)
    req = replace(
        template,
        image="",
        rootfs=str(root),
        process=ProcessOptions(args=(INIT_PATH, "-P"), hostname=name),  # catatonit's pause mode
        name=pod_infra_name(name),
        entrypoint=None,
        volumes=(Mount(source=init_binary(), destination=INIT_PATH, readonly=True),),
        auto_remove=False,
        pod=name,
        pod_infra=True,
    )
    rec = make_container(m, req, progress)
    try:
        start_container(m, rec)
    except BaseException:
        m.remove(rec.id, force=True)
        raise
    return rec


def check_member(m: Manager, req: RunRequest) -> None:
    """`vmpod run --pod NAME`: the pod exists and runs; the network is the pod's."""
    pod = find(m, req.pod)
    if req.ports:
        raise ContainerError(f"-p with --pod: publish ports on the pod (vmpod pod create {req.pod} -p ...)")
    if not m.view(pod.infra).alive:
        raise ContainerError(f"pod {req.pod} is not running", hint=f"vmpod start {pod.infra.name}")


def remove(m: Manager, name: str, force: bool) -> None:
    """Members first (running ones only with ``force``), then the infra and its VM."""
    pod = find(m, name)
    running = [r.name for r in pod.members if m.view(r).alive]
    if running and not force:
        raise ContainerError(f"pod {name} has running containers: {', '.join(running)}", hint="use -f")
    for r in pod.members:
        m.remove(r.id, force=True)
    m.remove(pod.infra.id, force=True)


def pause_root(m: Manager) -> Path:
    return m.paths.home / PAUSE_ROOT
