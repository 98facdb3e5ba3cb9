"""vmpod-runtime: config.json -> guest spec, volumes, VM size, annotations, command checks."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpod.agent.guest import bundles as guest_runc
from vmpod.agent.protocol import MAX_JSON
from vmpod.runtime.bundle import (
    KEPT_MOUNT_TYPES,
    MEMORY_OVERHEAD_MB,
    MIN_MEMORY_MB,
    load_spec,
    resolve_in_root,
    translate,
    vm_size,
)
from vmpod.runtime.config import RuntimeConfig, parse_config
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.specgen import default_spec
from vmpod.sandbox import Volume

CFG = RuntimeConfig()


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "bin/busybox").write_bytes(b"\x7fELF")
    (root / "bin/busybox").chmod(0o755)
    (root / "bin/sh").symlink_to("busybox")
    (root / "bin/abs").symlink_to("/bin/busybox")  # absolute: stays in the rootfs
    (root / "bin/escape").symlink_to("../../../../usr/bin/env")
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    spec = default_spec()
    spec["process"]["terminal"] = False  # type: ignore[index]
    (tmp_path / "config.json").write_text(json.dumps(spec))
    return tmp_path


def _spec(bundle: Path) -> dict[str, object]:
    return load_spec(bundle)


def podman_like(bundle: Path, host: Path) -> dict[str, object]:
    """The shape podman 4.3 writes (measured on this host)."""
    spec = _spec(bundle)
    (host / "hosts").write_text("127.0.0.1 localhost\n")
    (host / ".containerenv").write_text('engine="podman"\n')
    (host / "shm").mkdir()
    (host / "vol").mkdir()
    (bundle / "resolv.conf").write_text("nameserver 10.0.2.3\n")
    spec["mounts"] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/etc/hosts",
            "type": "bind",
            "source": str(host / "hosts"),
            "options": ["bind", "rprivate"],
        },
        {
            "destination": "/run/.containerenv",
            "type": "bind",
            "source": str(host / ".containerenv"),
            "options": ["bind", "rprivate"],
        },
        {
            "destination": "/dev/shm",
            "type": "bind",
            "source": str(host / "shm"),
            "options": ["bind", "rprivate", "nosuid", "noexec", "nodev"],
        },
        {"destination": "/data", "type": "bind", "source": str(host / "vol"), "options": ["rbind"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
        {
            "destination": "/etc/resolv.conf",
            "type": "bind",
            "source": "resolv.conf",  # relative: to the bundle
            "options": ["bind", "ro", "rprivate"],
        },
    ]
    spec["linux"] = {
        "namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/run/netns/x"},
            {"type": "ipc", "path": "/proc/1/ns/ipc"},
            {"type": "mount"},
        ],
        "sysctl": {"net.ipv4.ping_group_range": "0 0", "kernel.msgmax": "8192"},
        "cgroupsPath": "machine.slice:libpod:abc",
        "mountLabel": "system_u:object_r:container_file_t:s0",
        "resources": {
            "devices": [{"allow": False, "access": "rwm"}],
            "pids": {"limit": 2048},
            "cpu": {"quota": 150000, "period": 100000, "cpus": "0-1"},
            "blockIO": {"weight": 10},
            "hugepageLimits": [],
        },
    }
    spec["process"]["apparmorProfile"] = "containers-default"  # type: ignore[index]
    spec["hooks"] = {"poststop": [{"path": "/bin/true"}]}
    spec["annotations"] = {"io.podman.annotations.autoremove": "TRUE"}
    return spec


def test_podman_like_config_is_translated_for_the_guest(bundle: Path, tmp_path: Path) -> None:
    host = tmp_path / "userdata"
    host.mkdir()
    plan = translate(podman_like(bundle, host), bundle, "abc", CFG)
    g = plan.spec
    assert "hooks" not in g and "annotations" not in g and "path" not in g["root"]  # type: ignore[operator]
    assert "apparmorProfile" not in g["process"]  # type: ignore[operator]
    linux = g["linux"]
    assert isinstance(linux, dict)
    assert linux["namespaces"] == [{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}]
    # net.* ones go to the guest, which sets them on the VM's (the pod's) network
    assert linux["sysctl"] == {"net.ipv4.ping_group_range": "0 0", "kernel.msgmax": "8192"}
    assert plan.netns == "/run/netns/x"
    assert linux["cgroupsPath"] == "/vmpod/abc"
    assert "mountLabel" not in linux
    assert linux["resources"] == {
        "devices": [{"allow": False, "access": "rwm"}],
        "pids": {"limit": 2048},
        "cpu": {"quota": 150000, "period": 100000},
    }
    g_mounts = g["mounts"]
    assert isinstance(g_mounts, list)
    assert [m["destination"] for m in g_mounts] == [
        "/proc",
        "/etc/hosts",
        "/run/.containerenv",
        "/dev/shm",
        "/data",
        "/sys/fs/cgroup",
        "/etc/resolv.conf",
    ]
    mounts = {m["destination"]: m for m in g_mounts}
    assert mounts["/dev/shm"]["type"] == "tmpfs"  # the guest's own shared memory
    assert "bind" not in mounts["/dev/shm"]["options"] and "nosuid" in mounts["/dev/shm"]["options"]
    # every bind mount of a file or a directory is a volume, by its index in the
    # guest's mounts; its source stays the host path (the sandbox rewrites it)
    assert plan.volumes == (
        Volume(1, host / "hosts"),
        Volume(2, host / ".containerenv"),
        Volume(4, host / "vol"),
        Volume(6, bundle / "resolv.conf", readonly=True),
    )
    hosts = mounts["/etc/hosts"]
    assert hosts == {
        "destination": "/etc/hosts",
        "type": "bind",
        "source": str(host / "hosts"),
        "options": ["bind", "rprivate"],
    }
    assert mounts["/data"]["type"] == "bind" and mounts["/data"]["source"] == str(host / "vol")
    assert plan.cpus == min(2, os.cpu_count() or 1)
    assert plan.memory_mb == MIN_MEMORY_MB
    assert plan.hooks == {"poststop": [{"path": "/bin/true"}]}
    assert plan.annotations == {"io.podman.annotations.autoremove": "TRUE"}
    warned = "\n".join(plan.warnings)
    assert not any("mount" in w or "volume" in w or "/data" in w for w in plan.warnings)
    assert "blockIO" in warned and "hugepageLimits" in warned


def test_a_big_file_is_a_volume_like_any_other(bundle: Path) -> None:
    big = bundle / "big"
    big.write_bytes(b"x" * (MAX_JSON * 4))  # more than any agent message could carry
    spec = _spec(bundle)
    spec["mounts"] = [{"destination": "/big", "type": "bind", "source": str(big), "options": ["rbind", "ro"]}]
    plan = translate(spec, bundle, "c", CFG)
    assert plan.volumes == (Volume(0, big, readonly=True),)


def test_a_config_too_large_for_the_agent_channel_is_refused(bundle: Path) -> None:
    spec = _config(bundle, env=[f"V{i}={'x' * 1000}" for i in range(70)])
    with pytest.raises(
        RuntimeCliError, match="config.json takes .* bytes in the VM: too large for the agent"
    ):
        translate(spec, bundle, "c", CFG)


def test_commands_below_a_directory_volume_are_left_to_the_guest(bundle: Path, tmp_path: Path) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    spec = _config(bundle, args=["mytool"], env=["PATH=/opt/tools:/bin"])
    spec["mounts"] = [{"destination": "/opt/tools", "type": "bind", "source": str(tools)}]
    assert translate(spec, bundle, "c", CFG).volumes == (Volume(0, tools),)


def test_a_command_bind_mounted_as_a_file_is_found(bundle: Path, tmp_path: Path) -> None:
    # podman --init: catatonit bind-mounted at /run/podman-init, the process's args[0]
    init = tmp_path / "catatonit"
    init.write_bytes(b"\x7fELF")
    init.chmod(0o755)
    spec = _config(bundle, args=["/run/podman-init", "--", "sh"])
    spec["mounts"] = [
        {"destination": "/run/podman-init", "type": "bind", "source": str(init), "options": ["bind", "ro"]}
    ]
    plan = translate(spec, bundle, "c", CFG)
    assert plan.volumes == (Volume(0, init, readonly=True),)


@pytest.fixture
def specials(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A unix socket, a fifo and a device: nothing a VM can be given."""
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    os.mkfifo(tmp_path / "fifo")
    try:
        yield {"socket": tmp_path / "sock", "fifo": tmp_path / "fifo", "device": Path("/dev/null")}
    finally:
        sock.close()


@pytest.mark.parametrize("kind", ["socket", "fifo", "device"])
def test_bind_mounts_of_sockets_fifos_and_devices_are_refused(
    bundle: Path, specials: dict[str, Path], kind: str
) -> None:
    spec = _spec(bundle)
    source = specials[kind]
    spec["mounts"] = [{"destination": "/run/x", "type": "bind", "source": str(source), "options": ["rbind"]}]
    message = f"bind mount {source} -> /run/x: only directories and regular files can be shared"
    with pytest.raises(RuntimeCliError, match=message):
        translate(spec, bundle, "c", CFG)


@pytest.mark.parametrize("propagation", ["shared", "rshared"])
def test_shared_propagation_is_refused(bundle: Path, tmp_path: Path, propagation: str) -> None:
    spec = _spec(bundle)
    spec["mounts"] = [
        {"destination": "/data", "type": "bind", "source": str(tmp_path), "options": ["rbind", propagation]}
    ]
    message = f"bind mount {tmp_path} -> /data: propagation '{propagation}' cannot be honoured"
    with pytest.raises(RuntimeCliError, match=message):
        translate(spec, bundle, "c", CFG)
    for fine in ("rprivate", "rslave", "private", "slave"):
        spec["mounts"] = [
            {"destination": "/data", "type": "bind", "source": str(tmp_path), "options": [fine]}
        ]
        assert translate(spec, bundle, "c", CFG).volumes == (Volume(0, tmp_path),)


@pytest.mark.parametrize("typ", ["overlay", "nfs", "9p", "virtiofs", "fuse.sshfs"])
def test_unknown_mount_types_are_refused(bundle: Path, typ: str) -> None:
    spec = _spec(bundle)
    spec["mounts"] = [{"destination": "/x", "type": typ, "source": "somewhere"}]
    with pytest.raises(
        RuntimeCliError, match=f"mount of type '{typ}' on /x is not supported in the VM"
    ) as exc:
        translate(spec, bundle, "c", CFG)
    assert all(t in str(exc.value) for t in ("bind", *KEPT_MOUNT_TYPES))


def test_mount_options_must_be_strings(bundle: Path) -> None:
    spec = _spec(bundle)
    spec["mounts"] = [{"destination": "/x", "type": "tmpfs", "source": "tmpfs", "options": ["ro", 1]}]
    with pytest.raises(RuntimeCliError, match="mount 0: options must be strings"):
        translate(spec, bundle, "c", CFG)


def test_guest_runc_kill_puts_the_signal_after_the_id() -> None:
    argv = guest_runc.runtime_argv("runc", "kill", ["--all", "9"], "c1")
    assert argv[-4:] == ["kill", "--all", "c1", "9"]
    assert guest_runc.runtime_argv("runc", "ps", ["--format", "json"], "c1")[-3:] == [
        "--format",
        "json",
        "c1",
    ]


@pytest.mark.parametrize(
    "resources,cpus,mem",
    [
        ({}, 1, MIN_MEMORY_MB),
        ({"cpu": {"quota": 250000, "period": 100000}}, 3, MIN_MEMORY_MB),  # ceil
        ({"cpu": {"quota": 50000}}, 1, MIN_MEMORY_MB),  # default period, min 1
        ({"cpu": {"quota": 10**9, "period": 1000}}, 4, MIN_MEMORY_MB),  # host cores cap
        ({"cpu": {"cpus": "0,2-3"}}, 3, MIN_MEMORY_MB),
        ({"cpu": {"shares": 2048}}, 2, MIN_MEMORY_MB),
        ({"cpu": {"quota": -1, "shares": 1024}}, 1, MIN_MEMORY_MB),
        ({"memory": {"limit": 128 << 20}}, 1, MIN_MEMORY_MB),  # min 512
        ({"memory": {"limit": 1 << 30}}, 1, 1024 + MEMORY_OVERHEAD_MB),
        ({"memory": {"limit": (1 << 30) + 1}}, 1, 1025 + MEMORY_OVERHEAD_MB),
        ({"memory": {"limit": -1}}, 1, MIN_MEMORY_MB),
        ({"memory": {"limit": 1 << 40}}, 1, 8192),  # host memory cap
    ],
)
def test_vm_size(resources: dict[str, object], cpus: int, mem: int) -> None:
    assert vm_size(resources, [], host_cpus=4, host_mb=8192) == (cpus, mem)


def _config(bundle: Path, **process: object) -> dict[str, object]:
    spec = _spec(bundle)
    proc = spec["process"]
    assert isinstance(proc, dict)
    proc.update(process)
    return spec


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["nosuch"], ["PATH=/bin"], 'exec: "nosuch": executable file not found in $PATH'),
        (["/bin/nosuch"], ["PATH=/bin"], 'exec: "/bin/nosuch": stat /bin/nosuch: no such file'),
        (["/etc/passwd"], ["PATH=/bin"], 'exec: "/etc/passwd": permission denied'),
        (["env"], ["PATH=/bin"], "executable file not found"),  # host's /usr/bin/env not seen
        (["escape"], ["PATH=/bin"], "executable file not found"),  # ../ stays inside the rootfs
    ],
)
def test_missing_commands_fail_create_like_runc(
    bundle: Path, args: list[str], env: list[str], message: str
) -> None:
    with pytest.raises(RuntimeCliError, match=message.replace("$", r"\$")):
        translate(_config(bundle, args=args, env=env), bundle, "c", CFG)


@pytest.mark.parametrize(
    "args,env",
    [
        (["sh", "-c", "true"], ["PATH=/usr/bin:/bin"]),
        (["abs"], ["PATH=/bin"]),  # absolute link resolved in the rootfs
        (["/bin/sh"], []),
        (["./busybox"], []),
        (["tool"], ["PATH=/opt/tools:/bin"]),  # /opt/tools comes from a mount: unknown
        (["whatever"], []),  # no PATH at all: the guest decides
    ],
)
def test_commands_found_or_unknowable_pass(bundle: Path, args: list[str], env: list[str]) -> None:
    spec = _config(bundle, args=args, env=env, cwd="/bin")
    spec["mounts"] = [{"destination": "/opt/tools", "type": "tmpfs", "source": "tmpfs"}]
    plan = translate(spec, bundle, "c", CFG)
    process = plan.spec["process"]
    assert isinstance(process, dict)
    assert process["args"] == args and process["env"] == env  # passed on unchanged
    assert not any("command" in w or args[0] in w for w in plan.warnings)


def test_resolve_in_root_never_leaves_the_root(bundle: Path) -> None:
    root = bundle / "rootfs"
    assert resolve_in_root(root, "/bin/abs") == root / "bin/busybox"
    assert resolve_in_root(root, "/../../bin/sh") == root / "bin/busybox"
    assert resolve_in_root(root, "/bin/escape") is None
    (root / "loop").symlink_to("loop")
    assert resolve_in_root(root, "/loop") is None


def test_annotations_need_the_allow_list(bundle: Path) -> None:
    spec = _spec(bundle)
    spec["annotations"] = {"org.vmpod.kernel": "6.12"}
    with pytest.raises(RuntimeCliError, match="not enabled.*enable_annotations"):
        translate(spec, bundle, "c", CFG)
    cfg = parse_config({"enable_annotations": ["org.vmpod.kernel"], "kernels": ["6.12"]}, "f")
    assert translate(spec, bundle, "c", cfg).kernel == "6.12"
    spec["annotations"] = {"org.vmpod.kernel": "debian:evil"}
    with pytest.raises(RuntimeCliError, match="kernel 'debian:evil'.*not allowed"):
        translate(spec, bundle, "c", cfg)
    spec["annotations"] = {"org.vmpod.other": "x"}
    with pytest.raises(RuntimeCliError, match="unknown annotation org.vmpod.other"):
        translate(spec, bundle, "c", cfg)
    spec["annotations"] = {"io.other.thing": "x"}
    assert translate(spec, bundle, "c", CFG).kernel == CFG.kernel


@pytest.mark.parametrize(
    "data,message",
    [
        ([], "expected a JSON object"),
        ({"kernal": "6.1"}, "unknown keys"),
        ({"enable_annotations": ["org.vmpod.nope"]}, "unknown annotation"),
        ({"kernels": "6.1"}, "list of strings"),
        ({"accel": "xen"}, "accel"),
        ({"guest_runtime": "youki"}, "guest_runtime"),
        ({"boot_timeout": 0}, "positive"),
    ],
)
def test_bad_runtime_config(data: object, message: str) -> None:
    with pytest.raises(RuntimeCliError, match=message):
        parse_config(data, "/etc/vmpod/runtime.json")


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda s: s.pop("process"), "process must be specified"),
        (lambda s: s["process"].update(args=[]), "process.args"),
        (lambda s: s["process"].update(cwd="tmp"), "cwd must be an absolute path"),
        (lambda s: s["root"].update(path="nope"), r"rootfs \(.*nope\) does not exist"),
        (lambda s: s.update(hooks={"prestart": [{"path": "relative"}]}), "absolute path"),
        (lambda s: s.update(hooks={"prestop": []}), "unknown hook kind"),
        (lambda s: s.update(hooks={"poststop": [{"path": "/x", "timeout": 0}]}), "timeout"),
        (
            lambda s: s.update(
                mounts=[{"destination": "/etc/x", "type": "bind", "source": "/nonexistent/file"}]
            ),
            "mount source",
        ),
        (lambda s: s.update(annotations={"a": 1}), "annotations"),
    ],
)
def test_invalid_configs_are_refused(bundle: Path, mutate: object, message: str) -> None:
    spec = _spec(bundle)
    mutate(spec)  # type: ignore[operator]
    with pytest.raises(RuntimeCliError, match=message):
        translate(spec, bundle, "c", CFG)


def test_load_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(RuntimeCliError, match="no such directory"):
        load_spec(tmp_path / "missing")
    with pytest.raises(RuntimeCliError, match="config.json: no such file"):
        load_spec(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(RuntimeCliError, match="invalid JSON"):
        load_spec(tmp_path)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(RuntimeCliError, match="not a JSON object"):
        load_spec(tmp_path)


def test_network_namespace_without_a_path_is_loopback_only(bundle: Path) -> None:
    spec = _spec(bundle)
    spec["linux"] = {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]}
    assert translate(spec, bundle, "c", CFG).netns == ""


def test_the_hosts_network_is_refused(bundle: Path) -> None:
    spec = _spec(bundle)
    spec["linux"] = {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
    with pytest.raises(RuntimeCliError, match="cannot share the host's"):
        translate(spec, bundle, "c", CFG)
