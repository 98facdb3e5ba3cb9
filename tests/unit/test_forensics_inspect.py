"""`forensics inspect` without VMs: CRIU images made with pycriu's own encoder
(Debian's criu package, run as the decoder is, by the system python3), read back
into the process tree, argv/environment (from the pages), open files, sockets,
mounts and memory hits; hostile images, pagemaps and archives; the CLI."""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmpod.cli.main import cli
from vmpod.errors import ForensicsError
from vmpod.forensics import archive as a
from vmpod.forensics import images
from vmpod.forensics.images import HELPER, SYSTEM_PYTHON
from vmpod.forensics.inspect import inspect_archive, inspect_dir, root_mode, search_pattern
from vmpod.forensics.memory import PAGE, PE_LAZY, PE_PARENT, PE_PRESENT, Memory, Run, runs_of
from vmpod.paths import Paths

pytestmark = pytest.mark.skipif(not Path(HELPER).is_file(), reason="no helper")

ENCODE = """
import json, sys, pycriu
root, images = sys.argv[1], json.load(open(sys.argv[2]))
for name, img in images.items():
    with open(f"{root}/{name}", "wb") as fh:
        pycriu.images.dump(img, fh)
"""
FOWN = {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0, "pid": 0}
OPTS = {k: 0 for k in ("so_sndbuf", "so_rcvbuf", "so_snd_tmo_sec", "so_snd_tmo_usec")} | {
    "so_rcv_tmo_sec": 0,
    "so_rcv_tmo_usec": 0,
}
SECRET = b"the-secret-0123456789"
ARG_AT, ENV_AT = 0x10010, 0x10100  # in the first run of pid 1
SPLIT_AT = 0x11000 - 8  # SECRET straddles two pagemap entries (one run once merged)
FAR_AT = 0x40000 + 100  # SECRET again, in a run of its own


def encode(root: Path, images: dict[str, object]) -> None:
    spec = root / "images.json"
    spec.write_text(json.dumps(images))
    subprocess.run([SYSTEM_PYTHON, "-I", "-c", ENCODE, str(root), str(spec)], check=True)
    spec.unlink()


def _reg(fid: int, name: str, pos: int = 0, flags: int = 0, mode: int | None = None) -> dict[str, object]:
    reg = {"id": fid, "flags": flags, "pos": pos, "fown": FOWN, "name": name}
    return {"type": "REG", "id": fid, "reg": reg if mode is None else {**reg, "mode": mode}}


def _mm(arg: tuple[int, int], env: tuple[int, int]) -> dict[str, object]:
    zero = ("start_code", "end_code", "start_data", "end_data", "start_stack", "start_brk", "brk")
    return {
        **{f"mm_{k}": 0 for k in zero},
        "mm_arg_start": arg[0],
        "mm_arg_end": arg[1],
        "mm_env_start": env[0],
        "mm_env_end": env[1],
        "exe_file_id": 1,
    }


def _core(comm: str) -> dict[str, object]:
    tc = {"task_state": 1, "exit_code": 0, "personality": 0, "flags": 0, "blk_sigset": 0, "comm": comm}
    return {"magic": "CORE", "entries": [{"mtype": "X86_64", "tc": tc}]}


def _img(magic: str, *entries: object) -> dict[str, object]:
    return {"magic": magic, "entries": list(entries)}


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """Two processes: sh (pid 1; argv, env and SECRET in its pages; a file open at
    offset 42, an IPv6 listener, a unix socket) and its child, two threads,
    whose pages were never dumped."""
    root = tmp_path / "checkpoint"
    root.mkdir()
    argv, env = b"sh\0-c\0sleep 5\0", b"A=1\0HOME=/root\0"
    pages = bytearray(4 * PAGE)
    pages[ARG_AT - 0x10000 : ARG_AT - 0x10000 + len(argv)] = argv
    pages[ENV_AT - 0x10000 : ENV_AT - 0x10000 + len(env)] = env
    pages[SPLIT_AT - 0x10000 : SPLIT_AT - 0x10000 + len(SECRET)] = SECRET
    pages[3 * PAGE + 100 : 3 * PAGE + 100 + len(SECRET)] = SECRET
    (root / "pages-1.img").write_bytes(bytes(pages))
    v6 = list(struct.unpack("<4I", socket.inet_pton(socket.AF_INET6, "fd00::1")))
    isk = {
        "id": 5, "ino": 777, "family": 10, "type": 1, "proto": 6, "state": 10, "src_port": 8080,
        "dst_port": 0, "flags": 0, "backlog": 5, "src_addr": v6, "dst_addr": [0, 0, 0, 0],
        "fown": FOWN, "opts": OPTS,
    }  # fmt: skip
    usk = {
        "id": 6, "ino": 888, "type": 1, "state": 1, "flags": 0, "uflags": 0, "backlog": 0,
        "peer": 889, "fown": FOWN, "opts": OPTS, "name": "=00abstract",
    }  # fmt: skip
    mnt = {
        "fstype": 1, "mnt_id": 20, "root_dev": 1, "parent_mnt_id": 19, "flags": 1, "root": "/",
        "mountpoint": "/proc", "source": "proc", "options": "",
    }  # fmt: skip
    encode(
        root,
        {
            "inventory.img": _img("INVENTORY", {"img_version": 2, "fdinfo_per_id": True}),
            "pstree.img": _img(
                "PSTREE",
                {"pid": 1, "ppid": 0, "pgid": 1, "sid": 1, "threads": [1]},
                {"pid": 7, "ppid": 1, "pgid": 1, "sid": 1, "threads": [7, 8]},
            ),
            "core-1.img": _core("sh"),
            "core-7.img": _core("worker"),
            "ids-1.img": _img(
                "IDS", {"vm_id": 1, "files_id": 1, "fs_id": 1, "sighand_id": 1, "mnt_ns_id": 9}
            ),
            "ids-7.img": _img(
                "IDS", {"vm_id": 2, "files_id": 2, "fs_id": 2, "sighand_id": 2, "mnt_ns_id": 9}
            ),
            "fs-1.img": _img("FS", {"cwd_id": 3, "root_id": 4}),
            "mm-1.img": _img("MM", _mm((ARG_AT, ARG_AT + len(argv)), (ENV_AT, ENV_AT + len(env)))),
            "mm-7.img": _img("MM", _mm((0x90000, 0x90010), (0x90010, 0x90020))),
            "pagemap-1.img": _img(
                "PAGEMAP",
                {"pages_id": 1},
                {"vaddr": 0x10000, "nr_pages": 1, "flags": PE_PRESENT},
                {"vaddr": 0x11000, "nr_pages": 2, "flags": PE_PRESENT | PE_LAZY},
                {"vaddr": 0x30000, "nr_pages": 4, "flags": PE_PARENT},  # in a pre-dump: not here
                {"vaddr": 0x40000, "nr_pages": 1, "flags": PE_PRESENT},
            ),
            "pagemap-7.img": _img("PAGEMAP", {"pages_id": 2}),
            "fdinfo-1.img": _img(
                "FDINFO",
                {"id": 2, "flags": 0, "type": "REG", "fd": 3},
                {"id": 5, "flags": 1, "type": "INETSK", "fd": 4},
                {"id": 6, "flags": 0, "type": "UNIXSK", "fd": 5},
            ),
            "fdinfo-2.img": _img("FDINFO", {"id": 2, "flags": 0, "type": "REG", "fd": 0}),
            "files.img": _img(
                "FILES",
                _reg(1, "/bin/busybox"),
                _reg(2, "/var/log/app.log", pos=42, flags=0o2001),
                _reg(3, "/srv"),
                _reg(4, "/", mode=0o40555),
                {"type": "INETSK", "id": 5, "isk": isk},
                {"type": "UNIXSK", "id": 6, "usk": usk},
            ),
            "mountpoints-9.img": _img("MNTS", mnt),
            "utsns-3.img": _img("UTSNS", {"nodename": "suspect-host", "domainname": "(none)"}),
        },
    )
    (root / "pages-2.img").write_bytes(b"")
    return root


# -- pagemap and pages ----------------------------------------------------------


def test_runs_skip_pages_not_in_the_file_and_merge_neighbours() -> None:
    entries: list[object] = [
        {"pages_id": 3},
        {"vaddr": 0x1000, "nr_pages": 1, "flags": PE_PRESENT},
        {"vaddr": 0x2000, "nr_pages": 1, "flags": PE_PRESENT | PE_LAZY},
        {"vaddr": 0x5000, "nr_pages": 2, "flags": PE_PARENT},
        {"vaddr": 0x9000, "nr_pages": 1},  # old images: no flags, not in_parent
        {"vaddr": 0xA000, "nr_pages": 1, "in_parent": True},
    ]
    pages_id, runs = runs_of(entries, 3 * PAGE, "pagemap-1.img")
    assert pages_id == 3
    assert runs == (Run(0x1000, 2 * PAGE, 0), Run(0x9000, PAGE, 2 * PAGE))


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ({"vaddr": 0x1001, "nr_pages": 1, "flags": 4}, "not a valid range"),
        ({"vaddr": 0x1000, "nr_pages": 0, "flags": 4}, "not a valid range"),
        ({"vaddr": (1 << 64) - PAGE, "nr_pages": 2, "flags": 4}, "not a valid range"),
        ({"vaddr": 0x1000, "nr_pages": 5, "flags": 4}, "more pages than its pages-1.img holds"),
        ({"vaddr": -4096, "nr_pages": 1, "flags": 4}, "'vaddr' is not a non-negative integer"),
        ({"vaddr": "0x1000", "nr_pages": 1, "flags": 4}, "'vaddr' is not a non-negative integer"),
        ({"vaddr": 0x1000, "nr_pages": True, "flags": 4}, "'nr_pages' is not a non-negative integer"),
    ],
)
def test_hostile_pagemaps_are_refused(entry: dict[str, object], error: str) -> None:
    with pytest.raises(ForensicsError, match=re.escape(error)):
        runs_of([{"pages_id": 1}, entry], 4 * PAGE, "pagemap-1.img")
    with pytest.raises(ForensicsError, match="no pagemap header"):
        runs_of([], 0, "pagemap-1.img")


def test_memory_reads_ranges_and_searches_runs(tmp_path: Path) -> None:
    pages = tmp_path / "pages-1.img"
    data = bytearray(3 * PAGE)
    data[PAGE - 3 : PAGE + 3] = b"abcdef"  # across the merged run's page boundary
    data[2 * PAGE : 2 * PAGE + 6] = b"abcdef"  # the run at 0x9000
    pages.write_bytes(bytes(data))
    mem = Memory(pages, (Run(0x1000, 2 * PAGE, 0), Run(0x9000, PAGE, 2 * PAGE)))
    assert mem.read(0x2000 - 3, 6) == b"abcdef"
    assert mem.read(0x9000, 3) == b"abc"
    assert mem.read(0x2FF0, 0x20) is None  # runs into a hole
    assert mem.read(0x500, 4) is None  # before everything
    hits = list(mem.search(re.compile(b"cd"), 10))
    assert [h.address for h in hits] == [0x2000 - 1, 0x9002]
    assert hits[0].before.endswith(b"ab") and hits[0].after.startswith(b"ef")
    assert len(list(mem.search(re.compile(b"cd"), 1))) == 1
    assert list(Memory(pages, ()).search(re.compile(b"cd"), 5)) == []


def test_search_patterns() -> None:
    pattern = search_pattern("a.b", None)
    assert pattern is not None and pattern.search(b"xa.by") and not pattern.search(b"axb")
    assert search_pattern(None, "a.b") is not None
    assert search_pattern(None, None) is None
    for text, regex, error in [
        ("x", "y", "not both"),
        ("", None, "non-empty"),
        (None, "(", "not a valid expression"),
        (None, "x*", "matches the empty string"),
    ]:
        with pytest.raises(ForensicsError, match=error):
            search_pattern(text, regex)


# -- images decoded by pycriu ------------------------------------------------------


def test_inspect_reads_what_the_images_hold(checkpoint: Path) -> None:
    f = inspect_dir(checkpoint, search_pattern(SECRET.decode(), None))
    sh, worker = f.processes
    assert (sh.pid, sh.ppid, sh.comm, sh.exe, sh.cwd, sh.root) == (1, 0, "sh", "/bin/busybox", "/srv", "/")
    assert sh.argv == ("sh", "-c", "sleep 5") and sh.env == ("A=1", "HOME=/root")
    assert (worker.pid, worker.ppid, worker.threads, worker.argv) == (7, 1, (7, 8), ())
    assert worker.uid is None  # no creds in its core image
    files = {(o.pid, o.fd): o for o in f.files}
    log = files[(1, 3)]
    assert (log.name, log.pos, log.mode, log.cloexec) == ("/var/log/app.log", 42, "w+append", False)
    assert files[(1, 4)].name == "socket:[777]" and files[(1, 4)].cloexec
    assert files[(7, 0)].name == "/var/log/app.log"  # a shared file table entry
    inet, unix = f.sockets
    assert (inet.family, inet.proto, inet.state, inet.local) == ("inet6", "tcp", "LISTEN", "[fd00::1]:8080")
    assert (unix.family, unix.local, unix.remote) == ("unix", "@abstract", "peer:[889]")
    (proc,) = f.mounts
    assert (proc.mountpoint, proc.fstype, proc.readonly) == ("/proc", "proc", True)
    assert f.hostname == "suspect-host"
    assert [(h.pid, h.comm, h.address) for h in f.hits] == [(1, "sh", SPLIT_AT), (1, "sh", FAR_AT)]
    assert f"[{SECRET.decode()}]" in f.hits[0].context
    # the child's argv lives in pages that were not dumped: said, not guessed
    assert any("pid 7" in w and "not dumped" in w for w in f.warnings), f.warnings


def test_root_mode_is_what_criu_recorded(checkpoint: Path, tmp_path: Path) -> None:
    assert root_mode(checkpoint) == 0o555  # a restore gives the new root this mode
    bare = tmp_path / "bare"
    bare.mkdir()
    encode(bare, {"pstree.img": _img("PSTREE", {"pid": 1, "ppid": 0, "pgid": 1, "sid": 1, "threads": [1]})})
    assert root_mode(bare) is None  # no fs image: unknown


def test_max_hits_truncates(checkpoint: Path) -> None:
    f = inspect_dir(checkpoint, search_pattern(None, "secret"), max_hits=1)
    assert len(f.hits) == 1 and f.hits_truncated


def test_a_damaged_image_is_a_warning_a_damaged_tree_an_error(checkpoint: Path) -> None:
    (checkpoint / "core-7.img").write_bytes(b"\x00" * 64)
    (checkpoint / "fdinfo-2.img").unlink()
    (checkpoint / "fdinfo-2.img").symlink_to(checkpoint / "fdinfo-1.img")  # not followed
    pagemap = checkpoint / "pagemap-1.img"
    pagemap.write_bytes(pagemap.read_bytes()[:-3])  # truncated
    f = inspect_dir(checkpoint, search_pattern("secret", None))
    assert [p.comm for p in f.processes] == ["sh", ""]
    assert any(w.startswith("core-7.img: unknown magic") for w in f.warnings), f.warnings
    assert any(w.startswith("pagemap-1.img:") for w in f.warnings), f.warnings
    assert f.processes[0].argv == () and f.hits == ()
    assert not [o for o in f.files if o.pid == 7]
    with open(checkpoint / "mm-7.img", "r+b") as fh:
        fh.truncate(65 << 20)  # sparse: past what the decoder takes
    f = inspect_dir(checkpoint)
    assert "mm-7.img: larger than 67108864 bytes" in f.warnings, f.warnings
    (checkpoint / "pstree.img").write_bytes(b"garbage!" * 8)
    with pytest.raises(ForensicsError, match="cannot read the checkpoint's pstree.img"):
        inspect_dir(checkpoint)
    (checkpoint / "pstree.img").unlink()
    with pytest.raises(ForensicsError, match="has no pstree.img"):
        inspect_dir(checkpoint)


def test_pagemap_naming_missing_pages_is_a_warning(checkpoint: Path) -> None:
    (checkpoint / "pages-1.img").unlink()
    f = inspect_dir(checkpoint)
    assert any("names pages-1.img, which is not in the archive" in w for w in f.warnings), f.warnings


def test_without_pycriu_or_python_the_error_says_what_to_install(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images, "SYSTEM_PYTHON", sys.executable)  # the venv's: no pycriu
    with pytest.raises(ForensicsError, match="pycriu does not load") as err:
        inspect_dir(checkpoint)
    assert "criu package" in str(err.value)
    monkeypatch.setattr(images, "SYSTEM_PYTHON", "/nonexistent/python3")
    with pytest.raises(ForensicsError, match="is not installed") as err:
        inspect_dir(checkpoint)
    assert "criu package" in str(err.value)


# -- archives and the CLI ---------------------------------------------------------


def _archive(tmp_path: Path, checkpoint: Path) -> Path:
    stage = tmp_path / "stage"
    stage.mkdir()
    checkpoint.rename(stage / "checkpoint")
    manifest = a.Manifest(
        files=a.digest_tree(stage),
        captured="2026-01-01T00:00:00Z",
        host="h",
        host_kernel="6.18",
        guest_kernel="6.1.0-57-cloud-amd64",
        criu="3.17.1",
        runc="runc 1.1.5",
        vmpod="0.1.0",
        command_line=("vmpod",),
        container={"id": "c", "name": "suspect", "image": "img"},
        leave_running=True,
    )
    out = tmp_path / "evidence.tar"
    a.write_archive(stage, out, manifest)
    return out


def test_inspect_archive_verifies_first_and_leaves_nothing(tmp_path: Path, checkpoint: Path) -> None:
    archive = _archive(tmp_path, checkpoint)
    paths = Paths(home=tmp_path / "home", run=tmp_path / "run")
    got = inspect_archive(paths, archive)
    assert got.container["name"] == "suspect" and [p.pid for p in got.findings.processes] == [1, 7]
    assert list(paths.tmp.iterdir()) == []
    out = got.to_json()
    assert list(out)[:9] == [
        "archive",
        "container",
        "captured",
        "host",
        "guest_kernel",
        "criu",
        "search",
        "verified",
        "processes",
    ]
    assert out["verified"] is True
    data = bytearray(archive.read_bytes())
    at = data.find(b"HOME=/root")
    data[at] ^= 0xFF
    tampered = tmp_path / "tampered.tar"
    tampered.write_bytes(bytes(data))
    with pytest.raises(ForensicsError, match="checkpoint/pages-1.img"):
        inspect_archive(paths, tampered)
    assert list(paths.tmp.iterdir()) == []
    with pytest.raises(ForensicsError, match="unpacks to more than 100 bytes"):
        inspect_archive(paths, archive, max_bytes=100)
    assert list(paths.tmp.iterdir()) == []


def test_cli_inspect(tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _archive(tmp_path, checkpoint)
    monkeypatch.setenv("VMPOD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VMPOD_RUN", str(tmp_path / "run"))
    runner = CliRunner()
    r = runner.invoke(cli, ["forensics", "inspect", str(archive)])
    assert r.exit_code == 0, r.output
    assert re.search(r"^\s+7\s+1\s+\?\s+\[worker\] \(2 threads\)$", r.output, re.M), r.output
    assert re.search(r"^\s+1 sh\s+3 w\+append\s+42  /var/log/app.log$", r.output, re.M), r.output
    assert "HOME=/root" in r.output and "[fd00::1]:8080" in r.output and "/proc proc proc" in r.output
    r = runner.invoke(cli, ["forensics", "inspect", str(archive), "--sockets"])
    assert "LISTEN" in r.output and "/var/log/app.log" not in r.output
    r = runner.invoke(cli, ["forensics", "inspect", str(archive), "--search", SECRET.decode()])
    assert r.exit_code == 0 and f"{SPLIT_AT:#018x}" in r.output and "HOME=/root" not in r.output
    r = runner.invoke(cli, ["forensics", "inspect", str(archive), "--search", "absent", "--format", "json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["hits"] == []
    r = runner.invoke(cli, ["forensics", "inspect", str(archive), "--search-regex", "("])
    assert r.exit_code != 0 and "not a valid expression" in r.output
    r = runner.invoke(cli, ["forensics", "inspect", str(tmp_path / "nope.tar")])
    assert r.exit_code != 0 and "is not a file" in r.output


def test_a_hostile_process_tree(tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = {"pid": 1, "ppid": 0, "pgid": 1, "sid": 1, "threads": [1]}
    encode(checkpoint, {"pstree.img": _img("PSTREE", entry, entry)})
    with pytest.raises(ForensicsError, match="lists pid 1 twice"):
        inspect_dir(checkpoint)
    # 5 and 6 are each other's parent: shown once each, not lost, not looping
    cycle = [entry, {**entry, "pid": 5, "ppid": 6}, {**entry, "pid": 6, "ppid": 5}]
    encode(checkpoint, {"pstree.img": _img("PSTREE", *cycle)})
    archive = _archive(tmp_path, checkpoint)
    monkeypatch.setenv("VMPOD_HOME", str(tmp_path / "home"))
    r = CliRunner().invoke(cli, ["forensics", "inspect", str(archive), "--ps-tree"])
    assert r.exit_code == 0, r.output
    pids = [int(line.split()[0]) for line in r.output.splitlines() if re.match(r"^\s+\d+\s+\d+\s", line)]
    assert sorted(pids) == [1, 5, 6]
