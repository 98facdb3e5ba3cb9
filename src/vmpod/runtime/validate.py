"""Checks on what users and engines hand vmpod-runtime, made before anything boots:
JSON that is nested past reason (``vmpod.jsonsafe``), and the parts of config.json
runc refuses at create."""

from __future__ import annotations

import fcntl
import json
import os

from vmpod.runtime.errors import RuntimeCliError

# -- config.json, as runc checks it at create ------------------------------------------

INT64 = (-(1 << 63), (1 << 63) - 1)
UINT64 = (0, (1 << 64) - 1)
UINT32 = (0, (1 << 32) - 1)
UINT16 = (0, (1 << 16) - 1)
RLIMITS = frozenset(
    (
        "RLIMIT_AS",
        "RLIMIT_CORE",
        "RLIMIT_CPU",
        "RLIMIT_DATA",
        "RLIMIT_FSIZE",
        "RLIMIT_LOCKS",
        "RLIMIT_MEMLOCK",
        "RLIMIT_MSGQUEUE",
        "RLIMIT_NICE",
        "RLIMIT_NOFILE",
        "RLIMIT_NPROC",
        "RLIMIT_RSS",
        "RLIMIT_RTPRIO",
        "RLIMIT_RTTIME",
        "RLIMIT_SIGPENDING",
        "RLIMIT_STACK",
    )
)
CAP_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")
# namespace type -> its CLONE_NEW* flag, as NS_GET_NSTYPE answers for a namespace file
NAMESPACES = {
    "mount": 0x00020000,
    "cgroup": 0x02000000,
    "uts": 0x04000000,
    "ipc": 0x08000000,
    "user": 0x10000000,
    "pid": 0x20000000,
    "network": 0x40000000,
    "time": 0x00000080,
}
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), linux/nsfs.h
# linux.resources: field -> (min, max) of an integer, or a type
Shape = tuple[int, int] | type
RESOURCE_FIELDS: dict[str, dict[str, Shape]] = {
    "memory": {
        "limit": INT64,
        "reservation": INT64,
        "swap": INT64,
        "kernel": INT64,
        "kernelTCP": INT64,
        "swappiness": UINT64,
        "disableOOMKiller": bool,
        "useHierarchy": bool,
        "checkBeforeUpdate": bool,
    },
    "cpu": {
        "shares": UINT64,
        "quota": INT64,
        "burst": UINT64,
        "period": UINT64,
        "realtimeRuntime": INT64,
        "realtimePeriod": UINT64,
        "cpus": str,
        "mems": str,
        "idle": INT64,
    },
    "pids": {"limit": INT64},
    "blkio": {"weight": UINT16, "leafWeight": UINT16},
    "network": {"classID": UINT32},
}
DEVICE_FIELDS: dict[str, Shape] = {"allow": bool, "type": str, "major": INT64, "minor": INT64, "access": str}
BLKIO_DEVICE_FIELDS: dict[str, Shape] = {
    "major": INT64,
    "minor": INT64,
    "weight": UINT16,
    "leafWeight": UINT16,
    "rate": UINT64,
}


def _fail(what: str, must: str) -> RuntimeCliError:
    return RuntimeCliError(f"config.json: {what} must be {must}")


def _check(value: object, shape: Shape, what: str) -> None:
    """``value`` has ``shape``: an integer in a range (never a bool or a float), or a type."""
    if isinstance(shape, tuple):
        lo, hi = shape
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(what, f"an integer, not {json.dumps(value)[:40]}")
        if not lo <= value <= hi:
            raise _fail(what, f"between {lo} and {hi}")
    elif not isinstance(value, shape):
        raise _fail(what, f"a {'boolean' if shape is bool else 'string' if shape is str else shape.__name__}")


def _fields(
    obj: object, shapes: dict[str, Shape], what: str, required: tuple[str, ...] = ()
) -> dict[str, object]:
    if not isinstance(obj, dict):
        raise _fail(what, "an object")
    for key in required:
        if key not in obj:
            raise RuntimeCliError(f"config.json: {what}.{key} must be specified")
    for key, shape in shapes.items():
        if obj.get(key) is not None:
            _check(obj[key], shape, f"{what}.{key}")
    return obj


def _items(value: object, what: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(what, "a list")
    return value


def validate_process(process: dict[str, object], warnings: list[str]) -> None:
    """process.rlimits, capabilities, user and env, as runc refuses them at create."""
    seen: set[str] = set()
    for i, raw in enumerate(_items(process.get("rlimits"), "process.rlimits")):
        what = f"process.rlimits[{i}]"
        rlimit = _fields(raw, {"type": str, "hard": UINT64, "soft": UINT64}, what, ("type", "hard", "soft"))
        kind = str(rlimit["type"])
        if kind not in RLIMITS:
            raise RuntimeCliError(f"config.json: {what}: unknown rlimit type {kind!r}")
        if kind in seen:
            raise RuntimeCliError(f"config.json: {what}: duplicate rlimit type {kind!r}")
        soft, hard = rlimit["soft"], rlimit["hard"]
        assert isinstance(soft, int) and isinstance(hard, int)  # checked above
        if soft > hard:
            raise RuntimeCliError(f"config.json: {what}: the soft limit of {kind} exceeds its hard limit")
        seen.add(kind)
    caps = process.get("capabilities")
    if caps is not None:
        if not isinstance(caps, dict):
            raise _fail("process.capabilities", "an object")
        from vmpod.runtime.specgen import ALL_CAPS  # (specgen imports config, which imports this)

        unknown: set[str] = set()
        for key in CAP_SETS:
            names = _items(caps.get(key), f"process.capabilities.{key}")
            for name in names:
                if (
                    not isinstance(name, str)
                    or not name.startswith("CAP_")
                    or not name[4:].replace("_", "").isalnum()
                ):
                    raise _fail(f"process.capabilities.{key}", f"a list of capability names (not {name!r})")
                if name not in ALL_CAPS:
                    unknown.add(name)
        if unknown:  # runc ignores them, saying so
            warnings.append(f"ignoring unknown or unavailable capabilities: {sorted(unknown)}")
    user = process.get("user")
    if user is not None:
        _fields(user, {"uid": UINT32, "gid": UINT32, "umask": UINT32, "username": str}, "process.user")
        assert isinstance(user, dict)
        for gid in _items(user.get("additionalGids"), "process.user.additionalGids"):
            _check(gid, UINT32, "process.user.additionalGids[]")
    if not all(isinstance(e, str) for e in _items(process.get("env"), "process.env")):
        raise _fail("process.env", "a list of strings")
    if process.get("oomScoreAdj") is not None:
        _check(process["oomScoreAdj"], (-1000, 1000), "process.oomScoreAdj")
    if not isinstance(process.get("noNewPrivileges", False), bool):
        raise _fail("process.noNewPrivileges", "a boolean")


def validate_linux(linux: dict[str, object]) -> None:
    """linux.namespaces and linux.resources, as runc refuses them at create."""
    seen: set[str] = set()
    for i, raw in enumerate(_items(linux.get("namespaces"), "linux.namespaces")):
        what = f"linux.namespaces[{i}]"
        ns = _fields(raw, {"type": str, "path": str}, what, ("type",))
        kind, path = str(ns["type"]), ns.get("path") or ""
        if kind not in NAMESPACES:
            raise RuntimeCliError(
                f"config.json: {what}: unknown namespace type {kind!r} (known: {', '.join(NAMESPACES)})"
            )
        if kind in seen:
            raise RuntimeCliError(f"config.json: malformed spec file: duplicated ns {kind!r}")
        seen.add(kind)
        if path:
            _check_ns_path(str(path), kind, what)
    resources = linux.get("resources")
    if resources is not None:
        validate_resources(resources)


def _check_ns_path(path: str, kind: str, what: str) -> None:
    """A namespace file given for ``kind`` must be one (where it exists on the host)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # missing or closed to us: the guest makes its own, nothing to compare
    try:
        actual = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        raise RuntimeCliError(f"config.json: {what}: {path} is not a namespace file") from None
    finally:
        os.close(fd)
    if actual != NAMESPACES[kind]:
        other = next((k for k, flag in NAMESPACES.items() if flag == actual), "another")
        raise RuntimeCliError(f"config.json: {what}: {path} is a {other} namespace, not a {kind} namespace")


def validate_resources(resources: object, what: str = "linux.resources") -> None:
    """Every linux.resources field runc decodes has its type and range."""
    if not isinstance(resources, dict):
        raise _fail(what, "an object")
    for group, shapes in RESOURCE_FIELDS.items():
        if resources.get(group) is not None:
            _fields(resources[group], shapes, f"{what}.{group}")
    for i, dev in enumerate(_items(resources.get("devices"), f"{what}.devices")):
        _fields(dev, DEVICE_FIELDS, f"{what}.devices[{i}]", ("allow",))
    blkio = resources.get("blkio")
    if isinstance(blkio, dict):
        for key in (
            "weightDevice",
            "throttleReadBpsDevice",
            "throttleWriteBpsDevice",
            "throttleReadIOPSDevice",
            "throttleWriteIOPSDevice",
        ):
            for i, dev in enumerate(_items(blkio.get(key), f"{what}.blkio.{key}")):
                _fields(dev, BLKIO_DEVICE_FIELDS, f"{what}.blkio.{key}[{i}]")
    for i, page in enumerate(_items(resources.get("hugepageLimits"), f"{what}.hugepageLimits")):
        _fields(page, {"pageSize": str, "limit": UINT64}, f"{what}.hugepageLimits[{i}]")
    network = resources.get("network")
    if isinstance(network, dict):
        for i, prio in enumerate(_items(network.get("priorities"), f"{what}.network.priorities")):
            _fields(prio, {"name": str, "priority": UINT32}, f"{what}.network.priorities[{i}]")
    unified = resources.get("unified")
    if unified is not None and (
        not isinstance(unified, dict) or not all(isinstance(v, str) for v in unified.values())
    ):
        raise _fail(f"{what}.unified", "an object mapping strings to strings")
