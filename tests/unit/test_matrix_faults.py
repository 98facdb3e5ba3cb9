"""`vmpod matrix` verdicts when the guest floods its log, runs out of memory or
hangs, when rmmod is killed, and when the matrix itself is interrupted: a fake
guest that answers like the agent does (newest 48 KiB of the kernel log)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vmpod.agent.protocol import MAX_LOG, CommandResult, KernelLogResult
from vmpod.cli.matrix_cmd import run_interruptible
from vmpod.errors import AgentError, AgentTimeout
from vmpod.guest.modules import ModuleLoad
from vmpod.hypervisor.accel import AccelChoice
from vmpod.images.source import ImageConfig
from vmpod.matrix import klog
from vmpod.matrix import run as mrun
from vmpod.matrix.build import BuildResult
from vmpod.matrix.klog import KernelLogTap
from vmpod.matrix.report import write_json
from vmpod.matrix.run import KernelResult, KernelTarget, MatrixConfig, run_matrix
from vmpod.paths import Paths
from vmpod.sandbox import Exit

BUG = "BUG: KASAN: slab-out-of-bounds in m_write+0x2a/0x40 [m]"
OOM = "Out of memory: Killed process 88 (sh) total-vm:600000kB"


class Guest:
    """The agent's kernel log: records after ``since``, the newest MAX_LOG bytes."""

    def __init__(self) -> None:
        self.records: list[str] = [f"boot {i}" for i in range(5)]
        self.dead: BaseException | None = None
        self.console = "[    0.1] booting\n"
        self.stopped = False
        self.test: Any = None  # async (guest) -> Exit
        self.unload = CommandResult(status=0, stdout="")

    def log(self, *lines: str) -> None:
        self.records += lines

    async def kernel_log(self, since: int = -1) -> KernelLogResult:
        if self.dead is not None:
            raise self.dead
        start = max(since + 1, 0)
        lines = [f"[{seq:12.6f}] {text}" for seq, text in enumerate(self.records[start:], start)]
        out = "\n".join(lines).encode()
        text = out[-MAX_LOG:].decode(errors="replace")
        return KernelLogResult(
            text=text, last_seq=len(self.records) - 1, tainted=0, truncated=len(out) > MAX_LOG
        )

    # -- the Sandbox surface _in_vm uses ----------------------------------------
    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        await asyncio.sleep(0.05)  # a VM takes a moment to go: an interruption must wait for it
        self.stopped = True

    def console_tail(self, _lines: int = 20) -> str:
        return self.console

    async def load_module(self, _m: ModuleLoad) -> CommandResult:
        self.log("m: loaded")
        return CommandResult(status=0, stdout="")

    async def unload_module(self, _name: str) -> CommandResult:
        if self.dead is not None:
            raise self.dead
        return self.unload

    async def create_container(self, _spec: object) -> Any:
        guest = self

        class Proc:
            async def wait(self) -> Exit:
                return await guest.test(guest) if guest.test else Exit(0)

            async def signal(self, _sig: int) -> None:
                if guest.dead is not None:
                    raise guest.dead

        class Container:
            async def start(self, _output: object, stdin: bool) -> Proc:
                return Proc()

        return Container()


def _cfg(tmp_path: Path, **kw: Any) -> MatrixConfig:
    base: dict[str, Any] = {
        "module_src": tmp_path,
        "test_script": "true",
        "image_disk": tmp_path / "disk",
        "image_config": ImageConfig(),
        "logs": tmp_path / "logs",
        "accel": AccelChoice("tcg", "test"),
    }
    return MatrixConfig(**(base | kw))


def _target(name: str, tmp_path: Path) -> KernelTarget:
    return KernelTarget(name, SimpleNamespace(kernel=SimpleNamespace(release=f"{name}.0")), tmp_path)  # type: ignore[arg-type]


def _in_vm(tmp_path: Path, guest: Guest, monkeypatch: pytest.MonkeyPatch, **cfg: Any) -> KernelResult:
    monkeypatch.setattr(mrun, "Sandbox", lambda _paths, _config: guest)
    monkeypatch.setattr(klog, "POLL_INTERVAL", 0.01)
    logs = tmp_path / "k"
    logs.mkdir()
    run = mrun._Run(_target("6.1", tmp_path), logs, lambda *_: None)
    for s in ("build",):
        run.steps[s] = "ok"
    config = SimpleNamespace(modules=[ModuleLoad("m", tmp_path / "m.ko")])
    paths = Paths(home=tmp_path / "home", run=tmp_path / "run")
    asyncio.run(mrun._in_vm(paths, _cfg(tmp_path, **cfg), config, {"m"}, run))  # type: ignore[arg-type]
    assert guest.stopped
    return run.result()


# -- the whole kernel log is judged --------------------------------------------------


def test_bug_followed_by_a_flood_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def flood(guest: Guest) -> Exit:
        guest.log(BUG)
        for chunk in range(8):  # 8 x 30 KiB, while the matrix reads every 10 ms
            guest.log(*(f"m: flood {chunk}.{i} " + "x" * 100 for i in range(300)))
            await asyncio.sleep(0.1)
        return Exit(0)

    guest = Guest()
    guest.test = flood
    res = _in_vm(tmp_path, guest, monkeypatch)
    assert res.dmesg == "bug" and res.findings[0].endswith(BUG)  # was "clean": only the last 48 KiB
    assert res.steps["test"] == "pass" and not res.passed
    dmesg = (res.logs / "dmesg.log").read_text()
    assert BUG in dmesg and "m: flood 7.299" in dmesg


def test_tap_notes_lost_records_and_judges_the_console() -> None:
    guest = Guest()
    tap = KernelLogTap(guest)
    asyncio.run(tap.begin())
    guest.log(BUG, *("x" * 200 for _ in range(400)))  # 80 KiB between two reads
    asyncio.run(tap.finish())
    assert tap.lost and tap.scanner.status == "clean"
    assert tap.verdict(f"[ 3.2] {BUG}\n").status == "bug"  # the console has it
    assert "older lines lost" in tap.notes()[0]


def test_tap_memory_is_bounded() -> None:
    guest = Guest()
    tap = KernelLogTap(guest)
    asyncio.run(tap.begin())
    for i in range(1000):  # 2 MiB
        guest.log(*(f"WARNING: CPU: 0 PID: {i} at x.c:{j}" for j in range(50)))
        asyncio.run(tap.read())
    assert len(tap.scanner.findings) == 20 and tap.scanner.status == "warn"
    assert len(tap.text.getvalue()) < klog.DMESG_HEAD + klog.DMESG_TAIL + 1024
    assert "kernel log truncated" in tap.notes()[-1]


# -- out of memory, hangs: the console, and only the step that ran ---------------------


@pytest.mark.parametrize("agent_died", [True, False])
def test_out_of_memory_is_not_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, agent_died: bool
) -> None:
    async def eat(guest: Guest) -> Exit:
        if agent_died:  # the OOM killer took the agent: no kernel log any more
            guest.console += f"[   12.5] {OOM}\n"
            guest.dead = AgentError("the guest agent closed the connection")
            raise guest.dead
        guest.log("sh invoked oom-killer: gfp_mask=0x140cca", OOM)
        return Exit(137)

    guest = Guest()
    guest.test = eat
    res = _in_vm(tmp_path, guest, monkeypatch)
    assert res.dmesg == "oom", res  # was "clean"
    assert any(OOM in f for f in res.findings)
    assert res.steps["test"] == "fail" and res.steps["unload"] == ("skip" if agent_died else "ok")


def test_guest_hung_after_the_steps_fails_no_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def then_hang(guest: Guest) -> Exit:
        guest.unload = CommandResult(status=0, stdout="")
        return Exit(0)

    guest = Guest()
    guest.test = then_hang
    real_unload = guest.unload_module

    async def unload(name: str) -> CommandResult:
        r = await real_unload(name)
        guest.dead = AgentTimeout("the guest agent did not answer within 10s")
        return r

    guest.unload_module = unload  # type: ignore[method-assign,assignment]
    res = _in_vm(tmp_path, guest, monkeypatch)
    # was: test "fail" although it passed
    assert res.steps == {"build": "ok", "boot": "ok", "load": "ok", "test": "pass", "unload": "ok"}
    assert res.dmesg == "unknown" and not res.passed
    assert "did not answer" in res.detail


def test_killed_rmmod_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    guest = Guest()
    guest.unload = CommandResult(status=-9, stdout="", stderr="")
    res = _in_vm(tmp_path, guest, monkeypatch)
    assert res.steps["unload"] == "fail"
    assert res.detail == "unload m: rmmod killed by signal 9"  # was "unload m: "


# -- interruption ---------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_reports_what_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: signal.Signals
) -> None:
    ko = tmp_path / "m.ko"
    guests = {"fast": Guest(), "slow": Guest(), "queued": Guest()}
    fast_done = asyncio.Event()

    async def hang(guest: Guest) -> Exit:
        await fast_done.wait()
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signum)
        await asyncio.sleep(1000)
        raise AssertionError("not interrupted")

    guests["slow"].test = hang
    real_stop = guests["fast"].stop

    async def stop_fast() -> None:
        await real_stop()
        fast_done.set()

    guests["fast"].stop = stop_fast  # type: ignore[method-assign]

    async def build(_src: Path, _headers: Path, _work: Path) -> BuildResult:
        return BuildResult(True, (ko,), "ok", 0.0)

    def prepare(_paths: Paths, spec: Any) -> Any:
        return SimpleNamespace(modules=[ModuleLoad("m", ko)], kernel=spec.kernel)

    monkeypatch.setattr(mrun, "build_module", build)
    monkeypatch.setattr(mrun, "prepare", prepare)
    monkeypatch.setattr(mrun, "Sandbox", lambda _p, config: guests[config.kernel])
    cfg = _cfg(tmp_path, jobs=1)  # "queued" waits for the VM slot
    targets = [_target(n, tmp_path) for n in guests]
    paths = Paths(home=tmp_path / "home", run=tmp_path / "run")
    events: list[str] = []
    real_slow_stop = guests["slow"].stop

    async def stop_slow() -> None:
        await real_slow_stop()
        events.append("slow VM stopped")

    guests["slow"].stop = stop_slow  # type: ignore[method-assign]

    async def matrix() -> list[KernelResult]:
        results = await run_matrix(paths, cfg, targets, lambda *_: None)
        events.append("matrix returned")
        return results

    results, got = run_interruptible(matrix)
    assert got == signum
    assert events == ["slow VM stopped", "matrix returned"]  # the report waits for the clean-up
    by = {r.kernel: r for r in results}
    assert set(by) == set(guests)
    assert by["fast"].passed
    assert by["slow"].steps["test"] == "interrupted" and by["slow"].steps["unload"] == "skip"
    assert by["slow"].detail == f"interrupted by {signum.name}", by["slow"]
    assert by["slow"].dmesg == "-"
    assert by["queued"].steps["boot"] == "skip" and by["queued"].detail == f"interrupted by {signum.name}"
    assert guests["fast"].stopped and guests["slow"].stopped  # no VM left behind
    js = tmp_path / "r.json"
    write_json(results, js)
    assert json.loads(js.read_text())["passed"] is False
