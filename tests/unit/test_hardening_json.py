"""Deeply nested JSON from outside is one clear error everywhere vmpod reads it
(image documents, exec process files, CNI records and plugin answers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmpod.errors import ImageError, NetworkError
from vmpod.images.blobs import parse_json as parse_image_json
from vmpod.network import cni
from vmpod.runtime.errors import RuntimeCliError
from vmpod.runtime.execcmd import _load_process

DEEP = b"[" * 100_000 + b"]" * 100_000


def test_an_image_document() -> None:
    with pytest.raises(ImageError, match="nested too deeply") as err:
        parse_image_json(DEEP, "manifest sha256:x")
    assert "\n" not in str(err.value)


def test_an_exec_process_file(tmp_path: Path) -> None:
    (tmp_path / "process.json").write_bytes(DEEP)
    with pytest.raises(RuntimeCliError, match="nested too deeply"):
        _load_process(str(tmp_path / "process.json"))


def test_a_cni_attachment_record(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_bytes(DEEP)
    with pytest.raises(NetworkError, match="nested too deeply"):
        cni.load_attachment(tmp_path / "c.json")
