"""`vmpod forensics inspect` and `dump-memory` on real CRIU images from a real guest:
a container holds a secret only in its memory (built at run time: its argv holds
only a rot13 of it, nothing on disk), keeps a file open at a known offset and a
listening socket. The archive's inspection must show its process tree, open
files, socket, mounts and environment as the container had them, and find the
secret in pid 1's memory; the restored container's memory dump must hold the
secret at the address inspection printed."""

from __future__ import annotations

import codecs
import io
import json
import re
import secrets
import tarfile
from pathlib import Path

from tests.vm.conftest import VmFactory
from tests.vm.test_forensics import _counts, _member, _wait

HELD = "first line\nsecond\n"  # /held.txt: the shell reads its first line through fd 4


def _script(secret: str) -> str:
    hidden = codecs.encode(secret, "rot13")
    return (
        f"s=$(echo {hidden} | tr a-z n-za-m); "
        f'printf "{HELD.encode("unicode_escape").decode()}" > /held.txt; exec 4</held.txt; read -r x <&4; '
        "exec 3>>/data.log; httpd -f -p 8080 & sleep 100000 & "
        "i=0; while true; do i=$((i+1)); echo $i >&3; echo n=$i; sleep 0.3; done"
    )


def _ps(out: str) -> dict[str, tuple[int, int]]:
    """args -> (pid, ppid) from `ps -o pid,ppid,args`."""
    rows = {}
    for line in out.splitlines()[1:]:
        pid, ppid, args = line.split(None, 2)
        rows[args] = (int(pid), int(ppid))
    return rows


def _data_log_size(archive: Path) -> int:
    with tarfile.open(fileobj=io.BytesIO(_member(archive, "rootfs-diff.tar"))) as diff:
        return diff.getmember("data.log").size


def test_inspect_and_dump_memory(vm_factory: VmFactory, busybox: Path, tmp_path: Path) -> None:
    secret = f"vmpod-secret-{secrets.token_hex(8)}"
    script = _script(secret)
    assert secret not in script
    vmpod = vm_factory()
    r = vmpod.run(
        "-d", "--name", "suspect", "--network", "none", "-e", "CASE=inspect",
        "--rootfs", str(busybox), "--", "sh", "-c", script,
    )  # fmt: skip
    assert r.returncode == 0, r.err
    _wait(lambda: len(_counts(vmpod, "suspect")) >= 3)
    r = vmpod("exec", "suspect", "ps", "-o", "pid,ppid,args")
    assert r.returncode == 0, r.err
    ps = _ps(r.out)
    sleeper, httpd = ps["sleep 100000"], ps["httpd -f -p 8080"]

    archive = tmp_path / "evidence.tar"
    r = vmpod("forensics", "capture", "suspect", "-o", str(archive), timeout=900)
    assert r.returncode == 0, r.err

    # -- the report, for machines
    r = vmpod("forensics", "inspect", str(archive), "--format", "json")
    assert r.returncode == 0, r.err
    report = json.loads(r.out)
    assert report["container"]["name"] == "suspect" and report["warnings"] == []
    procs = {p["pid"]: p for p in report["processes"]}
    assert procs[1]["argv"] == ["sh", "-c", script] and procs[1]["ppid"] == 0
    assert procs[1]["comm"] == "sh" and procs[1]["exe"] == "/bin/busybox"
    assert "CASE=inspect" in procs[1]["env"]
    assert (sleeper[0], procs[sleeper[0]]["ppid"], procs[sleeper[0]]["argv"]) == (
        sleeper[0], sleeper[1], ["sleep", "100000"],
    )  # fmt: skip
    assert procs[httpd[0]]["argv"] == ["httpd", "-f", "-p", "8080"] and procs[httpd[0]]["ppid"] == httpd[1]
    # the processes ps showed, and at most a passing `sleep 0.3`
    assert {1, sleeper[0], httpd[0]} <= set(procs) and len(procs) <= 4
    fds = {(f["pid"], f["fd"]): f for f in report["files"]}
    held = fds[(1, 4)]
    assert (held["name"], held["pos"], held["mode"]) == ("/held.txt", len(HELD.split("\n")[0]) + 1, "r")
    log = fds[(1, 3)]
    assert (log["name"], log["mode"]) == ("/data.log", "w+append")
    assert log["pos"] == _data_log_size(archive) > 0  # frozen together: the offset is the file's end
    assert fds[(sleeper[0], 4)]["name"] == "/held.txt"  # inherited
    (sock,) = report["sockets"]
    assert (sock["pid"], sock["proto"], sock["state"], sock["local"]) == (
        httpd[0], "tcp", "LISTEN", "[::]:8080",  # busybox httpd: a dual-stack socket
    )  # fmt: skip
    assert fds[(httpd[0], sock["fd"])]["name"] == f"socket:[{sock['inode']}]"
    mounts = {m["mountpoint"]: m for m in report["mounts"]}
    assert mounts["/proc"]["fstype"] == "proc" and mounts["/sys"]["readonly"]
    assert report["hostname"] == "vmpod"

    # -- the same for people
    r = vmpod("forensics", "inspect", str(archive))
    assert r.returncode == 0, r.err
    assert re.search(rf"^\s+{sleeper[0]}\s+1\s+0\s+sleep 100000$", r.out, re.M), r.out
    assert re.search(r"^\s+1 sh\s+4 r\s+11  /held.txt$", r.out, re.M), r.out
    assert "CASE=inspect" in r.out and "LISTEN" in r.out
    r = vmpod("forensics", "inspect", str(archive), "--files")
    assert "/held.txt" in r.out and "PROCESSES" not in r.out and "CASE=inspect" not in r.out

    # -- the secret is in pid 1's memory, and only there
    r = vmpod("forensics", "inspect", str(archive), "--search", secret, "--format", "json")
    assert r.returncode == 0, r.err
    hits = json.loads(r.out)["hits"]
    pids = {h["pid"] for h in hits}
    assert 1 in pids and sleeper[0] not in pids and httpd[0] not in pids  # exec'd: their own memory
    address = next(h["address"] for h in hits if h["pid"] == 1)
    r = vmpod("forensics", "inspect", str(archive), "--search", secret)
    assert re.search(rf"^\s+1 sh\s+{address:#018x}  .*\[{secret}\]", r.out, re.M), r.out
    r = vmpod("forensics", "inspect", str(archive), "--search-regex", r"vmpod-secret-[0-9a-f]{16}")
    assert r.returncode == 0 and secret in r.out, r.err
    r = vmpod("forensics", "inspect", str(archive), "--search", secret[::-1])
    assert r.returncode == 1 and "MEMORY MATCHES" in r.out and ": 0" in r.out

    # -- the restored container's memory, dumped live, holds it at the same address
    r = vmpod("forensics", "restore", str(archive), "--name", "clone", timeout=900)
    assert r.returncode == 0, r.err
    _wait(lambda: len(_counts(vmpod, "clone")) >= 1)
    dump = tmp_path / "pid1.tar"
    r = vmpod("forensics", "dump-memory", "clone", "1", "-o", str(dump), timeout=900)
    assert r.returncode == 0, r.err
    assert r.out.strip() == str(dump)
    with tarfile.open(dump) as tar:
        summary = json.loads(_read(tar, "dump.json"))
        assert summary["pid"] == 1 and summary["comm"] == "sh"
        assert "/bin/busybox" in _read(tar, "maps.txt").decode()
        (region,) = [g for g in summary["regions"] if g["start"] <= address < g["end"]]
        data = _read(tar, region["file"])
        assert data[address - region["start"] :].startswith(secret.encode())
    assert len(data) == region["end"] - region["start"]
    n = max(_counts(vmpod, "clone"))
    _wait(lambda: max(_counts(vmpod, "clone")) > n)

    # bad requests: one line, nothing written
    r = vmpod("forensics", "dump-memory", "clone", "1", "-o", str(dump))
    assert r.returncode != 0 and "exists" in r.err
    missing = tmp_path / "none.tar"
    r = vmpod("forensics", "dump-memory", "clone", "4321", "-o", str(missing))
    assert r.returncode != 0 and "no process 4321" in r.err, r.err
    r = vmpod("forensics", "dump-memory", "clone", "1", "-o", str(missing), "--max-size", "4096")
    assert r.returncode != 0 and "--max-size" in r.err, r.err
    assert not missing.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["evidence.tar", "pid1.tar"]

    for name in ("clone", "suspect"):
        assert vmpod("rm", "-f", name).returncode == 0


def _read(tar: tarfile.TarFile, name: str) -> bytes:
    fh = tar.extractfile(name)
    assert fh is not None
    return fh.read()
