"""`vmpod matrix` and the kernel catalog on real kernels, real builds, real VMs."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vm.conftest import REPO, Result, VmpodRunner

MODULES = REPO / "examples" / "modules"
THREE = "6.1-generic,6.1,6.12-generic"


def _argv(tmp: Path, kernels: str, module: str, test: Path | None = None) -> list[str]:
    return [
        "matrix",
        "--kernels",
        kernels,
        "--module-src",
        str(MODULES / module),
        "--test",
        str(test or MODULES / module / "test.sh"),
        "--logs",
        str(tmp / "logs"),
        "--json",
        str(tmp / "out.json"),
        "--junit",
        str(tmp / "out.xml"),
    ]


def _matrix(
    vmpod: VmpodRunner, tmp: Path, kernels: str, module: str, *extra: str, test: Path | None = None
) -> tuple[Result, dict[str, Any]]:
    """Run ``vmpod matrix``; its result and the JSON report's results by kernel name."""
    r = vmpod(*_argv(tmp, kernels, module, test), *extra, timeout=1200)
    results = {x["kernel"]: x for x in json.loads((tmp / "out.json").read_text())["results"]}
    return r, results


def test_example_module_passes_on_three_kernels(vmpod: VmpodRunner, tmp_path: Path) -> None:
    r, results = _matrix(vmpod, tmp_path, THREE, "vmpod_echo")
    assert r.returncode == 0, r.err
    assert set(results) == set(THREE.split(","))
    for name, res in results.items():
        assert res["passed"], (name, res)
        assert res["dmesg"] == "clean"
        assert "PASS" in (Path(res["logs"]) / "test.log").read_text()
    assert results["6.12-generic"]["release"].startswith("6.12.")
    suite = ET.parse(tmp_path / "out.xml").getroot()
    assert suite.get("tests") == "3" and suite.get("failures") == "0"


def test_api_change_fails_the_build_on_one_kernel_only(vmpod: VmpodRunner, tmp_path: Path) -> None:
    r, results = _matrix(vmpod, tmp_path, "6.1,6.12-generic", "api_break")
    assert r.returncode == 1
    assert results["6.1"]["passed"], results["6.1"]
    bad = results["6.12-generic"]
    assert bad["steps"]["build"] == "fail" and bad["steps"]["boot"] == "skip"
    assert "class_create" in bad["detail"]
    assert "error:" in (Path(bad["logs"]) / "build.log").read_text()
    suite = ET.parse(tmp_path / "out.xml").getroot()
    assert suite.get("failures") == "1"


def test_oops_on_load_is_detected(vmpod: VmpodRunner, tmp_path: Path) -> None:
    r, results = _matrix(vmpod, tmp_path, "6.1", "oops_on_load")
    assert r.returncode == 1
    res = results["6.1"]
    assert res["steps"]["load"] == "fail" and res["steps"]["test"] == "skip"
    assert res["dmesg"] == "oops"
    assert any("NULL pointer" in f or "Oops" in f for f in res["findings"])


def test_guest_out_of_memory_is_not_clean(vmpod: VmpodRunner, tmp_path: Path) -> None:
    hog = tmp_path / "hog.sh"
    hog.write_text("echo eating; tail /dev/zero\n")  # busybox tail buffers without end
    r, results = _matrix(vmpod, tmp_path, "6.1", "vmpod_echo", "--test-timeout", "240", test=hog)
    assert r.returncode == 1
    res = results["6.1"]
    assert res["dmesg"] == "oom", res  # was "clean"
    assert any("Out of memory" in f or "oom-killer" in f for f in res["findings"]), res
    assert res["steps"]["load"] == "ok" and res["steps"]["test"] == "fail"


def test_interrupted_matrix_writes_partial_results(vmpod: VmpodRunner, tmp_path: Path) -> None:
    slow = tmp_path / "slow.sh"
    slow.write_text("echo started; sleep 600\n")
    # its own process group, signalled as a terminal's Ctrl-C signals the foreground group
    proc = vmpod.popen(
        *_argv(tmp_path, "6.1", "vmpod_echo", slow), stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == b"[6.1] test: running":
            break
    else:
        raise AssertionError(f"the matrix ended before its test ran: {proc.wait()}")
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    res = json.loads((tmp_path / "out.json").read_text())
    (one,) = res["results"]
    assert one["steps"]["test"] == "interrupted" and one["detail"] == "interrupted by SIGINT"
    assert ET.parse(tmp_path / "out.xml").getroot().get("failures") == "1"
    # (the vmpod fixture checks that no QEMU, mount or state is left behind)


@pytest.fixture
def corrupt_kernel(vmpod: VmpodRunner, tmp_path: Path) -> Iterator[str]:
    info = json.loads(vmpod("kernel", "info", "6.1").out)
    image = bytearray(Path(info["root"], "vmlinuz").read_bytes())
    setup = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup + 1) * 512 + offset + length // 3
    image[start : start + 65536] = bytes((b * 7 + 13) & 0xFF for b in image[start : start + 65536])
    bad = tmp_path / "vmlinuz-corrupt"
    bad.write_bytes(bytes(image))
    r = vmpod(
        "kernel",
        "add",
        "corrupt-test",
        "--vmlinuz",
        str(bad),
        "--modules",
        info["modules"],
        "--headers",
        info["headers"],
    )
    assert r.returncode == 0, r.err
    yield "corrupt-test"
    assert vmpod("kernel", "rm", "corrupt-test").returncode == 0


def test_kernel_that_does_not_boot_is_reported(
    vmpod: VmpodRunner, tmp_path: Path, corrupt_kernel: str
) -> None:
    listing = vmpod("kernel", "list").out
    assert "local-corrupt-test" in listing and "6.1.0-" in listing
    r, results = _matrix(vmpod, tmp_path, f"6.1,{corrupt_kernel}", "vmpod_echo", "--boot-timeout", "20")
    assert r.returncode == 1
    assert results["6.1"]["passed"]  # the good kernel is unaffected
    bad = results[corrupt_kernel]
    assert bad["steps"]["build"] == "ok" and bad["steps"]["boot"] == "fail"
    console = (Path(bad["logs"]) / "console.log").read_text()
    assert "halted" in console or "failed" in console, console


def test_run_loads_a_kernel_module(vmpod: VmpodRunner, busybox: Path) -> None:
    r = vmpod(
        "run", "--kernel-module", "dummy=numdummies=3", "--rootfs", str(busybox), "--", "ls", "/sys/class/net"
    )
    assert r.returncode == 0, r.err
    assert {"dummy0", "dummy1", "dummy2"} <= set(r.out.split())


def test_bad_module_arguments(vmpod: VmpodRunner, busybox: Path, tmp_path: Path) -> None:
    r = vmpod("run", "--kernel-module", "no_such_module", "--rootfs", str(busybox), "--", "true")
    assert r.returncode == 125 and "no_such_module" in r.err
    r = vmpod("run", "--load-module", str(tmp_path / "missing.ko"), "--rootfs", str(busybox), "--", "true")
    assert r.returncode == 125 and "not found" in r.err
    r = vmpod(
        "matrix",
        "--kernels",
        "6.1",
        "--module-src",
        str(tmp_path),
        "--test",
        str(MODULES / "vmpod_echo/test.sh"),
    )
    assert r.returncode == 125 and "Kbuild or Makefile" in r.err
