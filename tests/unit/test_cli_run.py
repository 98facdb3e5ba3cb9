"""`vmpod run` end to end without a VM: the real pipeline (image resolution, OCI
spec, prepare, sandbox, attach) on the fake hypervisor and the real agent."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.fakevm import fake_config, fake_rootfs, registered
from vmpod.cli import run as run_mod
from vmpod.cli.run import RunOptions, run
from vmpod.errors import ConfigError
from vmpod.guest.progress import silent
from vmpod.paths import Paths
from vmpod.runspec import ProcessOptions
from vmpod.sandbox import build


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Paths]:
    """Real prepare() over fake assets; the VM is FakeVm with directory rootfs."""
    fake = fake_config(tmp_path / "assets")
    monkeypatch.setattr(build, "ensure_assets", lambda *a, **k: fake.assets)
    monkeypatch.setattr(build, "plan_modules", lambda *a, **k: [])
    real_prepare = build.prepare

    def prepare(*a: object, **k: object) -> object:
        cfg = real_prepare(*a, **k)  # type: ignore[arg-type]
        return dataclasses.replace(cfg, hypervisor="fake", rootfs_fstype="dir")

    monkeypatch.setattr(run_mod, "prepare", prepare)
    monkeypatch.setattr(run_mod, "rootfs_disk", lambda paths, source, progress: source.rootfs_dir)
    with registered():
        yield Paths(home=tmp_path / "home", run=tmp_path / "run")


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return fake_rootfs(tmp_path)


def opts(rootfs: Path, *args: str, **kw: object) -> RunOptions:
    process = ProcessOptions(args=args, env=("PATH=/usr/bin:/bin",), tty=bool(kw.pop("tty", False)))
    kw.setdefault("network", "none")  # the fake VM has no NICs (networking: tests/vm)
    return RunOptions(image="", rootfs=str(rootfs), process=process, **kw)  # type: ignore[arg-type]


def test_output_and_status(paths: Paths, rootfs: Path, capfd: pytest.CaptureFixture[str]) -> None:
    status = asyncio.run(run(paths, opts(rootfs, "sh", "-c", "echo out; echo err >&2; exit 4"), silent))
    captured = capfd.readouterr()
    assert (status, captured.out, captured.err) == (4, "out\n", "err\n")
    assert list((paths.run / "sandboxes").iterdir()) == []


def test_stdin_is_forwarded(
    paths: Paths, rootfs: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "in.txt"
    data.write_bytes(b"line one\nline two\n")
    saved = os.dup(0)
    fd = os.open(data, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    try:
        status = asyncio.run(run(paths, opts(rootfs, "cat", interactive=True), silent))
    finally:
        os.dup2(saved, 0)
        os.close(saved)
    assert (status, capfd.readouterr().out) == (0, "line one\nline two\n")


async def _signal_when(marker: Path, sig: int, times: int = 1) -> None:
    while not marker.exists():
        await asyncio.sleep(0.02)
    for _ in range(times):
        os.kill(os.getpid(), sig)
        await asyncio.sleep(0.05)


def test_ctrl_c_reaches_the_container(
    paths: Paths, rootfs: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ready"
    script = f'trap "echo trapped; exit 7" INT; touch {marker}; while :; do sleep 0.05; done'

    async def scenario() -> int:
        poke = asyncio.ensure_future(_signal_when(marker, signal.SIGINT))
        status = await run(paths, opts(rootfs, "sh", "-c", script), silent)
        await poke
        return status

    assert asyncio.run(scenario()) == 7
    assert "trapped" in capfd.readouterr().out


def test_a_container_that_ignores_the_signal_is_killed_after_the_grace(
    paths: Paths, rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_mod, "STOP_GRACE", 0.3)
    marker = tmp_path / "ready"
    script = f'trap "" TERM; touch {marker}; while :; do sleep 0.05; done'

    async def scenario() -> int:
        poke = asyncio.ensure_future(_signal_when(marker, signal.SIGTERM))
        status = await run(paths, opts(rootfs, "sh", "-c", script), silent)
        await poke
        return status

    assert asyncio.run(scenario()) == 128 + signal.SIGKILL


def test_a_missing_command_gives_127_with_a_message(
    paths: Paths, rootfs: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    status = asyncio.run(run(paths, opts(rootfs, "/no/such/command"), silent))
    assert status == 127
    assert "vmpod:" in capfd.readouterr().err


def test_bad_options_are_refused_before_anything_boots(paths: Paths, rootfs: Path) -> None:
    with pytest.raises(ConfigError, match="at least 1 CPU"):
        asyncio.run(run(paths, opts(rootfs, "true", cpus=0), silent))
    with pytest.raises(ConfigError, match="not both"):
        asyncio.run(run(paths, dataclasses.replace(opts(rootfs, "true"), image="x"), silent))
    with pytest.raises(ConfigError, match="no image given"):
        asyncio.run(run(paths, dataclasses.replace(opts(rootfs, "true"), rootfs=""), silent))
    assert not (paths.run / "sandboxes").exists() or not list((paths.run / "sandboxes").iterdir())
