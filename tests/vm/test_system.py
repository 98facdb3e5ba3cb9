"""`vmpod system df / prune` around real containers: prune keeps what a stopped
container needs, `-a` after `rm` frees it, and a later run still works."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.fixtures.oci import make_oci_layout
from tests.vm.conftest import VmpodRunner

SCRIPT = "cat /made 2>/dev/null; echo made > /made"  # prints only on the second start


def _df(vmpod: VmpodRunner) -> dict[str, dict[str, int]]:
    r = vmpod("system", "df", "--format", "json")
    assert r.returncode == 0, r.err
    return {str(row["type"]): row for row in json.loads(r.out)}


def _exited(vmpod: VmpodRunner, name: str) -> bool:
    r = vmpod("ps", "-a", "--format", "json")
    return any(row["name"] == name and str(row["status"]).startswith("Exited") for row in json.loads(r.out))


def test_prune_keeps_what_a_stopped_container_needs(
    vmpod: VmpodRunner, busybox: Path, tmp_path: Path
) -> None:
    image = f"{make_oci_layout(busybox, tmp_path / 'layout', tag='v1')}:v1"
    r = vmpod.run("--name", "keep", "--network", "none", image, "--", "sh", "-c", SCRIPT)
    assert (r.returncode, r.out) == (0, ""), r.err
    rows = _df(vmpod)
    assert rows["image trees"]["count"] == 1 and rows["image trees"]["size"] > 100_000  # busybox
    assert rows["image trees"]["reclaimable"] == 0  # the stopped container's lower layer
    assert rows["containers"]["count"] == 1 and rows["containers"]["size"] > 0  # /made
    trees = vmpod.paths.images / "trees"
    (tree,) = [p for p in trees.iterdir() if not p.name.startswith(".")]

    for args in (("-f",), ("-a", "-f")):
        r = vmpod("system", "prune", *args)
        assert r.returncode == 0 and "Total reclaimed space" in r.out, r.err
        assert tree.is_dir() and "Deleted image trees" not in r.out

    r = vmpod("start", "keep")  # the stopped container still has its root filesystem
    assert r.returncode == 0, r.err
    deadline = time.monotonic() + 180
    while not _exited(vmpod, "keep"):
        assert time.monotonic() < deadline, "the restarted container did not exit"
        time.sleep(0.5)
    assert vmpod("logs", "keep").out == "made\n"  # its writable layer survived too

    assert vmpod("rm", "keep").returncode == 0
    assert _df(vmpod)["image trees"]["reclaimable"] == _df(vmpod)["image trees"]["size"] > 0
    r = vmpod("system", "prune", "-a", "-f")
    assert r.returncode == 0 and f"Deleted image trees: {tree}" in r.out, r.err
    rows = _df(vmpod)
    assert (rows["image trees"]["count"], rows["containers"]["count"], rows["temp"]["count"]) == (0, 0, 0)

    r = vmpod.run("--network", "none", image, "--", "echo", "again")  # rebuilt on demand
    assert (r.returncode, r.out) == (0, "again\n"), r.err
    # one new disk, reclaimable once its run ended (the cache home is the session's:
    # another test's disk may be leased still, so compare with before)
    before, after = rows["disk images"], _df(vmpod)["disk images"]
    assert after["count"] == before["count"] + 1
    assert after["reclaimable"] - before["reclaimable"] == after["size"] - before["size"] > 0
