"""`vmpod pull` against a hostile registry on loopback: the real pull path, skopeo as the client."""

from __future__ import annotations

import base64
import gzip
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.hostile_registry import (
    HostileRegistry,
    local_address,
    self_signed,
    sha,
    sparse_tar,
    tar_layer,
    wait_for,
)
from vmpod.errors import ImageError, VmpodError
from vmpod.images import resolve_image
from vmpod.images.reference import parse_reference
from vmpod.images.store import ImageStore, PullOptions, pull
from vmpod.paths import Paths

GOOD = gzip.compress(tar_layer({"etc/hello": b"hello"}), mtime=0)


@pytest.fixture
def reg() -> Iterator[HostileRegistry]:
    registry = HostileRegistry()
    registry.image("good", "v1", [GOOD])
    yield registry
    registry.close()


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Paths:
    # skopeo's scratch layouts go here, so the tests can show nothing is left behind
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.delenv("REGISTRY_AUTH", raising=False)
    return Paths(home=tmp_path / "home", run=tmp_path / "run")


def skopeo_pids(reg: HostileRegistry) -> list[int]:
    """skopeo processes talking to this registry (their argv names it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"skopeo") and any(reg.host.encode() in a for a in argv):
            pids.append(int(entry))
    return pids


def leftovers(tmp_path: Path) -> list[str]:
    """Scratch dirs skopeo copies or auth files went to, still on disk (in the
    image store's incoming/ or the temp dir)."""
    return [str(p) for p in tmp_path.rglob("*") if p.name.startswith((".pull-", ".auth-"))]


def failed_pull(paths: Paths, ref: str, options: PullOptions | None = None) -> ImageError:
    with pytest.raises(ImageError) as info:
        pull(paths, ref, options or PullOptions())
    assert "\n" not in str(info.value), "errors are one line"
    return info.value


# -- redirects -------------------------------------------------------------------


def test_endless_redirect_body_is_not_read(reg: HostileRegistry, paths: Paths, tmp_path: Path) -> None:
    """A 307 whose body never ends: followed without reading the body (urllib read it all)."""
    reg.image("bottomless", "v1", [GOOD])
    reg.misbehave["bottomless"] = "endless-307"
    image = pull(paths, f"{reg.host}/bottomless:v1")
    assert image.digest == sha(reg.manifests[("bottomless", "v1")])
    endless = reg.sent["/v2/bottomless/manifests/v1"]
    assert 0 < endless < 64 << 20  # socket buffers at most, not gigabytes
    assert skopeo_pids(reg) == [] and leftovers(tmp_path) == []


def test_redirect_loop_is_one_line(reg: HostileRegistry, paths: Paths) -> None:
    reg.image("loop", "v1", [GOOD])
    reg.misbehave["loop"] = "redirect-loop"
    err = failed_pull(paths, f"{reg.host}/loop:v1")
    assert f"registry {reg.host} redirects {reg.host}/loop:v1 in a loop" in str(err)


@pytest.mark.parametrize("mode", ["ftp", "file"])
def test_redirects_to_other_schemes_are_not_followed(reg: HostileRegistry, paths: Paths, mode: str) -> None:
    """Plain-HTTP mode (loopback, --insecure): ftp://user:pass@… and file:// are refused."""
    reg.image("elsewhere", "v1", [GOOD])
    reg.misbehave["elsewhere"] = mode
    if mode == "ftp":
        assert reg.ftp_port  # listening, counting connections
    err = failed_pull(paths, f"{reg.host}/elsewhere:v1", PullOptions(insecure=True))
    assert f"redirects {reg.host}/elsewhere:v1 to {mode}://" in str(err)
    assert "user:pass@" not in str(err)  # the URL's password is not echoed
    assert mode != "ftp" or reg.ftp_hits == 0
    assert ImageStore(paths.images).images() == []


def test_https_registry_never_downgrades_to_plain_http(
    paths: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verified-HTTPS registry that redirects blobs to http://, or names a plain-HTTP
    token server: refused, and the plain-HTTP side never sees a request (or a credential)."""
    address = local_address()
    if address is None:
        pytest.skip("no non-loopback address to serve HTTPS on")
    cert, key = self_signed(tmp_path, address)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted like a real CA
    tls, plain = HostileRegistry(bind=address, tls=(cert, key)), HostileRegistry(bind=address)
    try:
        digest = tls.image("x", "v1", [GOOD])
        plain.blobs.update(tls.blobs)
        tls.redirect_blobs_to = f"http://{plain.host}/storage/"
        err = failed_pull(paths, f"{tls.host}/x:v1")
        assert f"registry {tls.host} sends us to plain HTTP" in str(err)
        assert "refusing to leave HTTPS" in str(err)
        tls.redirect_blobs_to, tls.token_realm = "", f"http://{plain.host}/token"
        err = failed_pull(paths, f"{tls.host}/x:v1", PullOptions(creds=("alice", "s3cret")))
        assert "refusing to leave HTTPS" in str(err)
        assert plain.requests == []
        tls.token_realm = ""
        assert pull(paths, f"{tls.host}/x:v1").digest == digest  # HTTPS itself works
    finally:
        tls.close()
        plain.close()


# -- deadlines ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["trickle-headers", "trickle-manifest", "trickle-blob", "continue"])
def test_every_pull_has_a_deadline(
    reg: HostileRegistry, paths: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """One byte per interval (headers, manifest body, blob) or endless 100 Continue: the pull
    ends at VMPOD_PULL_TIMEOUT with one line, no skopeo process and no scratch dir left."""
    reg.image("slow", "v1", [GOOD])
    reg.misbehave["slow"] = mode
    monkeypatch.setenv("VMPOD_PULL_TIMEOUT", "3")
    err = failed_pull(paths, f"{reg.host}/slow:v1")
    if mode == "continue":  # Go's client gives up on endless interim responses by itself
        assert "endless interim (1xx) responses" in str(err)
    else:
        assert f"pull of {reg.host}/slow:v1 did not finish within 3s" in str(err)
    assert skopeo_pids(reg) == [] and leftovers(tmp_path) == []
    assert ImageStore(paths.images).images() == []


def test_per_document_timeout(reg: HostileRegistry, paths: Paths, tmp_path: Path) -> None:
    reg.image("slow", "v1", [GOOD])
    reg.misbehave["slow"] = "trickle-headers"
    err = failed_pull(paths, f"{reg.host}/slow:v1", PullOptions(timeout=1.5))
    assert f"registry {reg.host} did not answer within 1.5s" in str(err)
    assert skopeo_pids(reg) == []


def test_bad_pull_timeout_setting(
    reg: HostileRegistry, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMPOD_PULL_TIMEOUT", "soon")
    with pytest.raises(VmpodError, match="VMPOD_PULL_TIMEOUT='soon' is not a number of seconds"):
        pull(paths, f"{reg.host}/good:v1")


def test_killed_pull_leaves_no_skopeo_and_its_scratch_is_collected(
    reg: HostileRegistry, tmp_path: Path
) -> None:
    """SIGKILL of `vmpod pull` mid-copy: skopeo dies with it (own group, PDEATHSIG), and
    the next pull removes the dead pull's scratch dir."""
    reg.image("slow", "v1", [GOOD])
    reg.misbehave["slow"] = "trickle-blob"
    paths = Paths(home=tmp_path / "cache" / "vmpod", run=tmp_path / "run")
    env = {
        **os.environ,
        "TMPDIR": str(tmp_path / "tmp"),
        "VMPOD_HOME": str(paths.home),
        "VMPOD_RUN": str(paths.run),
    }
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmpod.cli", "pull", f"{reg.host}/slow:v1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(
            lambda: any(p.endswith("blobs") for p in map(str, (paths.home / "images").rglob("*")))
        )
        assert wait_for(lambda: skopeo_pids(reg) != [])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert wait_for(lambda: skopeo_pids(reg) == [])
    assert leftovers(tmp_path) != []  # SIGKILL runs no cleanup ...
    reg.misbehave.clear()
    old = tempfile.tempdir
    tempfile.tempdir = str(tmp_path / "tmp")
    try:
        pull(paths, f"{reg.host}/good:v1")
    finally:
        tempfile.tempdir = old
    assert leftovers(tmp_path) == []  # ... the next pull collects it


# -- what a pull may write ---------------------------------------------------------


def test_declared_size_over_the_image_cap_is_refused_before_download(
    reg: HostileRegistry, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg.image("huge", "v1", [GOOD], sizes={0: 5 << 30})
    monkeypatch.setenv("VMPOD_MAX_IMAGE_BYTES", "1G")
    err = failed_pull(paths, f"{reg.host}/huge:v1")
    assert "more than the 1073741824-byte limit" in str(err)
    assert not any("/blobs/" in path for path, _ in reg.requests)


def test_declared_size_over_free_space_is_refused_before_download(
    reg: HostileRegistry, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = os.statvfs(paths.home.parent)
    too_big = st.f_bavail * st.f_frsize + (1 << 30)
    reg.image("huge", "v1", [GOOD], sizes={0: too_big})
    monkeypatch.setenv("VMPOD_MAX_IMAGE_BYTES", "1000T")
    err = failed_pull(paths, f"{reg.host}/huge:v1")
    assert f"declares {too_big} bytes but only" in str(err)
    assert reg.sent[f"/v2/huge/blobs/{sha(GOOD)}"] == 0


def test_a_blob_longer_than_declared_is_cut_off(reg: HostileRegistry, paths: Paths, tmp_path: Path) -> None:
    reg.image("long", "v1", [GOOD])
    reg.misbehave["long"] = "endless-blob"
    err = failed_pull(paths, f"{reg.host}/long:v1")
    assert "more than its declared size" in str(err)
    assert reg.sent[f"/v2/long/blobs/{sha(GOOD)}"] < 256 << 20  # stopped early, not at the deadline
    assert skopeo_pids(reg) == [] and leftovers(tmp_path) == []
    assert sha(GOOD) not in {f"sha256:{p.name}" for p in (paths.images / "blobs" / "sha256").glob("*")}


@pytest.mark.parametrize(
    "blob",
    [
        gzip.compress(tar_layer({"bomb": b"A" * (96 << 20)}), compresslevel=9),  # a gzip bomb
        gzip.compress(sparse_tar("sparse", 1 << 40), mtime=0),  # a tiny tar of a 1 TiB file
    ],
    ids=["gzip-bomb", "sparse-tar"],
)
def test_unpack_cap_stops_bombs_from_a_registry(
    reg: HostileRegistry, paths: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blob: bytes
) -> None:
    reg.image("bomb", "v1", [blob])
    pull(paths, f"{reg.host}/bomb:v1")
    monkeypatch.setenv("VMPOD_MAX_IMAGE_BYTES", "32M")
    src = resolve_image(f"{reg.host}/bomb:v1", paths=paths)
    (tmp_path / "root").mkdir()
    with pytest.raises(ImageError, match="VMPOD_MAX_IMAGE_BYTES"):
        src.unpack(tmp_path / "root")
    used = sum(p.stat().st_blocks * 512 for p in (tmp_path / "root").rglob("*") if p.is_file())
    assert used <= 40 << 20


# -- credentials -------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_env_credentials_are_scoped_to_their_registry(
    reg: HostileRegistry, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REGISTRY_AUTH names its registry; another registry (and its token server) never sees it."""
    owner = HostileRegistry(basic=("alice", "s3cret"))
    try:
        owner.image("private", "v1", [GOOD])
        monkeypatch.setenv("REGISTRY_AUTH", f"{owner.host}=alice:s3cret")
        reg.token_realm = f"http://{owner.host}/token"  # a token server on another host
        with pytest.raises(ImageError):
            resolve_image(f"{reg.host}/good:v1", paths=paths)  # pull on first use
        assert reg.auths_seen() == set() and owner.auths_seen() == set()
        resolve_image(f"{owner.host}/private:v1", paths=paths)
        assert owner.auths_seen() == {basic("alice", "s3cret")}
        monkeypatch.setenv("REGISTRY_AUTH", "alice:s3cret")
        with pytest.raises(VmpodError, match="REGISTRY_AUTH must name the registry it is for"):
            resolve_image(f"{reg.host}/other:v1", paths=paths)
    finally:
        owner.close()


def test_users_auth_json_applies_per_registry(
    reg: HostileRegistry, paths: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """skopeo's conventions: an auth.json entry (REGISTRY_AUTH_FILE) reaches its registry only."""
    owner = HostileRegistry(basic=("carol", "pw"))
    try:
        owner.image("private", "v1", [GOOD])
        token = base64.b64encode(b"carol:pw").decode()
        (tmp_path / "auth.json").write_text(f'{{"auths": {{"{owner.host}": {{"auth": "{token}"}}}}}}')
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
        pull(paths, f"{reg.host}/good:v1")
        pull(paths, f"{owner.host}/private:v1")
        assert reg.auths_seen() == set() and owner.auths_seen() == {basic("carol", "pw")}
    finally:
        owner.close()


def test_explicit_credentials_go_only_to_the_named_registry(reg: HostileRegistry, paths: Paths) -> None:
    """--creds: the auth file skopeo gets names the one registry; redirects elsewhere carry nothing."""
    elsewhere = HostileRegistry()
    try:
        digest = elsewhere.image("x", "v1", [GOOD])
        reg.basic = ("bob", "pw")
        reg.misbehave["x"] = "file"
        reg.manifests[("x", "v1")] = elsewhere.manifests[("x", "v1")]
        reg.manifests[("x", digest)] = elsewhere.manifests[("x", digest)]
        reg.misbehave.clear()
        reg.blobs.update(elsewhere.blobs)
        image = pull(paths, f"{reg.host}/x:v1", PullOptions(creds=("bob", "pw")))
        assert image.digest == digest
        assert reg.auths_seen() == {basic("bob", "pw")}
        assert elsewhere.auths_seen() == set()
    finally:
        elsewhere.close()


# -- documents ---------------------------------------------------------------------


def test_deeply_nested_manifest_is_one_line(reg: HostileRegistry, paths: Paths) -> None:
    reg.manifests[("nest", "v1")] = b"[" * 200_000 + b"]" * 200_000
    err = failed_pull(paths, f"{reg.host}/nest:v1")
    assert "nested too deeply" in str(err)


def test_registry_auth_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmpod.images.registry import env_creds

    monkeypatch.setenv("REGISTRY_AUTH", "reg.example:5000=alice:pa=ss:word")
    assert env_creds("reg.example:5000") == ("alice", "pa=ss:word")
    assert env_creds("reg.example") is None and env_creds("other:5000") is None
    for unscoped in ("alice:secret", "alice:pa=ss", "=alice:x", "reg.example=nocolon"):
        monkeypatch.setenv("REGISTRY_AUTH", unscoped)
        with pytest.raises(VmpodError, match="REGISTRY_AUTH must name the registry"):
            env_creds("reg.example")


def test_digest_with_a_newline_is_refused_in_one_line(reg: HostileRegistry, paths: Paths) -> None:
    with pytest.raises(ImageError, match="invalid or unsupported digest") as info:
        parse_reference(f"{reg.host}/good@sha256:{'a' * 64}\n")
    assert "\n" not in str(info.value).replace(repr("\n")[1:-1], "")
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "x", "digest": sha(b"{}"), "size": 2},
        "layers": [{"mediaType": "x", "digest": sha(GOOD) + "\n", "size": len(GOOD)}],
    }
    reg.put_manifest("nl", "v1", doc)
    err = failed_pull(paths, f"{reg.host}/nl:v1")
    assert "invalid or unsupported digest" in str(err)


@pytest.mark.parametrize("digest", ["sha256:../../../../etc/passwd", "sha256:" + "A" * 64, "md5:" + "a" * 32])
def test_path_traversal_and_odd_digests_are_refused(reg: HostileRegistry, paths: Paths, digest: str) -> None:
    doc = {
        "schemaVersion": 2,
        "config": {"mediaType": "x", "digest": sha(b"{}"), "size": 2},
        "layers": [{"mediaType": "x", "digest": digest, "size": 1}],
    }
    reg.put_manifest("evil", "v1", doc)
    failed_pull(paths, f"{reg.host}/evil:v1")
    assert not any(digest.partition(":")[2] in path for path, _ in reg.requests)


def test_a_lying_docker_content_digest_is_never_trusted(reg: HostileRegistry, paths: Paths) -> None:
    digest = reg.image("liar", "v1", [GOOD])
    reg.misbehave["liar"] = "lying-digest"
    assert pull(paths, f"{reg.host}/liar:v1").digest == digest  # the content's own digest


def test_a_manifest_that_does_not_match_its_digest_is_refused(reg: HostileRegistry, paths: Paths) -> None:
    digest = reg.image("swap", "v1", [GOOD])
    reg.misbehave["swap"] = "swap-by-digest"
    err = failed_pull(paths, f"{reg.host}/swap@{digest}")
    assert "digest" in str(err)
    assert ImageStore(paths.images).images() == []
