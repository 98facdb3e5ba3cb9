"""Registry pulls and the image store against a fake registry on 127.0.0.1 (no VM)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import re
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.hostile_registry import tar_layer
from vmpod.cli.images_cmd import _ago
from vmpod.errors import ImageError
from vmpod.images import resolve_image
from vmpod.images.reference import parse_reference
from vmpod.images.registry import RegistryClient, copy_verified
from vmpod.images.resolve import registry_reference
from vmpod.images.store import (
    ImageStore,
    PullOptions,
    disk_path,
    human_size,
    parse_creds,
    pull,
)
from vmpod.paths import Paths

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(files: dict[str, bytes]) -> tuple[bytes, bytes]:
    """(gzip blob, uncompressed tar) of a layer holding ``files``."""
    tar = tar_layer(files)
    return gzip.compress(tar, mtime=0), tar


class FakeRegistry:
    """Just enough of the distribution API: manifests, blobs, bearer/basic auth, redirects."""

    def __init__(self) -> None:
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.blobs: dict[str, bytes] = {}
        self.auth = ""  # "", "bearer" or "basic"
        self.creds = ("alice", "s3cret")
        self.redirect_blobs = False
        self.requests: list[tuple[str, str]] = []  # (path, Authorization header)
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                registry.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def image(
        self,
        repo: str,
        tag: str,
        layers: list[tuple[bytes, bytes]],
        *,
        env: str = "",
        media: str = OCI_MANIFEST,
    ) -> str:
        cfg = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "created": "2024-01-01T00:00:00Z",
                "config": {"Env": [env]} if env else {},
                "rootfs": {"type": "layers", "diff_ids": [sha(raw) for _, raw in layers]},
            }
        ).encode()
        self.blobs[sha(cfg)] = cfg
        for blob, _ in layers:
            self.blobs[sha(blob)] = blob
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": media,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": sha(cfg),
                    "size": len(cfg),
                },
                "layers": [
                    {
                        "mediaType": DOCKER_LAYER if media == DOCKER_MANIFEST else LAYER,
                        "digest": sha(b),
                        "size": len(b),
                    }
                    for b, _ in layers
                ],
            }
        ).encode()
        self.manifests[(repo, tag)] = self.manifests[(repo, sha(manifest))] = (media, manifest)
        return sha(manifest)

    def blob_gets(self, digest: str) -> int:
        return sum(1 for path, _ in self.requests if path.endswith(digest))

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        auth = req.headers.get("Authorization", "")
        self.requests.append((req.path, auth))
        basic = "Basic " + base64.b64encode(":".join(self.creds).encode()).decode()
        if req.path.startswith("/token"):
            return (
                self.reply(req, 200, json.dumps({"token": "T0K"}).encode())
                if auth == basic
                else self.reply(req, 401, b"{}")
            )
        if req.path.startswith("/storage/"):
            return self.reply(req, 200, self.blobs[req.path.rpartition("/")[2]])
        if self.auth == "bearer" and auth != "Bearer T0K":
            realm = f"http://{self.host}/token"
            return self.reply(
                req,
                401,
                b"{}",
                {"WWW-Authenticate": f'Bearer realm="{realm}",service="fake",scope="repository:x:pull"'},
            )
        if self.auth == "basic" and auth != basic:
            return self.reply(req, 401, b"{}", {"WWW-Authenticate": 'Basic realm="fake"'})
        if req.path == "/v2/":  # clients ping the API root first (and learn the challenge)
            return self.reply(req, 200, b"{}")
        m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", req.path)
        if m and m.group(2) == "manifests" and (m.group(1), m.group(3)) in self.manifests:
            media, body = self.manifests[(m.group(1), m.group(3))]
            return self.reply(req, 200, body, {"Content-Type": media, "Docker-Content-Digest": sha(body)})
        if m and m.group(2) == "blobs" and m.group(3) in self.blobs:
            if self.redirect_blobs:
                # to another host (object storage): clients must not send credentials there
                where = f"http://localhost:{self.server.server_address[1]}/storage/{m.group(3)}"
                return self.reply(req, 307, b"", {"Location": where})
            return self.reply(req, 200, self.blobs[m.group(3)])
        code = "MANIFEST_UNKNOWN" if m and m.group(2) == "manifests" else "BLOB_UNKNOWN"
        self.reply(req, 404, json.dumps({"errors": [{"code": code, "message": "unknown"}]}).encode())

    @staticmethod
    def reply(
        req: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        req.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            req.send_header(key, value)
        req.end_headers()
        req.wfile.write(body)


@pytest.fixture
def reg() -> Iterator[FakeRegistry]:
    fake = FakeRegistry()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(home=tmp_path / "home", run=tmp_path / "run")


def blob_files(paths: Paths) -> set[str]:
    root = paths.images / "blobs" / "sha256"
    return {f"sha256:{p.name}" for p in root.iterdir()} if root.exists() else set()


# -- pure parsing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("user/app:1.0", "docker.io/user/app:1.0"),
        ("127.0.0.1:5000/bb:v1", "127.0.0.1:5000/bb:v1"),
        ("localhost/a/b", "localhost/a/b:latest"),
        ("quay.io/x/y@sha256:" + "a" * 64, "quay.io/x/y@sha256:" + "a" * 64),
        ("reg.io:443/x:t@sha256:" + "b" * 64, "reg.io:443/x:t@sha256:" + "b" * 64),
    ],
)
def test_parse_reference(text: str, expected: str) -> None:
    assert str(parse_reference(text)) == expected


@pytest.mark.parametrize(
    "text", ["", "Busybox", "reg.io/x:bad:tag", "a//b", "x@sha256:12", "reg.io/x:" + "t" * 129, "-x/y"]
)
def test_bad_references_are_refused(text: str) -> None:
    with pytest.raises(ImageError):
        parse_reference(text)


def test_plain_http_only_for_loopback_or_insecure() -> None:
    def verify(text: str, insecure: bool = False) -> bool:
        return RegistryClient(parse_reference(text), insecure=insecure).access.tls_verify

    assert not verify("localhost:5000/a")
    assert not verify("[::1]:5000/a")
    assert not verify("127.0.0.2:5000/a")
    assert verify("reg.example/a")
    assert not verify("reg.example/a", insecure=True)
    assert verify("busybox")
    assert parse_reference("busybox").host == "registry-1.docker.io"


def test_registry_references_versus_local_paths(tmp_path: Path) -> None:
    (tmp_path / "lay").mkdir()
    assert registry_reference(f"{tmp_path}/lay:tag") is None  # an existing path wins
    assert registry_reference("plain-name") is None  # no '/', ':' or '@'
    assert registry_reference("missing.tar:tag") is None  # an archive's name
    assert registry_reference("./rel/dir") is None
    assert registry_reference("127.0.0.1:5000/bb:v1") == "127.0.0.1:5000/bb:v1"
    assert registry_reference("docker://busybox") == "busybox"


def test_parse_creds() -> None:
    assert parse_creds("u:p:q") == ("u", "p:q")
    with pytest.raises(ImageError, match="USER:PASSWORD"):
        parse_creds("nocolon")


def test_copy_verified_checks_size_and_digest() -> None:
    data = b"x" * 5000
    out = io.BytesIO()
    assert copy_verified(io.BytesIO(data), out, sha(data), len(data), "b") == 5000
    assert out.getvalue() == data
    with pytest.raises(ImageError, match="digest mismatch"):
        copy_verified(io.BytesIO(b"y" * 5000), io.BytesIO(), sha(data), 5000, "b")
    with pytest.raises(ImageError, match="more data than"):
        copy_verified(io.BytesIO(data + b"!"), io.BytesIO(), sha(data), 5000, "b")
    with pytest.raises(ImageError, match="got 4999 bytes"):
        copy_verified(io.BytesIO(data[:-1]), io.BytesIO(), sha(data), 5000, "b")


def test_formatting() -> None:
    now = datetime(2024, 1, 16, tzinfo=UTC)
    assert _ago("2024-01-01T00:00:00.123456789Z", now) == "2 weeks ago"
    assert _ago("2024-01-15T23:00:00Z", now) == "1 hour ago"
    assert _ago("", now) == "-"
    assert (human_size(999), human_size(1234567)) == ("999 B", "1.2 MB")


# -- pulls against the fake registry -------------------------------------------


def test_pull_shares_layers_and_rmi_collects(reg: FakeRegistry, paths: Paths, tmp_path: Path) -> None:
    base, top = layer({"etc/base": b"base"}), layer({"app": b"app"})
    one = reg.image("one", "v1", [base], env="N=1")
    two = reg.image("two", "v1", [base, top], env="N=2", media=DOCKER_MANIFEST)
    assert pull(paths, f"{reg.host}/one:v1").digest == one
    assert pull(paths, f"{reg.host}/two:v1").digest == two
    assert reg.blob_gets(sha(base[0])) == 1  # the shared layer came once
    assert len(blob_files(paths)) == 2 + 2 + 2  # 2 manifests, 2 configs, 2 layers
    src = resolve_image(f"{reg.host}/two:v1", paths=paths)
    assert (src.digest, src.config.env) == (two, ("N=2",))
    (tmp_path / "root").mkdir()
    src.unpack(tmp_path / "root")
    assert (tmp_path / "root/app").read_bytes() == b"app"
    disk = disk_path(paths.images, two)
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"erofs")
    store = ImageStore(paths.images)
    removal = store.remove(f"{reg.host}/two:v1")
    assert (removal.blobs_removed, disk.exists()) == (3, False)  # manifest, config, top
    assert sha(base[0]) in blob_files(paths)
    store.remove(f"{reg.host}/one:v1")
    assert blob_files(paths) == set() and store.images() == []


def test_pull_on_demand_and_index_platform(reg: FakeRegistry, paths: Paths) -> None:
    amd = reg.image("multi", "amd", [layer({"a": b"amd64"})])
    arm = reg.image("multi", "arm", [layer({"a": b"arm64"})])
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_LIST,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": d,
                    "size": len(reg.manifests[("multi", d)][1]),
                    "platform": {"os": "linux", "architecture": arch},
                }
                for d, arch in ((arm, "arm64"), (amd, "amd64"))
            ],
        }
    ).encode()
    reg.manifests[("multi", "latest")] = reg.manifests[("multi", sha(index))] = (DOCKER_LIST, index)
    src = resolve_image(f"{reg.host}/multi", paths=paths)  # not in the store: pulled
    assert src.digest == amd
    assert ImageStore(paths.images).images()[0].created == "2024-01-01T00:00:00Z"
    before = len(reg.requests)
    assert resolve_image(f"{reg.host}/multi:latest", paths=paths).digest == amd
    assert len(reg.requests) == before  # second time: from the store
    assert pull(paths, f"{reg.host}/multi@{sha(index)}").digest == amd


def test_repull_moves_the_tag_and_collects_the_old_image(reg: FakeRegistry, paths: Paths) -> None:
    old = reg.image("app", "v1", [layer({"v": b"1"})])
    pull(paths, f"{reg.host}/app:v1")
    new = reg.image("app", "v1", [layer({"v": b"2"})])
    assert pull(paths, f"{reg.host}/app:v1").digest == new
    assert old not in blob_files(paths) and len(blob_files(paths)) == 3


def test_bearer_token_auth_and_redirects_drop_credentials(reg: FakeRegistry, paths: Paths) -> None:
    reg.auth, reg.redirect_blobs = "bearer", True
    digest = reg.image("x", "v1", [layer({"f": b"1"})])
    with pytest.raises(ImageError, match="token server .* refused access"):
        pull(paths, f"{reg.host}/x:v1")
    assert pull(paths, f"{reg.host}/x:v1", PullOptions(creds=reg.creds)).digest == digest
    storage = [auth for path, auth in reg.requests if path.startswith("/storage/")]
    assert storage and set(storage) == {""}  # config and layer, never with credentials
    assert {p for p, _ in reg.requests if p.startswith("/storage/")} == {f"/storage/{d}" for d in reg.blobs}
    assert ("/v2/x/manifests/v1", "Bearer T0K") in reg.requests


def test_basic_auth(reg: FakeRegistry, paths: Paths) -> None:
    reg.auth = "basic"
    reg.image("x", "v1", [layer({"f": b"1"})])
    with pytest.raises(ImageError, match="authentication required .*--creds"):
        pull(paths, f"{reg.host}/x:v1")
    with pytest.raises(ImageError, match="credentials were refused"):
        pull(paths, f"{reg.host}/x:v1", PullOptions(creds=("alice", "wrong")))
    pull(paths, f"{reg.host}/x:v1", PullOptions(creds=reg.creds))


def test_registry_errors(reg: FakeRegistry, paths: Paths) -> None:
    good, _ = layer({"f": b"1"})
    reg.image("x", "v1", [(good, _)])
    with pytest.raises(ImageError, match=rf"^manifest unknown: {reg.host}/x:v2 not found$"):
        pull(paths, f"{reg.host}/x:v2")
    reg.blobs[sha(good)] = good[:-1] + bytes([good[-1] ^ 1])  # corrupt, same size
    with pytest.raises(ImageError, match="digest mismatch"):
        pull(paths, f"{reg.host}/x:v1")
    assert sha(good) not in blob_files(paths)
    assert list((paths.images / "incoming").iterdir()) == []
    assert ImageStore(paths.images).images() == []
    reg.manifests[("x", "big")] = (OCI_MANIFEST, b" " * (4 << 20) + b"{}")
    with pytest.raises(ImageError, match="larger than"):
        pull(paths, f"{reg.host}/x:big")
    reg.manifests[("x", "v0")] = ("application/json", b'{"schemaVersion": 1}')
    with pytest.raises(ImageError, match="schema 1"):
        pull(paths, f"{reg.host}/x:v0")


def test_unreachable_and_silent_registries(paths: Paths) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(
            ImageError,
            match=rf"^cannot reach registry 127.0.0.1:{port}: "
            r"connection refused \(is it running\?\)$",
        ):
            pull(paths, f"127.0.0.1:{port}/x:v1")
        sock.listen()  # accepts connections (kernel backlog) but never answers
        with pytest.raises(ImageError, match="did not answer within 0.5s"):
            pull(paths, f"127.0.0.1:{port}/x:v1", PullOptions(timeout=0.5))


def test_concurrent_pulls_keep_the_store_consistent(reg: FakeRegistry, paths: Paths) -> None:
    base = layer({"base": b"b" * 100_000})
    names = [f"img{i}" for i in range(4)]
    for i, name in enumerate(names):
        reg.image(name, "v1", [base, layer({"n": str(i).encode()})])
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            pull(paths, f"{reg.host}/{name}:v1")
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(n,)) for n in names * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = ImageStore(paths.images)
    assert sorted(i.name for i in store.images()) == [f"{reg.host}/{n}:v1" for n in names]
    assert len(blob_files(paths)) == 1 + 3 * len(names)
    for name in names:
        store.remove(f"{reg.host}/{name}:v1")
    assert blob_files(paths) == set()


def test_disk_path_matches_the_erofs_cache(paths: Paths, reg: FakeRegistry) -> None:
    from vmpod.storage.erofs import rootfs_disk

    reg.image("x", "v1", [layer({"f": b"1"})])
    src = resolve_image(f"{reg.host}/x:v1", paths=paths)
    disk = disk_path(paths.images, src.digest)
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"cached")
    assert rootfs_disk(paths, src) == disk  # found in the cache, so not rebuilt
