"""OCI config features honoured inside the VM (the behaviours of the runtime-tools
programs hostname, linux_sysctl, linux_masked_paths, linux_readonly_paths,
root_readonly_true, process_user, process_oom_score_adj, process_rlimits,
linux_devices, mounts, linux_ns_*, linux_cgroups_pids, linux_uid_mappings),
written from the spec because those programs are not packaged here.

One container carries all the features and prints what it sees, so one VM boot
covers them; user namespaces get a second container.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.test_runtime_support import Runtime, assert_runtime_clean, make_bundle, runtime_env
from vmpod.guest.assets import GuestAssets
from vmpod.paths import Paths

PROBE = """
echo "hostname=$(hostname)"
echo "domainname=$(cat /proc/sys/kernel/domainname)"
echo "kcore_bytes=$(wc -c < /proc/kcore)"
if echo x 2>/dev/null > /proc/sys/kernel/domainname; then echo procsys=rw; else echo procsys=ro; fi
if touch /rootfile 2>/dev/null; then echo root=rw; else echo root=ro; fi
echo "uid=$(id -u) gid=$(id -g) groups=$(id -G | tr ' ' ,)"
echo "oom=$(cat /proc/self/oom_score_adj)"
echo "nofile=$(ulimit -n)"
[ -c /dev/vmpod_null ] && echo data > /dev/vmpod_null && echo device=ok
echo "data_fs=$(awk '$2 == "/data" {print $3}' /proc/mounts)"
echo "pid=$$"
echo "pids_max=$(cat /sys/fs/cgroup/pids.max)"
echo "foo=$FOO"
"""


@pytest.fixture(scope="module")
def rt(paths: Paths, assets: GuestAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    work = tmp_path_factory.mktemp("rtconf")
    runtime = Runtime(work / "root", runtime_env(paths, work / "runtime.json"), work / "log.json")
    yield runtime
    assert_runtime_clean(paths, runtime.root)


def _run(rt: Runtime, cid: str, bundle: Path, work: Path) -> dict[str, str]:
    ctr = rt.create(cid, bundle, work)
    ctr.wait_created()
    rt("start", cid, check=True)
    result = ctr.result()
    out, err = ctr.output()
    rt("delete", cid, check=True)
    assert result.get("status") == 0, (result, out, err)
    return dict(line.split("=", 1) for line in out.split() if "=" in line)


def test_config_features_inside_the_vm(rt: Runtime, busybox: Path, tmp_path: Path) -> None:
    bundle = make_bundle(
        tmp_path / "features",
        busybox,
        ["sh", "-c", PROBE],
        hostname="conf-host",
        env=["PATH=/bin", "FOO=bar"],
        user={"uid": 1000, "gid": 1000, "additionalGids": [50]},
    )
    import json

    spec = json.loads((bundle / "config.json").read_text())
    spec["root"]["readonly"] = True
    spec["process"]["oomScoreAdj"] = 500
    spec["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": 1111, "soft": 1111}]
    spec["mounts"].append(
        {"destination": "/data", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]}
    )
    linux = spec["linux"]
    linux["sysctl"] = {"kernel.domainname": "vmpod.test"}
    linux["maskedPaths"] = ["/proc/kcore"]
    linux["readonlyPaths"] = ["/proc/sys"]
    linux["devices"] = [
        {"path": "/dev/vmpod_null", "type": "c", "major": 1, "minor": 3, "fileMode": 438, "uid": 0, "gid": 0}
    ]
    resources = linux.setdefault("resources", {})
    resources.setdefault("devices", []).append(
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"}
    )
    resources["pids"] = {"limit": 77}
    (bundle / "config.json").write_text(json.dumps(spec))
    seen = _run(rt, "features", bundle, tmp_path)
    assert seen["hostname"] == "conf-host"
    assert seen["domainname"] == "vmpod.test"
    assert seen["kcore_bytes"] == "0"
    assert seen["procsys"] == "ro"
    assert seen["root"] == "ro"
    assert (seen["uid"], seen["gid"]) == ("1000", "1000")
    assert "50" in seen["groups"].split(",")
    assert seen["oom"] == "500"
    assert seen["nofile"] == "1111"
    assert seen.get("device") == "ok"
    assert seen["data_fs"] == "tmpfs"
    assert seen["pid"] == "1"  # a pid namespace of its own
    assert seen["pids_max"] == "77"
    assert seen["foo"] == "bar"


def test_user_namespace_mappings(rt: Runtime, busybox: Path, tmp_path: Path) -> None:
    import json

    bundle = make_bundle(
        tmp_path / "userns",
        busybox,
        ["sh", "-c", 'echo "map=$(cat /proc/self/uid_map | tr -s " " :)"; echo "me=$(id -u)"'],
    )
    spec = json.loads((bundle / "config.json").read_text())
    linux = spec["linux"]
    linux["namespaces"] = [n for n in linux["namespaces"] if n["type"] != "user"] + [{"type": "user"}]
    linux["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    linux["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    (bundle / "config.json").write_text(json.dumps(spec))
    seen = _run(rt, "userns", bundle, tmp_path)
    assert seen["me"] == "0"
    assert seen["map"].strip(":") == "0:100000:65536"
