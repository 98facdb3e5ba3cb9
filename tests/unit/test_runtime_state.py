"""vmpod-runtime without VMs: state store, locks, hooks, monitor IPC, the CLI's errors."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmpod.runtime import ipc
from vmpod.runtime.cli import parse_bytes, parse_signal
from vmpod.runtime.errors import NotFound, RuntimeCliError
from vmpod.runtime.hooks import HookError, run_hooks, run_hooks_warn
from vmpod.runtime.state import (
    CREATED,
    RUNNING,
    STOPPED,
    ContainerState,
    Store,
    check_id,
    proc_start_time,
)

RUNTIME = [sys.executable, "-c", "from vmpod.runtime.cli import main; main()"]


def _state(cid: str = "c1", **kw: object) -> ContainerState:
    return ContainerState(id=cid, bundle="/b", rootfs="/b/rootfs", created="now", **kw)  # type: ignore[arg-type]


# -- ids, signals, sizes -------------------------------------------------------


@pytest.mark.parametrize("cid", ["c1", "a" * 128, "x_y.z-1", "0abc"])
def test_good_ids(cid: str) -> None:
    assert check_id(cid) == cid


@pytest.mark.parametrize("cid", ["", "../x", "a/b", ".hidden", "-x", "a" * 129, "a+b", "a b"])
def test_bad_ids(cid: str) -> None:
    with pytest.raises(RuntimeCliError, match="invalid container id"):
        check_id(cid)


@pytest.mark.parametrize(
    "raw,num", [("KILL", 9), ("SIGKILL", 9), ("kill", 9), ("9", 9), ("TERM", 15), ("sigusr1", 10), ("64", 64)]
)
def test_parse_signal(raw: str, num: int) -> None:
    assert parse_signal(raw) == num


@pytest.mark.parametrize("raw", ["FOO", "0", "65", "-1", ""])
def test_parse_signal_refuses(raw: str) -> None:
    with pytest.raises(RuntimeCliError, match="unknown signal"):
        parse_signal(raw)


@pytest.mark.parametrize(
    "raw,num", [("1024", 1024), ("512m", 512 << 20), ("1g", 1 << 30), ("2k", 2048), ("-1", -1)]
)
def test_parse_bytes(raw: str, num: int) -> None:
    assert parse_bytes(raw) == num


# -- the store -----------------------------------------------------------------


def test_begin_is_atomic_and_refuses_duplicates(tmp_path: Path) -> None:
    store = Store(tmp_path)
    d, lock, mon = store.begin(_state())
    try:
        assert store.load("c1").status == "creating"
        assert store.ids() == ["c1"]
        with pytest.raises(RuntimeCliError, match="already exists"):
            store.begin(_state())
        assert [p.name for p in tmp_path.iterdir()] == ["c1"]  # no temp dir left
        assert store.monitor_alive("c1")  # we hold monitor.lock
    finally:
        os.close(lock)
        os.close(mon)
    assert not store.monitor_alive("c1")
    assert store.status(store.load("c1")) == STOPPED  # "creating" with no monitor
    store.remove("c1")
    with pytest.raises(NotFound):
        store.load("c1")


def test_update_replaces_state_atomically(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _, lock, mon = store.begin(_state())
    st = store.update("c1", status=RUNNING, pid=42, exit_status=None)
    assert store.load("c1") == st
    assert [p.name for p in store.dir("c1").iterdir() if p.name.startswith(".")] == []
    doc = st.oci(store.status(st))
    assert doc["status"] == RUNNING and doc["pid"] == 42 and "exitStatus" not in doc
    os.close(mon)
    st = store.update("c1", status=STOPPED, exit_status=3)
    doc = st.oci(store.status(st))
    assert doc["pid"] == 0 and doc["exitStatus"] == 3
    os.close(lock)


def test_a_monitor_killed_with_sigkill_reads_as_stopped(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _, lock, mon = store.begin(_state())
    child = os.fork()
    if child == 0:  # keeps monitor.lock like the real monitor, then is killed
        os.close(lock)
        time.sleep(60)
        os._exit(0)
    os.close(mon)
    store.update("c1", status=RUNNING, pid=child, monitor_start=proc_start_time(child))
    assert store.status(store.load("c1")) == RUNNING
    os.kill(child, 9)
    os.waitpid(child, 0)
    assert store.status(store.load("c1")) == STOPPED
    os.close(lock)


def test_mutation_lock_times_out_while_held(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _, lock, mon = store.begin(_state())
    with pytest.raises(RuntimeCliError, match="timed out"), store.lock("c1", timeout=0.1):
        pass
    os.close(lock)
    with store.lock("c1", timeout=1):
        other = os.open(store.dir("c1") / "lock", os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(other)
    os.close(mon)
    with pytest.raises(NotFound), store.lock("zz"):
        pass


def test_from_json_ignores_unknown_fields() -> None:
    st = ContainerState.from_json(
        {"id": "a", "bundle": "b", "rootfs": "r", "created": "c", "future_field": 1, "status": CREATED}
    )
    assert st.status == CREATED


# -- hooks ---------------------------------------------------------------------


def _hook(tmp_path: Path, body: str, **kw: object) -> dict[str, object]:
    script = tmp_path / f"hook{len(list(tmp_path.iterdir()))}.sh"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return {"path": str(script), **kw}


def test_hooks_get_the_state_on_stdin_args_and_env(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hook = _hook(
        tmp_path,
        f'echo "$0 $1 $FOO" >> {out}; cat >> {out}; echo >> {out}\n',
        args=["name0", "arg1"],
        env=["FOO=bar"],
    )
    state = _state().oci(CREATED)
    run_hooks({"prestart": [hook, hook]}, "prestart", state)
    lines = out.read_text().splitlines()
    # ($0 is the script: the kernel's #! handling drops args[0])
    assert lines[0].endswith(" arg1 bar") and json.loads(lines[1]) == state
    assert lines[2] == lines[0]
    run_hooks({"prestart": [hook]}, "poststop", state)  # other kinds do not run
    assert len(out.read_text().splitlines()) == 4


def test_failing_and_slow_hooks(tmp_path: Path) -> None:
    bad = _hook(tmp_path, "echo broken >&2; exit 3\n")
    with pytest.raises(HookError, match=r"prestart hook #0 .*exit status 3: broken"):
        run_hooks({"prestart": [bad]}, "prestart", {})
    slow = _hook(tmp_path, "sleep 5\n", timeout=1)
    t0 = time.monotonic()
    with pytest.raises(HookError, match="timed out after 1s"):
        run_hooks({"createRuntime": [slow]}, "createRuntime", {})
    assert time.monotonic() - t0 < 4
    with pytest.raises(HookError, match="No such file"):
        run_hooks({"prestart": [{"path": "/nonexistent/hook"}]}, "prestart", {})
    marker = tmp_path / "ran"
    later = _hook(tmp_path, f"touch {marker}\n")
    run_hooks_warn({"poststop": [bad, later]}, "poststop", {})  # warns, runs the rest
    assert marker.exists()


# -- monitor IPC ----------------------------------------------------------------


def test_ipc_round_trip_with_fds_over_a_long_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "monitor.sock"
    assert len(str(path)) > 108
    server = ipc.listen_unix(path)
    server.setblocking(False)
    r, w = os.pipe()

    async def serve() -> dict[str, object]:
        loop = asyncio.get_running_loop()
        sock, _ = await loop.sock_accept(server)
        conn = ipc.Conn(sock)
        got = await conn.recv()
        assert got is not None
        msg, fds = got
        assert len(fds) == 1
        os.write(fds[0], b"via fd")
        os.close(fds[0])
        await conn.send({"ok": True, "echo": msg["op"]})
        assert await conn.recv() is None  # client closed
        conn.close()
        return msg

    async def main() -> None:
        task = asyncio.create_task(serve())
        reply = await asyncio.to_thread(_client_call, path, w)
        assert reply == {"ok": True, "echo": "ping"}
        assert (await task)["op"] == "ping"

    asyncio.run(main())
    os.close(w)
    assert os.read(r, 100) == b"via fd"
    server.close()


def _client_call(path: Path, fd: int) -> dict[str, object]:
    client = ipc.Client(path, timeout=5)
    try:
        return client.request({"op": "ping"}, [fd])
    finally:
        client.close()


def test_ipc_refusals_and_oversized_messages(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ipc.encode({"x": "y" * ipc.MAX_MESSAGE})
    with pytest.raises(RuntimeCliError, match="cannot reach"):
        ipc.Client(tmp_path / "nothing.sock")
    a, b = socket.socketpair()
    client = ipc.Client.__new__(ipc.Client)
    client.sock, client._framer = a, ipc._Framer()
    b.sendall(ipc.encode({"ok": False, "error": "nope"}))
    with pytest.raises(RuntimeCliError, match="nope"):
        client.request({"op": "x"})
    b.close()
    with pytest.raises(RuntimeCliError, match="closed the connection"):
        client.recv()
    a.close()


# -- the CLI, no VM needed -------------------------------------------------------


def rt(
    root: Path, *args: str, log: Path | None = None, cwd: Path | None = None, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    glob = ["--root", str(root)] + (["--log", str(log), "--log-format", "json"] if log else [])
    return subprocess.run([*RUNTIME, *glob, *args], capture_output=True, timeout=60, cwd=cwd, input=stdin)


@pytest.mark.parametrize(
    "args",
    [
        ["state", "nope"],
        ["start", "nope"],
        ["kill", "nope"],
        ["kill", "nope", "KILL"],
        ["delete", "nope"],
        ["pause", "nope"],
        ["resume", "nope"],
        ["ps", "nope"],
        ["exec", "nope", "true"],
        ["events", "--stats", "nope"],
        ["update", "--pids-limit", "10", "nope"],
    ],
)
def test_unknown_container(tmp_path: Path, args: list[str]) -> None:
    res = rt(tmp_path, *args)
    assert res.returncode == 1
    assert b"container does not exist" in res.stderr


def test_errors_are_logged_as_json_lines(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    res = rt(tmp_path / "root", "state", "nope", log=log)
    assert res.returncode == 1 and res.stderr.strip() == b"container does not exist"
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and entry["msg"] == "container does not exist"
    assert entry["time"].endswith("Z")
    res = rt(tmp_path / "root", "state", "nope")  # no --log: logrus text on stderr
    assert b'level=error msg="container does not exist"' in res.stderr


def test_delete_force_of_unknown_succeeds(tmp_path: Path) -> None:
    assert rt(tmp_path, "delete", "--force", "nope").returncode == 0


@pytest.mark.parametrize(
    "config,message",
    [
        (None, b"config.json: no such file"),
        ("{", b"invalid JSON"),
        ('{"ociVersion": "1.0.2", "root": {"path": "rootfs"}}', b"process must be specified"),
    ],
)
def test_create_with_a_bad_bundle(tmp_path: Path, config: str | None, message: bytes) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    if config is not None:
        (bundle / "config.json").write_text(config)
    res = rt(tmp_path / "root", "create", "--bundle", str(bundle), "c1")
    assert res.returncode == 1 and message in res.stderr, res.stderr
    assert not (tmp_path / "root" / "c1").exists()
    res = rt(tmp_path / "root", "create", "--bundle", str(tmp_path / "nobundle"), "c1")
    assert res.returncode == 1 and b"no such directory" in res.stderr


def test_create_of_an_existing_id_or_bad_id(tmp_path: Path) -> None:
    store = Store(tmp_path / "root")
    _, lock, mon = store.begin(_state("taken"))
    os.close(lock)
    os.close(mon)
    bundle = tmp_path / "b"
    bundle.mkdir()
    res = rt(tmp_path / "root", "create", "-b", str(bundle), "taken")
    assert res.returncode == 1 and b"container with given ID already exists" in res.stderr
    res = rt(tmp_path / "root", "create", "-b", str(bundle), "../evil")
    assert res.returncode == 1 and b"invalid container id" in res.stderr


def test_stopped_container_refuses_start_kill_exec(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _, lock, mon = store.begin(_state("dead"))
    os.close(lock)
    os.close(mon)  # no monitor: the container reads as stopped
    res = rt(tmp_path, "state", "dead")
    assert json.loads(res.stdout)["status"] == "stopped"
    assert b"cannot start a container that has stopped" in rt(tmp_path, "start", "dead").stderr
    assert b"container not running" in rt(tmp_path, "kill", "dead", "KILL").stderr
    assert b"cannot exec in a stopped container" in rt(tmp_path, "exec", "dead", "true").stderr
    assert b"container not running" in rt(tmp_path, "pause", "dead").stderr
    assert rt(tmp_path, "delete", "dead").returncode == 0
    assert not (tmp_path / "dead").exists()


def test_list_features_spec(tmp_path: Path) -> None:
    assert json.loads(rt(tmp_path, "list", "--format", "json").stdout) == []
    feats = json.loads(rt(tmp_path, "features").stdout)
    assert "poststop" in feats["hooks"] and feats["linux"]["cgroup"]["v2"] is True
    assert rt(tmp_path, "spec", cwd=tmp_path).returncode == 0
    spec = json.loads((tmp_path / "config.json").read_text())
    assert spec["root"]["path"] == "rootfs" and spec["process"]["args"] == ["sh"]
    res = rt(tmp_path, "spec", cwd=tmp_path)
    assert res.returncode == 1 and b"exists" in res.stderr
    assert b"vmpod-runtime version" in rt(tmp_path, "--version").stdout


def test_delete_unmounts_the_shared_directory_a_dead_monitor_left(tmp_path: Path) -> None:
    from tests.unit.test_mounts import unmount_all
    from vmpod.sandbox.share import Share, SharedDir

    data = tmp_path / "bundle" / "rootfs"
    data.mkdir(parents=True)
    (data / "written-by-the-container").write_text("keep me\n")
    shared = SharedDir(tmp_path / "run" / "shared" / "sb1")
    try:
        shared.make()
        shared.add(Share("dead/rootfs", data))
        store = Store(tmp_path / "root")
        _, lock, mon = store.begin(_state("dead", shared_dir=str(shared.root)))
        os.close(lock)
        os.close(mon)  # the monitor died without its teardown
        assert rt(store.root, "delete", "dead").returncode == 0
        assert not shared.root.exists() and not (store.root / "dead").exists()
        assert (data / "written-by-the-container").read_text() == "keep me\n"
    finally:
        unmount_all(tmp_path)
