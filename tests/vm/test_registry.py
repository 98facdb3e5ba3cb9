"""Registry pulls end to end: Debian's docker-registry on 127.0.0.1, images pushed with
skopeo, and the real `vmpod pull / images / run / rmi`.

The image store lives in a per-module VMPOD_HOME whose guest assets are links to the
session's cache, so nothing here touches the user's image store.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.oci import make_oci_layout
from tests.vm.conftest import Result, VmpodRunner
from vmpod.paths import Paths

Cli = Callable[..., Result]


@dataclass(frozen=True)
class Registry:
    host: str
    storage: Path

    def push(self, layout: Path, tag: str, name: str) -> None:
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                f"oci:{layout}:{tag}",
                f"docker://{self.host}/{name}",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def blob_file(self, digest: str) -> Path:
        hexpart = digest.partition(":")[2]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("registry")
    host = f"127.0.0.1:{_free_port()}"
    config = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": True}},
        "http": {"addr": host},
    }
    (root / "config.yml").write_text(json.dumps(config))  # JSON is valid YAML
    with (root / "registry.log").open("wb") as log:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(root / "config.yml")], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://{host}/v2/", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"docker-registry did not start: {(root / 'registry.log').read_text()[-2000:]}"
                    )
                time.sleep(0.1)
        yield Registry(host, root / "data")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def images(registry: Registry, busybox: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """bb:v1 and bb2:v1 share busybox's one layer; bad:v1 has a layer of its own."""
    root = tmp_path_factory.mktemp("layouts")
    digests = {}
    for name, who in (("bb", "one"), ("bb2", "two")):
        layout = make_oci_layout(busybox, root / name, tag="v1", config={"Env": ["PATH=/bin", f"WHO={who}"]})
        registry.push(layout, "v1", f"{name}:v1")
        digests[name] = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    other = root / "other-rootfs"
    shutil.copytree(busybox, other, symlinks=True)
    (other / "extra").write_text("not shared")
    bad = make_oci_layout(other, root / "bad", tag="v1")
    registry.push(bad, "v1", "bad:v1")
    manifest = json.loads(
        (
            bad
            / "blobs/sha256"
            / json.loads((bad / "index.json").read_text())["manifests"][0]["digest"].partition(":")[2]
        ).read_text()
    )
    digests["bad-layer"] = manifest["layers"][0]["digest"]
    return digests


@pytest.fixture(scope="module")
def home(paths: Paths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    for name in ("kernels", "guest"):  # reuse the built guest assets
        (home / name).symlink_to(paths.home / name)
    return home


@pytest.fixture
def cli(vmpod: VmpodRunner, home: Path) -> Iterator[Cli]:
    def call(*args: str) -> Result:
        return vmpod(*args, env={"VMPOD_HOME": str(home)})

    yield call
    for scratch in (home / "tmp", home / "images/incoming"):
        assert not scratch.exists() or list(scratch.iterdir()) == [], f"{scratch} not empty"


def _blobs(home: Path) -> set[str]:
    root = home / "images/blobs/sha256"
    return {f"sha256:{p.name}" for p in root.iterdir()} if root.exists() else set()


def _one_error_line(r: Result) -> str:
    lines = [ln for ln in r.err.splitlines() if ln.startswith("vmpod: error:")]
    assert r.returncode == 125 and len(lines) == 1, r.err
    return lines[0]


def test_pull_list_share_and_remove(cli: Cli, registry: Registry, images: dict[str, str], home: Path) -> None:
    r = cli("pull", f"{registry.host}/bb:v1")
    assert r.returncode == 0, r.err
    assert r.out.strip() == images["bb"]
    r = cli("pull", f"{registry.host}/bb2:v1")
    assert r.returncode == 0, r.err
    assert "already present" in r.err  # the shared layer was not fetched again
    assert len(_blobs(home)) == 5  # 2 manifests, 2 configs, 1 layer
    listing = cli("images").out.splitlines()
    assert listing[0].split() == ["REPOSITORY", "TAG", "DIGEST", "SIZE", "CREATED"]
    rows = {tuple(line.split()[:3]) for line in listing[1:]}
    assert rows == {
        (f"{registry.host}/bb", "v1", images["bb"][7:19]),
        (f"{registry.host}/bb2", "v1", images["bb2"][7:19]),
    }
    r = cli("rmi", f"{registry.host}/bb2:v1")
    assert r.returncode == 0 and "deleted 2 blobs" in r.out, r.out + r.err
    assert len(_blobs(home)) == 3 and images["bb2"] not in _blobs(home)
    r = cli("rmi", f"{registry.host}/bb2:v1")
    assert "image not known" in _one_error_line(r)


def test_run_pulls_on_demand_then_rmi_removes_its_disk(
    cli: Cli, registry: Registry, images: dict[str, str], home: Path
) -> None:
    ref = f"{registry.host}/bb:v1"
    cli("rmi", ref)  # whatever an earlier test left: this run must pull
    r = cli("run", ref, "--", "sh", "-c", 'echo hi "$WHO"')
    assert r.returncode == 0, r.err
    assert r.out == "hi one\n"
    disks = list((home / "images/disks").glob("*.erofs"))  # not the lease files beside them
    assert len(disks) == 1
    assert cli("images", "-q").out.split() == [ref]
    r = cli("rmi", ref)
    assert r.returncode == 0, r.err
    assert not disks[0].exists() and _blobs(home) == set()


def test_registry_errors(cli: Cli, registry: Registry, images: dict[str, str]) -> None:
    r = cli("pull", f"{registry.host}/bb:nope")
    assert f"manifest unknown: {registry.host}/bb:nope not found" in _one_error_line(r)
    port = _free_port()
    r = cli("run", f"127.0.0.1:{port}/bb:v1", "--", "true")
    assert f"cannot reach registry 127.0.0.1:{port}: connection refused (is it running?)" in _one_error_line(
        r
    )
    blob = registry.blob_file(images["bad-layer"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    blob.write_bytes(bytes(data))
    r = cli("pull", f"{registry.host}/bad:v1")
    assert f"digest mismatch (expected {images['bad-layer']}" in _one_error_line(r)
    assert f"{registry.host}/bad:v1" not in cli("images", "-q").out.split()
