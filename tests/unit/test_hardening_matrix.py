"""`vmpod matrix` under hostile tests and careless use: markup in foreign text,
unbounded test output, two matrices in one log dir, bad scripts, duplicate
kernels, negative numbers."""

from __future__ import annotations

import asyncio
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from vmpod.cli import matrix_cmd
from vmpod.cli.matrix_cmd import matrix
from vmpod.errors import ConfigError
from vmpod.fsutil import locked
from vmpod.hypervisor.accel import AccelChoice
from vmpod.images.source import ImageConfig
from vmpod.matrix import capped, report
from vmpod.matrix import run as mrun
from vmpod.matrix.capped import CappedOutput
from vmpod.matrix.report import ProgressView, results_table, write_json, write_junit
from vmpod.matrix.run import (
    LOCK_NAME,
    KernelResult,
    KernelTarget,
    MatrixConfig,
    dedupe_targets,
    logs_lock,
    read_script,
    run_matrix,
)
from vmpod.paths import Paths
from vmpod.sandbox import Exit

HOSTILE = "[/red] [bold]x[link=file:///etc/passwd]y"


def _result(**kw: Any) -> KernelResult:
    base: dict[str, Any] = {
        "kernel": "6.1",
        "release": "6.1.0-1-cloud-amd64",
        "steps": dict.fromkeys(("build", "boot", "load", "unload"), "ok") | {"test": "fail"},
        "dmesg": "clean",
        "detail": f"test: exit 1: {HOSTILE}",
    }
    return KernelResult(**(base | kw))


def _render(renderable: object) -> str:
    buf = io.StringIO()
    Console(file=buf, width=300, color_system=None).print(renderable)
    return buf.getvalue()


# -- markup ---------------------------------------------------------------------


def test_table_shows_foreign_text_literally() -> None:
    text = _render(results_table([_result(kernel=f"k{HOSTILE}", release="[/]")]))
    assert HOSTILE in text and "[/]" in text  # was: MarkupError, no report at all


def test_progress_lines_keep_kernel_names() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=300, color_system=None)
    assert not console.is_terminal
    view = ProgressView(["[bold]", "[/red]"], console)
    view.update("[bold]", "build", "running")
    view.update("[/red]", "test", "fail")
    assert buf.getvalue().splitlines() == ["[[bold]] build: running", "[[/red]] test: fail"]


def test_machine_reports_are_written_before_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_results: object) -> None:
        raise RuntimeError("table failed")

    monkeypatch.setattr(report, "results_table", broken)
    junit, js = tmp_path / "r.xml", tmp_path / "r.json"
    with pytest.raises(RuntimeError):
        matrix_cmd._report(Console(file=io.StringIO()), [_result()], junit, js, tmp_path)
    assert json.loads(js.read_text())["passed"] is False
    assert ET.parse(junit).getroot().get("failures") == "1"


def test_junit_is_valid_xml_with_control_bytes(tmp_path: Path) -> None:
    out = tmp_path / "r.xml"
    write_junit([_result(detail="test: exit 1: \x1b[31mred\x00\x07")], out)
    failure = ET.parse(out).getroot().find("testcase/failure")
    assert failure is not None and "red" in (failure.get("message") or "")


# -- test output cap ---------------------------------------------------------------


def test_capped_output_keeps_head_and_tail() -> None:
    out = CappedOutput(cap=1000, tail=100)
    for i in range(10_000):
        out.write(f"line {i}\n".encode())
    data = out.getvalue()
    assert len(data) < 1000 + 100 + 200
    assert data.startswith(b"line 0\n")
    assert data.endswith(b"line 9999\n")
    assert out.dropped > 0 and b"test output truncated" in data
    assert out.last_line() == "line 9999"
    small = CappedOutput(cap=1000, tail=100)
    small.write(b"ok\n")
    assert small.getvalue() == b"ok\n" and small.note() == "" and small.last_line() == "ok"


class _Proc:
    async def wait(self) -> Exit:
        return Exit(status=1, message="")

    async def signal(self, _sig: int) -> None:
        pass


class _Container:
    async def start(self, output: Any, stdin: bool) -> _Proc:
        chunk = b"y\n" * (1 << 19)  # 1 MiB
        for _ in range(40):
            output.stdout(chunk)
        output.stderr(b"[/red] the end\n")
        return _Proc()


class _Sandbox:
    async def create_container(self, _spec: object) -> _Container:
        return _Container()


def test_unbounded_test_output_is_capped_and_reported(tmp_path: Path) -> None:
    cfg = MatrixConfig(
        module_src=tmp_path,
        test_script="yes",
        image_disk=tmp_path / "disk",
        image_config=ImageConfig(),
        logs=tmp_path,
        accel=AccelChoice("tcg", "test"),
    )
    target = KernelTarget("6.1", SimpleNamespace(kernel=SimpleNamespace(release="6.1.0")), tmp_path)  # type: ignore[arg-type]
    run = mrun._Run(target, tmp_path, lambda *_: None)
    asyncio.run(mrun._test(_Sandbox(), cfg, run))  # type: ignore[arg-type]
    log = (tmp_path / "test.log").stat().st_size
    assert log < capped.MAX_TEST_OUTPUT + capped.TEST_OUTPUT_TAIL + 4096  # was 40 MiB
    result = run.result()
    assert result.detail == "test: exit 1: [/red] the end"
    assert len(result.notes) == 1 and "test output truncated" in result.notes[0]
    js = tmp_path / "r.json"
    write_json([result], js)
    assert "test output truncated" in json.loads(js.read_text())["results"][0]["notes"][0]
    assert "test output truncated" in _render(results_table([result]))


# -- two matrices, one log directory ---------------------------------------------


def test_second_matrix_in_the_same_logs_dir_is_refused(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    cfg = MatrixConfig(
        module_src=tmp_path,
        test_script="true",
        image_disk=tmp_path / "disk",
        image_config=ImageConfig(),
        logs=logs,
        accel=AccelChoice("tcg", "test"),
    )
    paths = Paths(home=tmp_path / "home", run=tmp_path / "run")
    with locked(logs / LOCK_NAME), pytest.raises(ConfigError, match="another vmpod matrix runs"):
        asyncio.run(run_matrix(paths, cfg, [], lambda *_: None))
    # free again: it runs (no kernels), also inside the CLI's own hold of the lock
    with logs_lock(logs):
        assert asyncio.run(run_matrix(paths, cfg, [], lambda *_: None)) == []
    assert asyncio.run(run_matrix(paths, cfg, [], lambda *_: None)) == []


def _module(tmp_path: Path) -> Path:
    src = tmp_path / "mod"
    src.mkdir(exist_ok=True)
    (src / "Kbuild").write_text("obj-m += m.o\n")
    return src


def _invoke(tmp_path: Path, *args: str, script: bytes = b"true\n") -> Any:
    test = tmp_path / "test.sh"
    test.write_bytes(script)
    argv = ["--kernels", "6.1", "--module-src", str(_module(tmp_path)), "--test", str(test)]
    return CliRunner().invoke(matrix, [*argv, "--logs", str(tmp_path / "logs"), *args])


def test_cli_refuses_a_second_matrix_before_fetching_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fetch(*_a: object, **_k: object) -> None:
        raise AssertionError("fetched a kernel")

    monkeypatch.setattr("vmpod.guest.assets.ensure_assets", no_fetch)
    (tmp_path / "logs").mkdir()
    with locked(tmp_path / "logs" / LOCK_NAME):
        res = _invoke(tmp_path)
    assert res.exit_code != 0
    assert "another vmpod matrix runs with its logs in" in res.output
    assert "Traceback" not in res.output


# -- bad input -------------------------------------------------------------------


def test_non_utf8_script_is_a_clear_error(tmp_path: Path) -> None:
    script = tmp_path / "t.sh"
    script.write_bytes(b"echo \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 5\)"):
        read_script(script)
    res = _invoke(tmp_path, script=b"echo \xff\n")
    assert res.exit_code != 0 and "is not UTF-8 text" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


@pytest.mark.parametrize(
    "args",
    [("--jobs", "-1"), ("--test-timeout", "-5"), ("--boot-timeout", "0"), ("--boot-timeout", "-1")],
)
def test_negative_jobs_and_timeouts_are_usage_errors(tmp_path: Path, args: tuple[str, str]) -> None:
    res = _invoke(tmp_path, *args)
    assert res.exit_code == 2, res.output
    assert "Invalid value for" in res.output


def test_same_kernel_under_two_names_runs_once(tmp_path: Path) -> None:
    def target(name: str, root: Path) -> KernelTarget:
        kernel = SimpleNamespace(root=root, release="6.1.0-28-cloud-amd64")
        return KernelTarget(name, SimpleNamespace(kernel=kernel), tmp_path)  # type: ignore[arg-type]

    a = tmp_path / "kernels" / "6.1.0-28-cloud-amd64"
    a.mkdir(parents=True)
    (tmp_path / "alias").symlink_to(a)
    other = tmp_path / "kernels" / "6.12"
    other.mkdir()
    kept, notes = dedupe_targets(
        [target("6.1", a), target("6.12", other), target("6.1-cloud", tmp_path / "alias")]
    )
    assert [t.name for t in kept] == ["6.1", "6.12"]
    assert notes == ["kernel '6.1-cloud' is the same kernel as '6.1' (6.1.0-28-cloud-amd64): running it once"]
