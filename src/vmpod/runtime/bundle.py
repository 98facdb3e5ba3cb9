"""An OCI bundle's config.json -> what the guest runs, and how big the VM is.

What changes on the way into the VM (the Kata model):

- ``root.path`` (a host directory) is shared with the VM over virtio-fs and is
  the container's root as it is: writes land in the bundle's rootfs on the host
  (read-only on the host side too with ``root.readonly``).
- The ``network`` namespace's ``path`` (the engine's pod namespace) is wired
  into the VM: each interface becomes a NIC with the same MAC, MTU, addresses
  and routes (``Plan.netns``); without a path the VM has loopback only. The
  container shares the VM's network, as containers of a pod share its
  namespace. No network namespace at all means the host's network, which a VM
  cannot share: refused. Other namespace paths mean nothing inside and are
  dropped; ``net.*`` sysctls are set on the VM's network by the agent (the
  pod's, shared by its containers, as the engine sets them on the pod's).
- Bind mounts of host directories and regular files (volumes, podman's
  /etc/hosts, resolv.conf, secrets) are shared over virtio-fs too, read-only
  ones read-only on the host side; a bind-mounted /dev/shm becomes a guest
  tmpfs. Everything else is refused with an error that names it: bind mounts of
  devices, sockets and fifos (they cannot cross a VM boundary), shared mount
  propagation (nothing propagates back out of a VM), and mount types the guest
  does not provide.
- ``linux.resources`` sizes the VM (vCPUs from the CPU quota, cpuset or shares;
  memory = limit + MEMORY_OVERHEAD_MB, at least MIN_MEMORY_MB) and is passed to
  the guest runtime too, minus host-specific parts (cpuset numbers, blkio,
  hugetlb, network, rdma). ``cgroupsPath`` becomes /vmpod/<id> in the guest;
  on the host it is where the VM's cgroup is made, with the limits plus the
  VM's cost (runtime/cgroups.py).
- Hooks run on the host (see ``hooks``); AppArmor/SELinux labels are dropped
  (the guest has neither).
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from vmpod.errors import ConfigError, ImageError
from vmpod.fsutil import meminfo, resolve_below
from vmpod.images.source import check_rootfs_dir
from vmpod.jsonsafe import parse_json
from vmpod.runtime.config import ANNOTATION_KERNEL, ANNOTATION_MODULES, KNOWN_ANNOTATIONS, RuntimeConfig
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.hooks import HOOK_KINDS, validate_hooks
from vmpod.runtime.validate import validate_linux, validate_process
from vmpod.sandbox.build import check_config_size
from vmpod.sandbox.config import Volume

MEMORY_OVERHEAD_MB = 256  # guest kernel, agent and page cache on top of the limit
MIN_MEMORY_MB = 512
MIB = 1024 * 1024
KEPT_MOUNT_TYPES = ("proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2")
# propagation a bind mount cannot have across a VM boundary: nothing mounted in
# the guest reaches the host
REFUSED_PROPAGATION = ("shared", "rshared")


@dataclass(frozen=True)
class Plan:
    """Everything `create` needs to boot the VM and prepare the container."""

    spec: dict[str, object]  # the guest's config.json (root.path set by the agent)
    rootfs: Path  # host root filesystem directory
    volumes: tuple[Volume, ...]  # host bind mounts, by index in spec["mounts"]
    cpus: int
    memory_mb: int
    kernel: str
    terminal: bool
    hooks: dict[str, list[dict[str, object]]]
    annotations: dict[str, str]
    warnings: tuple[str, ...] = field(default=())
    kernel_modules: tuple[str, ...] = ()  # NAME[=params], from org.vmpod.kernel_modules
    netns: str = ""  # the engine's network namespace to wire into the VM ("": loopback only)
    pod: str = ""  # the pod's first (sandbox/infra) container, whose VM this one joins
    shared_namespaces: tuple[str, ...] = ()  # ipc/uts given as paths: a pod member shares the pod's
    cgroups_path: str = ""  # the engine's linux.cgroupsPath: the host cgroup (runtime/cgroups.py)
    # what the VM is sized from (the pod's resources, else the container's): the host cgroup's limits
    host_resources: dict[str, object] = field(default_factory=dict)


def load_spec(bundle: Path) -> dict[str, object]:
    if not bundle.is_dir():
        raise RuntimeCliError(f"bundle {bundle}: no such directory")
    path = bundle / "config.json"
    try:
        data = parse_json(path.read_text())
    except FileNotFoundError:
        raise RuntimeCliError(f"open {path}: no such file or directory") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RuntimeCliError(f"cannot read {path}: {err}") from err
    except ValueError as err:
        raise RuntimeCliError(f"invalid JSON in {path}: {err}") from err
    if not isinstance(data, dict):
        raise RuntimeCliError(f"{path}: the configuration is not a JSON object")
    if not isinstance(data.get("ociVersion"), str):
        raise RuntimeCliError(f"{path}: ociVersion must be a string")
    return data


def _obj(value: object, what: str) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RuntimeCliError(f"config.json: {what} must be an object")
    return value


def _list(value: object, what: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RuntimeCliError(f"config.json: {what} must be a list")
    return value


def translate(spec: dict[str, object], bundle: Path, cid: str, cfg: RuntimeConfig) -> Plan:
    warnings: list[str] = []
    root = _obj(spec.get("root"), "root")
    rootfs = _rootfs(root, bundle)
    process = _process(spec)
    validate_process(process, warnings)
    terminal = bool(process.get("terminal", False))
    hooks = validate_hooks(spec.get("hooks"))
    annotations = _annotations(spec.get("annotations"))
    kernel = _kernel(annotations, cfg)

    guest = {k: v for k, v in spec.items() if k not in ("hooks", "annotations")}
    guest_process = {k: v for k, v in process.items() if k not in ("apparmorProfile", "selinuxLabel")}
    guest["process"] = guest_process
    guest["root"] = {k: v for k, v in root.items() if k != "path"}
    mounts, volumes, dir_dests = _mounts(spec.get("mounts"), bundle)
    guest["mounts"] = mounts
    linux = _obj(spec.get("linux"), "linux")
    validate_linux(linux)  # types, rlimit and namespace names, namespace files: as runc
    resources = _obj(linux.get("resources"), "linux.resources")
    netns = _netns(linux)
    if linux:
        guest_linux = _linux(linux, cid, warnings)
        guest["linux"] = guest_linux
        namespaces = guest_linux.get("namespaces")
        if isinstance(namespaces, list) and {"type": "user"} in namespaces:
            # sysfs can only be mounted by the owner of the network namespace, and the
            # container shares the VM's: bind the guest's /sys instead (as rootless runc does)
            guest["mounts"] = [
                _SYSFS_BIND | {"destination": m["destination"]} if m.get("type") == "sysfs" else m
                for m in mounts
            ]
    check_executable(rootfs, process, dir_dests)
    # a pod's VM is sized for the whole pod when the engine says what that is
    sized_by = pod_resources(annotations) or resources
    cpus, memory_mb = vm_size(sized_by, warnings)
    cgroups_path = linux.get("cgroupsPath") or ""
    if not isinstance(cgroups_path, str):
        raise RuntimeCliError("config.json: linux.cgroupsPath must be a string")
    try:
        check_config_size(guest, "config.json")
    except ConfigError as err:
        raise RuntimeCliError(err.message) from None
    return Plan(
        spec=guest,
        rootfs=rootfs,
        volumes=volumes,
        cpus=cpus,
        memory_mb=memory_mb,
        kernel=kernel,
        terminal=terminal,
        hooks=hooks,
        annotations=annotations,
        warnings=tuple(warnings),
        netns=netns,
        pod=pod_sandbox(annotations),
        shared_namespaces=_shared_namespaces(linux),
        cgroups_path=cgroups_path,
        host_resources=sized_by,
        kernel_modules=tuple(
            m.strip() for m in annotations.get(ANNOTATION_MODULES, "").split(";") if m.strip()
        ),
    )


def _annotations(value: object) -> dict[str, str]:
    ann = _obj(value, "annotations")
    if not all(isinstance(v, str) for v in ann.values()):
        raise RuntimeCliError("config.json: annotations must map strings to strings")
    return {k: str(v) for k, v in ann.items()}


def _kernel(annotations: dict[str, str], cfg: RuntimeConfig) -> str:
    for name in annotations:
        if name.startswith("org.vmpod.") and name not in cfg.enable_annotations:
            where = cfg.source or "/etc/vmpod/runtime.json"
            if name in KNOWN_ANNOTATIONS:
                raise RuntimeCliError(
                    f"annotation {name} is not enabled (add it to enable_annotations in {where})"
                )
            raise RuntimeCliError(f"unknown annotation {name} (known: {', '.join(KNOWN_ANNOTATIONS)})")
    kernel = annotations.get(ANNOTATION_KERNEL, cfg.kernel)
    if kernel != cfg.kernel and kernel not in cfg.kernels:
        raise RuntimeCliError(
            f"kernel {kernel!r} from annotation {ANNOTATION_KERNEL} is not "
            f"allowed (allowed: {', '.join(cfg.kernels) or 'none'})"
        )
    return kernel


def _rootfs(root: dict[str, object], bundle: Path) -> Path:
    root_path = root.get("path")
    if not isinstance(root_path, str) or not root_path:
        raise RuntimeCliError("config.json: root.path must be specified")
    rootfs = (bundle / root_path).resolve()
    if not rootfs.is_dir():
        raise RuntimeCliError(f"rootfs ({rootfs}) does not exist")
    try:
        check_rootfs_dir(rootfs)  # not the host's / or /proc, shared into the VM
    except ImageError as err:
        raise RuntimeCliError(f"config.json: root.path: {err.message}") from None
    return rootfs


def _process(spec: dict[str, object]) -> dict[str, object]:
    """The process object, checked the way runc checks it before anything starts."""
    process = _obj(spec.get("process"), "process")
    if not process:
        raise RuntimeCliError("config.json: process must be specified for create")
    args = _list(process.get("args"), "process.args")
    if not args or not all(isinstance(a, str) for a in args):
        raise RuntimeCliError("config.json: process.args must be a non-empty list of strings")
    cwd = process.get("cwd")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise RuntimeCliError("config.json: process.cwd must be an absolute path")
    if not isinstance(process.get("terminal", False), bool):
        raise RuntimeCliError("config.json: process.terminal must be a boolean")
    return process


def _mounts(value: object, bundle: Path) -> tuple[list[dict[str, object]], tuple[Volume, ...], list[str]]:
    """(guest mounts, host bind mounts to share, destinations the host does not
    see into); refuses any mount the VM cannot honour."""
    plan = _MountPlan(bundle)
    for index, raw in enumerate(_list(value, "mounts")):
        m = dict(_obj(raw, "mounts[]"))
        dest, typ = m.get("destination"), m.get("type") or ""
        options = _list(m.get("options"), "mount options")
        if not all(isinstance(o, str) for o in options):
            raise RuntimeCliError(f"config.json: mount {index}: options must be strings")
        if not isinstance(dest, str) or not dest.startswith("/") or not isinstance(typ, str):
            raise RuntimeCliError(f"config.json: mount {index} needs an absolute destination")
        if typ == "bind" or "bind" in options or "rbind" in options:
            plan.bind(m, dest, [str(o) for o in options])
        else:
            plan.plain(m, dest, typ)
    return plan.out, tuple(plan.volumes), plan.dir_dests


class _MountPlan:
    """The guest's mounts as they are decided, one OCI mount at a time."""

    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle
        self.out: list[dict[str, object]] = []
        self.volumes: list[Volume] = []
        self.dir_dests: list[str] = []

    def plain(self, m: dict[str, object], dest: str, typ: str) -> None:
        if typ not in KEPT_MOUNT_TYPES:
            raise RuntimeCliError(
                f"mount of type {typ!r} on {dest} is not supported in the VM "
                f"(supported: bind, {', '.join(KEPT_MOUNT_TYPES)})"
            )
        self.out.append(m)
        if typ == "tmpfs":
            self.dir_dests.append(dest)

    def bind(self, m: dict[str, object], dest: str, options: list[str]) -> None:
        if dest == "/dev/shm":
            # the container's shared memory is the guest's: a tmpfs of its own
            keep = [o for o in options if o not in ("bind", "rbind", "rprivate", "private")]
            self.out.append(
                {
                    "destination": dest,
                    "type": "tmpfs",
                    "source": "shm",
                    "options": keep + ["mode=1777", "size=65536k"],
                }
            )
            return
        source = m.get("source")
        if not isinstance(source, str) or not source:
            raise RuntimeCliError(f"config.json: bind mount on {dest} has no source")
        refused = [o for o in options if o in REFUSED_PROPAGATION]
        if refused:
            raise RuntimeCliError(
                f"bind mount {source} -> {dest}: propagation {refused[0]!r} cannot be honoured: "
                "mounts made inside the VM never reach the host (use rprivate or rslave)"
            )
        src = Path(source) if source.startswith("/") else self.bundle / source
        try:
            st = os.stat(src)
        except OSError as err:
            raise RuntimeCliError(f"mount source {source} for {dest}: {err.strerror}") from err
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise RuntimeCliError(
                f"bind mount {source} -> {dest}: only directories and regular files can be "
                "shared with the VM (not devices, sockets or fifos)"
            )
        m["type"] = "bind"
        self.volumes.append(Volume(len(self.out), src, readonly="ro" in options))
        self.out.append(m)
        self.dir_dests.append(dest)  # the command may come from it (podman --init)


_SYSFS_BIND: dict[str, object] = {
    "type": "none",
    "source": "/sys",
    "options": ["rbind", "nosuid", "noexec", "nodev", "ro"],
}


# (container-type annotation, its value for a pod member, sandbox-id annotation)
POD_ANNOTATIONS = (
    ("io.kubernetes.cri.container-type", "container", "io.kubernetes.cri.sandbox-id"),  # CRI
    ("io.kubernetes.cri-o.ContainerType", "container", "io.kubernetes.cri-o.SandboxID"),  # CRI-O, podman
)


# what kubelet (via containerd's CRI) computes for a whole pod, on its sandbox container
SANDBOX_RESOURCES = {
    "io.kubernetes.cri.sandbox-cpu-quota": ("cpu", "quota"),
    "io.kubernetes.cri.sandbox-cpu-period": ("cpu", "period"),
    "io.kubernetes.cri.sandbox-cpu-shares": ("cpu", "shares"),
    "io.kubernetes.cri.sandbox-memory": ("memory", "limit"),
}


def pod_resources(annotations: dict[str, str]) -> dict[str, object]:
    """The pod's resources (the sum of its containers'), as CRI annotates its
    sandbox container, in linux.resources' shape; {} without them. microvm has no
    hotplug, so the VM is sized for the pod when its first container boots it."""
    out: dict[str, dict[str, object]] = {}
    for key, (group, field_) in SANDBOX_RESOURCES.items():
        raw = annotations.get(key, "")
        if raw.isdigit() and int(raw) > 0:
            out.setdefault(group, {})[field_] = int(raw)
    if "quota" not in out.get("cpu", {}):
        out.get("cpu", {}).pop("period", None)  # a period alone sizes nothing
    return {k: v for k, v in out.items() if v}


def pod_sandbox(annotations: dict[str, str]) -> str:
    """The sandbox (infra) container a pod member belongs to, as engines annotate
    it; "" for a sandbox container or a container of its own."""
    for kind, member, sandbox in POD_ANNOTATIONS:
        if annotations.get(kind) == member and annotations.get(sandbox):
            return annotations[sandbox]
    return ""


def _shared_namespaces(linux: dict[str, object]) -> tuple[str, ...]:
    """The ipc/uts namespaces the engine asks to join (by path): for a pod member,
    its pod's (the guest joins the first container's)."""
    out = []
    for ns in _list(linux.get("namespaces"), "linux.namespaces"):
        ns = _obj(ns, "linux.namespaces[]")
        if ns.get("type") in ("ipc", "uts") and ns.get("path"):
            out.append(str(ns["type"]))
    return tuple(out)


def _netns(linux: dict[str, object]) -> str:
    """The network namespace path to wire in ("" for a new, empty namespace)."""
    for ns in _list(linux.get("namespaces"), "linux.namespaces"):
        ns = _obj(ns, "linux.namespaces[]")
        if ns.get("type") == "network":
            path = ns.get("path") or ""
            if not isinstance(path, str):
                raise RuntimeCliError("config.json: linux.namespaces[].path must be a string")
            return path
    raise RuntimeCliError(
        "the container asks for the host's network (no network namespace in config.json): "
        "a VM has its own network stack and cannot share the host's "
        "(use a bridge network, or --network none)"
    )


def _linux(linux: dict[str, object], cid: str, warnings: list[str]) -> dict[str, object]:
    """linux, with host namespaces, host cgroup paths and host-only settings removed."""
    out = {k: v for k, v in linux.items() if k not in ("mountLabel", "intelRdt")}
    namespaces = []
    for ns in _list(linux.get("namespaces"), "linux.namespaces"):
        ns = _obj(ns, "linux.namespaces[]")
        if ns.get("type") == "network":
            continue  # the container shares the VM's network (Kata model)
        namespaces.append({"type": ns.get("type")})  # host namespace paths mean nothing here
    out["namespaces"] = namespaces
    _obj(linux.get("sysctl"), "linux.sysctl")  # net.* ones: set on the VM's network by the agent
    out["cgroupsPath"] = f"/vmpod/{cid}"
    resources = _obj(linux.get("resources"), "linux.resources")
    if resources:
        out["resources"] = guest_resources(resources, warnings)
    return out


def guest_resources(resources: dict[str, object], warnings: list[str]) -> dict[str, object]:
    """The part of linux.resources that means the same inside the VM."""
    out: dict[str, object] = {}
    for key, value in resources.items():
        if key in ("devices", "pids", "unified"):
            out[key] = value
        elif key == "memory":
            mem = _obj(value, "linux.resources.memory")
            out[key] = {k: v for k, v in mem.items() if k in ("limit", "reservation", "swap")}
        elif key == "cpu":
            cpu = _obj(value, "linux.resources.cpu")
            out[key] = {k: v for k, v in cpu.items() if k in ("shares", "quota", "period", "idle")}
        else:
            warnings.append(f"linux.resources.{key} ignored in the VM")
    return out


def _count_cpus(cpuset: str) -> int:
    n = 0
    for part in cpuset.split(","):
        lo, _, hi = part.strip().partition("-")
        if lo.isdigit():
            n += (int(hi) - int(lo) + 1) if hi.isdigit() else 1
    return n


def host_memory_mb() -> int:
    try:
        return meminfo()["MemTotal"] // 1024
    except (OSError, KeyError):
        return 1 << 20  # unknown: do not cap the VM


def vm_size(
    resources: dict[str, object],
    warnings: list[str] | None = None,
    host_cpus: int | None = None,
    host_mb: int | None = None,
) -> tuple[int, int]:
    """(vCPUs, MiB) for a container's linux.resources."""
    host_cpus = host_cpus or os.cpu_count() or 1
    cpu = resources.get("cpu") if isinstance(resources.get("cpu"), dict) else {}
    assert isinstance(cpu, dict)
    quota, period = cpu.get("quota"), cpu.get("period") or 100000
    shares, cpuset = cpu.get("shares"), cpu.get("cpus")
    cpus = 1
    if isinstance(quota, int) and quota > 0 and isinstance(period, int) and period > 0:
        cpus = math.ceil(quota / period)
    elif isinstance(cpuset, str) and _count_cpus(cpuset) > 0:
        cpus = _count_cpus(cpuset)
    elif isinstance(shares, int) and shares > 0:
        cpus = math.ceil(shares / 1024)
    cpus = max(1, min(cpus, host_cpus))
    mem = resources.get("memory") if isinstance(resources.get("memory"), dict) else {}
    assert isinstance(mem, dict)
    limit = mem.get("limit")
    memory_mb = MIN_MEMORY_MB
    if isinstance(limit, int) and limit > 0:
        memory_mb = max(MIN_MEMORY_MB, math.ceil(limit / MIB) + MEMORY_OVERHEAD_MB)
        host_mb = host_mb or host_memory_mb()
        if memory_mb > host_mb:
            if warnings is not None:
                warnings.append(f"memory limit {limit} exceeds the host's memory: VM capped at {host_mb} MiB")
            memory_mb = host_mb
    return cpus, memory_mb


def resolve_in_root(root: Path, path: str) -> Path | None:
    """``path`` inside ``root`` with symlinks followed as the container would (absolute
    targets and ``..`` stay inside ``root``: fsutil.resolve_below); None when a
    component is missing or the path cannot be resolved (a symlink loop)."""
    try:
        found = resolve_below(root, path)
    except OSError:
        return None
    return found.path if found.exists else None


def _under(path: str, dests: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dests)


def check_executable(rootfs: Path, process: dict[str, object], unknown: list[str]) -> None:
    """Fail like runc's create when the command is missing from the image (podman and
    docker turn these messages into exit status 127 / 126)."""
    args = process.get("args")
    assert isinstance(args, list)
    cmd, cwd = str(args[0]), str(process.get("cwd") or "/")
    env = [e for e in _list(process.get("env"), "process.env") if isinstance(e, str)]
    if "/" in cmd:
        full = cmd if cmd.startswith("/") else os.path.join(cwd, cmd)
        candidates, search = [os.path.normpath(full)], False
    else:
        path_var = next((e[5:] for e in reversed(env) if e.startswith("PATH=")), None)
        if path_var is None:
            return  # runc would search an empty PATH; leave the verdict to the guest
        candidates = [os.path.join(d or ".", cmd) for d in path_var.split(":")]
        candidates = [c if c.startswith("/") else os.path.join(cwd, c) for c in candidates]
        search = True
    denied = False
    for cand in candidates:
        if _under(cand, unknown):
            return  # provided by a mount the host cannot look into
        real = resolve_in_root(rootfs, cand)
        if real is None:
            continue
        try:
            st = os.stat(real)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return
        denied = True
    prefix = "unable to start container process: exec:"
    if search and not denied:
        raise RuntimeCliError(f'{prefix} "{cmd}": executable file not found in $PATH')
    if denied:
        raise RuntimeCliError(f'{prefix} "{cmd}": permission denied')
    raise RuntimeCliError(f'{prefix} "{cmd}": stat {cmd}: no such file or directory')


__all__ = ["HOOK_KINDS", "Plan", "load_spec", "translate", "vm_size"]
