"""Matrix results as a table (rich), a live progress view, JUnit XML and JSON."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from vmpod.matrix.run import STEPS, KernelResult

_STYLE = {
    "ok": "green",
    "pass": "green",
    "clean": "green",
    "fail": "bold red",
    "running": "yellow",
    "interrupted": "yellow",
    "skip": "dim",
    "-": "dim",
}


def _cell(value: str) -> Text:
    """A status cell; the text is never read as markup (a hostile kernel log or
    test output must not break or restyle the report)."""
    return Text(value, style=_STYLE.get(value, "bold red"))


def _plain(value: str) -> Text:
    """Foreign text (kernel names, test output, paths) as a cell, never as markup."""
    return Text(value)


def results_table(results: list[KernelResult]) -> Table:
    table = Table(title="vmpod matrix")
    for col in ("kernel", "release", *STEPS, "dmesg", "time", "detail"):
        table.add_column(col, overflow="fold", max_width=60 if col == "detail" else None)
    for r in results:
        detail = "; ".join(x for x in (r.detail, *r.notes) if x)
        table.add_row(
            _plain(r.kernel),
            _plain(r.release),
            *(_cell(r.steps.get(s, "skip")) for s in STEPS),
            _cell(r.dmesg),
            f"{r.seconds:.1f}s",
            _plain(detail),
        )
    return table


class ProgressView:
    """Live table of each kernel's current step (a line per change off a terminal)."""

    def __init__(self, kernels: list[str], console: Console) -> None:
        self.console = console
        self.state: dict[str, dict[str, str]] = {k: {s: "·" for s in STEPS} for k in kernels}
        self.live = (
            Live(self._table(), console=console, refresh_per_second=8, transient=True)
            if console.is_terminal
            else None
        )

    def _table(self) -> Table:
        table = Table(title="vmpod matrix: running")
        for col in ("kernel", *STEPS):
            table.add_column(col)
        for kernel, steps in self.state.items():
            table.add_row(_plain(kernel), *(_cell(steps[s]) if steps[s] != "·" else "·" for s in STEPS))
        return table

    def __enter__(self) -> ProgressView:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def update(self, kernel: str, step: str, state: str) -> None:
        self.state[kernel][step] = state
        if self.live is not None:
            self.live.update(self._table())
        else:
            self.console.print(escape(f"[{kernel}] {step}: {state}"), highlight=False)


def write_json(results: list[KernelResult], path: Path) -> None:
    data = [
        {
            "kernel": r.kernel,
            "release": r.release,
            "passed": r.passed,
            "steps": r.steps,
            "dmesg": r.dmesg,
            "findings": list(r.findings),
            "detail": r.detail,
            "seconds": round(r.seconds, 3),
            "logs": str(r.logs),
            "notes": list(r.notes),
        }
        for r in results
    ]
    path.write_text(json.dumps({"results": data, "passed": all(r.passed for r in results)}, indent=2))


_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def _xml(text: str) -> str:
    """Foreign text made legal in XML 1.0 (control bytes from a test's output)."""
    return _XML_ILLEGAL.sub("\ufffd", text)


def write_junit(results: list[KernelResult], path: Path) -> None:
    suite = ET.Element(
        "testsuite",
        name="vmpod-matrix",
        tests=str(len(results)),
        failures=str(sum(not r.passed for r in results)),
        time=f"{max((r.seconds for r in results), default=0):.3f}",
    )
    for r in results:
        case = ET.SubElement(
            suite,
            "testcase",
            classname="vmpod.matrix",
            name=_xml(f"{r.kernel} ({r.release})"),
            time=f"{r.seconds:.3f}",
        )
        if not r.passed:
            failure = ET.SubElement(case, "failure", message=_xml(r.detail or f"dmesg: {r.dmesg}"))
            failure.text = _xml("\n".join(r.findings))
        out = ET.SubElement(case, "system-out")
        out.text = " ".join(f"{s}={r.steps.get(s)}" for s in STEPS) + f" dmesg={r.dmesg} logs={r.logs}"
        out.text = _xml(out.text + "".join(f"\n{note}" for note in r.notes))
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
