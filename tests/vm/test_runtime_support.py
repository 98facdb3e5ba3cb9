"""Helpers for the vmpod-runtime VM tests (imported by test_runtime*.py, test_podman.py,
test_containerd.py): the real binary, OCI bundles, a subreaper like conmon's, a
console socket, and the leftovers check."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.vm.conftest import assert_nothing_left, pids_where
from vmpod.paths import Paths
from vmpod.runtime.specgen import default_spec

BINARY = Path(sys.executable).parent / "vmpod-runtime"

# Like conmon / containerd's shim: a subreaper runs `create`, then waitpid()s the pid
# from --pid-file and records how it ended. The container's stdio is ours.
REAPER = r"""
import ctypes, json, os, subprocess, sys
result, pidfile, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
rc = subprocess.call(argv)
out = {"cmd": rc}
if rc == 0:
    pid = int(open(pidfile).read())
    out["pid"] = pid
    while True:
        got, st = os.waitpid(-1, 0)
        if got == pid:
            break
    if os.WIFSIGNALED(st):
        out["signal"] = os.WTERMSIG(st)
    else:
        out["status"] = os.WEXITSTATUS(st)
with open(result + ".tmp", "w") as fh:
    json.dump(out, fh)
os.rename(result + ".tmp", result)
"""


def runtime_env(paths: Paths, config: Path) -> dict[str, str]:
    return {
        **os.environ,
        "VMPOD_HOME": str(paths.home),
        "VMPOD_RUN": str(paths.run),
        "VMPOD_RUNTIME_CONFIG": str(config),
    }


def wrapper_script(path: Path, env: dict[str, str], *args: str) -> Path:
    """An executable that runs vmpod-runtime with our env (podman and containerd do not
    pass theirs through) and ``args`` first (a later --root from the caller wins)."""
    keep = ("VMPOD_HOME", "VMPOD_RUN", "VMPOD_RUNTIME_CONFIG")
    exports = "".join(f"export {k}='{env[k]}'\n" for k in keep)
    words = " ".join(f"'{a}'" for a in (str(BINARY), *args))
    path.write_text(f'#!/bin/sh\n{exports}exec {words} "$@"\n')
    path.chmod(0o755)
    return path


def make_bundle(
    where: Path, rootfs: Path, args: list[str], *, terminal: bool = False, **changes: object
) -> Path:
    """A bundle with its own copy of ``rootfs`` (the container's writes land there)."""
    where.mkdir(parents=True, exist_ok=True)
    own = where / "rootfs"
    if not own.exists():
        shutil.copytree(rootfs, own, symlinks=True)
    rootfs = own
    spec = default_spec()
    process = spec["process"]
    assert isinstance(process, dict)
    process.update(args=args, terminal=terminal)
    spec["root"] = {"path": str(rootfs), "readonly": False}
    for key, value in changes.items():
        if key in ("env", "cwd", "user"):
            process[key] = value
        else:
            spec[key] = value
    (where / "config.json").write_text(json.dumps(spec))
    return where


class Runtime:
    """The real vmpod-runtime binary with a private --root and a JSON --log."""

    def __init__(self, root: Path, env: dict[str, str], log: Path) -> None:
        self.root, self.env, self.log = root, env, log

    def argv(self, *args: str) -> list[str]:
        return [str(BINARY), "--root", str(self.root), "--log", str(self.log), "--log-format", "json", *args]

    def __call__(
        self, *args: str, input: bytes | None = None, timeout: float = 120, check: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        res = subprocess.run(
            self.argv(*args),
            input=input,
            capture_output=True,
            timeout=timeout,
            env=self.env,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"{args}: {res.returncode} {res.stderr.decode()}")
        return res

    def state(self, cid: str) -> dict[str, object]:
        res = self("state", cid, check=True)
        doc = json.loads(res.stdout)
        assert isinstance(doc, dict)
        return doc

    def log_entries(self) -> list[dict[str, object]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def create(
        self, cid: str, bundle: Path, work: Path, *, stdin: bytes = b"", extra: tuple[str, ...] = ()
    ) -> Reaped:
        return Reaped(
            self,
            cid,
            work,
            self.argv("create", "--bundle", str(bundle), "--pid-file", str(work / f"{cid}.pid"), *extra, cid),
            stdin,
        )


class Reaped:
    """A `create` run under a subreaper; the container's stdio are files in ``work``."""

    def __init__(self, rt: Runtime, cid: str, work: Path, argv: list[str], stdin: bytes) -> None:
        self.cid = cid
        self.out, self.err = work / f"{cid}.out", work / f"{cid}.err"
        self.result_path = work / f"{cid}.result"
        self.pid_file = work / f"{cid}.pid"
        (work / f"{cid}.in").write_bytes(stdin)
        with open(work / f"{cid}.in", "rb") as i, open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", REAPER, str(self.result_path), str(self.pid_file), *argv],
                stdin=i if stdin else subprocess.DEVNULL,
                stdout=o,
                stderr=e,
                env=rt.env,
            )

    def wait_created(self, timeout: float = 120) -> int:
        """The monitor pid once `create` succeeded; raises with its stderr otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid_file.exists():
                return int(self.pid_file.read_text())
            if self.result_path.exists():
                raise AssertionError(f"create failed: {self.result()} {self.err.read_text()}")
            time.sleep(0.05)
        raise AssertionError("create did not finish")

    def result(self, timeout: float = 120) -> dict[str, int]:
        self.proc.wait(timeout)
        res = json.loads(self.result_path.read_text())
        assert isinstance(res, dict)
        return res

    def output(self) -> tuple[str, str]:
        return self.out.read_text(), self.err.read_text()


class ConsoleSocket:
    """Receives a pty master like conmon does, then talks to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.master = -1
        self.name = b""
        self.buf = b""
        self._got = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            msg, fds, _flags, _addr = socket.recv_fds(conn, 1024, 4)
        self.name, self.master = msg, fds[0]
        self._got.set()

    def wait(self, timeout: float = 120) -> int:
        assert self._got.wait(timeout), "no pty master arrived on the console socket"
        return self.master

    def read_until(self, token: bytes, timeout: float = 60) -> bytes:
        deadline = time.monotonic() + timeout
        while token not in self.buf and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    break
                if not data:
                    break
                self.buf += data
        assert token in self.buf, f"{token!r} not in {self.buf!r}"
        return self.buf

    def close(self) -> None:
        if self.master >= 0:
            os.close(self.master)
        self.sock.close()


def monitor_pids(root: Path) -> list[int]:
    """Processes still running with our --root on their command line."""
    return pids_where(lambda argv: str(root) in argv)


def run_text(argv: list[str], input: bytes | None, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a client CLI (podman, ctr) to completion; output decoded as text."""
    res = subprocess.run(
        argv,
        input=input,
        capture_output=True,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(), res.stderr.decode())


def assert_runtime_clean(paths: Paths, root: Path) -> None:
    deadline = time.monotonic() + 5
    while monitor_pids(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert monitor_pids(root) == [], "runtime processes left behind"
    left = [p.name for p in root.iterdir()] if root.exists() else []
    assert left == [], f"container state left behind: {left}"
    assert_nothing_left(paths)


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
