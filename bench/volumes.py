#!/usr/bin/env python3
"""File I/O over virtio-fs and start latency of a big image, as ratios measured in one run.

1. I/O: one container per runtime runs the same busybox script, which times each
   step inside the container (busybox `ts` stamps its marker lines, microseconds),
   so VM boot is not counted:
     seq write   dd bs=1M of MiB from /dev/zero, conv=fsync
     seq read    dd bs=1M of that file to /dev/null; under vmpod the guest's page
                 cache is dropped first (a privileged container), so the data
                 comes over virtio-fs; runc reads the host's page cache, which is
                 where virtiofsd reads from too (the host cache is never dropped:
                 the machine is shared)
     small files N files of 1 KiB, each `printf > file` (shell builtins only)
   on a VOLUME (a host directory bind-mounted at /vol) and on the ROOT FILESYSTEM
   (the bundle's rootfs directory on the host), with references that touch no
   shared file system (dd /dev/zero to /dev/null; small files on the container's
   /dev/shm tmpfs): they show what the guest's CPU alone costs (TCG is emulation).
     runc                 runc on the host
     vmpod-runtime        `vmpod-runtime run`, rootfs and volume over virtio-fs
   Each figure is the median of --io-runs containers per runtime (interleaved),
   with vmpod-runtime's time ÷ runc's (> 1: slower), plus the median wall time of
   the whole `run` command.
2. Start latency of `true` in a 1 GiB image (busybox + 1 GiB of random data):
     runc                 `runc run` (reference)
     vmpod-runtime        rootfs over virtio-fs, nothing copied
     vmpod run, first     `vmpod run --rootfs DIR -- true`: metadata digest,
                          mkfs.erofs of the whole tree, boot
     vmpod run, cached    the same, the erofs disk built already
   each the median of --runs runs (the first erofs run happens once), and ratios.

Everything lives in a temporary directory (private runc and vmpod-runtime roots);
containers, the erofs disk built for the test image and the directory are removed
at the end, also on Ctrl-C or SIGTERM. Usage:
  sudo .venv/bin/python bench/volumes.py [--quick] [--runs N] [--io-runs N]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from vmpod.hypervisor.accel import choose_accel
from vmpod.images.source import rootfs_digest
from vmpod.paths import default_paths

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VMPOD = BIN / "vmpod"
VMPOD_RUNTIME = BIN / "vmpod-runtime"
MIB = 1 << 20

# Constant text; sizes reach it through the environment (MB, NFILES, DROP).
IO_SCRIPT = r"""
set -e
mark() { echo "mark $1"; }
small() {
    mkdir "$1/small"
    mark "$2.small.begin"
    i=0
    while [ "$i" -lt "$NFILES" ]; do printf %s "$KB" > "$1/small/$i"; i=$((i + 1)); done
    mark "$2.small.end"
}
seq_io() {
    mark "$2.write.begin"
    dd if=/dev/zero of="$1/seq" bs=1M count="$MB" conv=fsync 2>/dev/null
    mark "$2.write.end"
    if [ "$DROP" = 1 ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi
    mark "$2.read.begin"
    dd if="$1/seq" of=/dev/null bs=1M 2>/dev/null
    mark "$2.read.end"
    rm "$1/seq"
}
KB=$(head -c 1024 /dev/zero | tr '\0' x)
mkdir -p /bench
{
    mark ref.write.begin
    dd if=/dev/zero of=/dev/null bs=1M count="$MB" 2>/dev/null
    mark ref.write.end
    small /dev/shm ref
    seq_io /vol volume
    small /vol volume
    seq_io /bench rootfs
    small /bench rootfs
    mark done
} | ts %.s
"""


@dataclass(frozen=True)
class Sizes:
    seq_mib: int
    nfiles: int
    image_mib: int
    runs: int
    io_runs: int


@dataclass
class Work:
    """The temporary directory and what must be removed with it."""

    dir: Path
    runc_ids: list[str] = field(default_factory=list)
    disks: list[Path] = field(default_factory=list)

    @property
    def runc_root(self) -> Path:
        return self.dir / "runc-root"

    @property
    def runtime_root(self) -> Path:
        return self.dir / "vmpod-runtime-root"

    def new_id(self, what: str) -> str:
        cid = f"vmpod-bench-{os.getpid()}-{what}-{len(self.runc_ids)}"
        self.runc_ids.append(cid)
        return cid


class Failed(Exception):
    pass


def run_timed(argv: list[str], timeout: float) -> tuple[float, str]:
    """Wall seconds and stdout of argv; raises Failed on a non-zero exit status.

    On any exception (Ctrl-C, timeout) the child gets SIGTERM, then SIGKILL."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        tail = (out + err).decode(errors="replace")[-2000:]
        raise Failed(f"{' '.join(argv)} exited {proc.returncode}:\n{tail}")
    return elapsed, out.decode(errors="replace")


def quiet(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


# -- bundles -------------------------------------------------------------------------


def base_spec(work: Path) -> dict[str, object]:
    where = work / "spec"
    where.mkdir()
    subprocess.run(["runc", "spec", "--bundle", str(where)], check=True)
    spec: dict[str, object] = json.loads((where / "config.json").read_text())
    return spec


def dict_at(spec: dict[str, object], key: str) -> dict[str, object]:
    value = spec[key]
    assert isinstance(value, dict)
    return value


def list_at(spec: dict[str, object], key: str) -> list[object]:
    value = spec.setdefault(key, [])
    assert isinstance(value, list)
    return value


def privileged(spec: dict[str, object]) -> None:
    """CAP_SYS_ADMIN and a writable /proc/sys: enough for drop_caches (the guest's)."""
    caps = dict_at(dict_at(spec, "process"), "capabilities")
    for name in ("bounding", "effective", "permitted"):
        group = caps[name]
        assert isinstance(group, list)
        group.append("CAP_SYS_ADMIN")
    linux = dict_at(spec, "linux")
    linux["readonlyPaths"] = [p for p in list_at(linux, "readonlyPaths") if p != "/proc/sys"]


def write_bundle(
    where: Path,
    base: dict[str, object],
    args: list[str],
    env: dict[str, str],
    volume: Path | None = None,
    privileged_: bool = False,
) -> Path:
    """A bundle in ``where`` (its rootfs/ must exist) running args, not on a terminal."""
    spec: dict[str, object] = json.loads(json.dumps(base))  # a deep copy
    process = dict_at(spec, "process")
    process.update(terminal=False, args=args)
    list_at(process, "env").extend(f"{k}={v}" for k, v in env.items())
    spec["root"] = {"path": str(where / "rootfs"), "readonly": False}
    if volume is not None:
        list_at(spec, "mounts").append(
            {"destination": "/vol", "type": "bind", "source": str(volume), "options": ["rbind", "rw"]}
        )
    if privileged_:
        privileged(spec)
    (where / "config.json").write_text(json.dumps(spec, indent=1))
    return where


def copy_busybox(dest: Path) -> Path:
    src = REPO / "examples/busybox"
    if not (src / "bin/busybox").is_file():
        raise SystemExit(f"{src} is missing: run scripts/setup.sh")
    shutil.copytree(src, dest, symlinks=True)
    return dest


def random_file(path: Path, mib: int) -> None:
    with path.open("wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(MIB))


# -- runtimes ------------------------------------------------------------------------


def runc_run(work: Work, bundle: Path, what: str, timeout: float) -> tuple[float, str]:
    cid = work.new_id(what)
    argv = ["runc", "--root", str(work.runc_root), "run", "--bundle", str(bundle), cid]
    return run_timed(argv, timeout)


def vmpod_runtime_run(work: Work, bundle: Path, what: str, timeout: float) -> tuple[float, str]:
    cid = work.new_id(what)
    argv = [str(VMPOD_RUNTIME), "--root", str(work.runtime_root), "run", "--bundle", str(bundle), cid]
    return run_timed(argv, timeout)


def vmpod_run(rootfs: Path, timeout: float) -> float:
    return run_timed([str(VMPOD), "run", "--rootfs", str(rootfs), "--", "true"], timeout)[0]


# -- 1. I/O --------------------------------------------------------------------------

IO_ROWS = [
    ("volume", "write", "seq write"),
    ("volume", "read", "seq read"),
    ("volume", "small", "small files"),
    ("rootfs", "write", "seq write"),
    ("rootfs", "read", "seq read"),
    ("rootfs", "small", "small files"),
    ("ref", "write", "dd zero→null"),
    ("ref", "small", "small, tmpfs"),
]


@dataclass(frozen=True)
class IoResult:
    wall: float
    steps: dict[tuple[str, str], float]  # (target, op) -> seconds inside the container


def parse_marks(out: str) -> dict[tuple[str, str], float]:
    """`STAMP mark TARGET.OP.begin|end` lines -> {(target, op): end - begin}."""
    stamps: dict[str, float] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "mark":
            stamps[parts[2]] = float(parts[0])
    if "done" not in stamps:
        raise Failed(f"the I/O script did not finish; its output:\n{out[-2000:]}")
    steps: dict[tuple[str, str], float] = {}
    for target, op, _ in IO_ROWS:
        steps[target, op] = stamps[f"{target}.{op}.end"] - stamps[f"{target}.{op}.begin"]
    return steps


def io_bundle(work: Work, name: str, base: dict[str, object], sizes: Sizes, drop: bool) -> Path:
    where = work.dir / f"io-{name}"
    where.mkdir()
    copy_busybox(where / "rootfs")
    volume = where / "volume"
    volume.mkdir()
    env = {"MB": str(sizes.seq_mib), "NFILES": str(sizes.nfiles), "DROP": "1" if drop else "0"}
    return write_bundle(where, base, ["sh", "-c", IO_SCRIPT], env, volume=volume, privileged_=drop)


def bench_io(work: Work, base: dict[str, object], sizes: Sizes) -> dict[str, IoResult]:
    """Each runtime's I/O container sizes.io_runs times, interleaved; medians per step."""
    # runc unprivileged and without DROP: dropping caches there would drop the host's
    bundles = {"runc": io_bundle(work, "runc", base, sizes, drop=False)}
    bundles["vmpod-runtime"] = io_bundle(work, "vmpod", base, sizes, drop=True)
    samples: dict[str, list[IoResult]] = {name: [] for name in bundles}
    for i in range(sizes.io_runs):
        for name, bundle in bundles.items():
            clear_outputs(bundle)
            if name == "runc":
                wall, out = runc_run(work, bundle, "io", timeout=300)
            else:
                wall, out = vmpod_runtime_run(work, bundle, "io", timeout=600)
            samples[name].append(IoResult(wall, parse_marks(out)))
            print(f"  {name} run {i + 1}/{sizes.io_runs}: {wall:.1f} s", flush=True)
    return {name: median_result(results) for name, results in samples.items()}


def clear_outputs(bundle: Path) -> None:
    """Remove what a previous I/O run left (its small files; the big file it removes)."""
    for small in (bundle / "volume/small", bundle / "rootfs/bench"):
        shutil.rmtree(small, ignore_errors=True)


def median_result(results: list[IoResult]) -> IoResult:
    steps = {key: statistics.median(r.steps[key] for r in results) for key in results[0].steps}
    return IoResult(statistics.median(r.wall for r in results), steps)


def figure(op: str, seconds: float, sizes: Sizes) -> str:
    if op == "small":
        return f"{sizes.nfiles / seconds:9.0f} files/s"
    return f"{sizes.seq_mib / seconds:9.1f} MiB/s  "


def print_io(results: dict[str, IoResult], sizes: Sizes) -> None:
    runc, vm = results["runc"], results["vmpod-runtime"]
    print(
        f"1. I/O inside the container: seq {sizes.seq_mib} MiB (bs=1M), "
        f"{sizes.nfiles} files of 1 KiB; median of {sizes.io_runs}; ratio = vmpod-runtime time ÷ runc time"
    )
    print(f"{'target':<8} {'step':<14} {'runc':>17} {'vmpod-runtime':>17} {'ratio':>8}")
    for target, op, label in IO_ROWS:
        a, b = runc.steps[target, op], vm.steps[target, op]
        print(f"{target:<8} {label:<14} {figure(op, a, sizes):>17} {figure(op, b, sizes):>17} {b / a:7.1f}x")
    print(
        f"whole `run` command (incl. VM boot): runc {runc.wall:.2f} s, vmpod-runtime {vm.wall:.2f} s,"
        f" ratio {vm.wall / runc.wall:.1f}x"
    )


# -- 2. start latency ----------------------------------------------------------------


def erofs_disk_of(rootfs: Path) -> Path:
    """Where `vmpod run --rootfs` caches rootfs's erofs disk (src/vmpod/storage/erofs.py)."""
    key = hashlib.sha256(rootfs_digest(rootfs).encode()).hexdigest()[:32]
    return default_paths().images / "disks" / f"{key}.erofs"


def big_image(work: Work, base: dict[str, object], sizes: Sizes) -> tuple[Path, Path]:
    """(bundle for runc and vmpod-runtime, rootfs dir for vmpod run): two busybox trees
    sharing one big file by hard link, so containers never change the tree vmpod run
    digests (the cached run stays cached)."""
    image = copy_busybox(work.dir / "image")
    random_file(image / "big.bin", sizes.image_mib)
    where = work.dir / "big-bundle"
    where.mkdir()
    copy_busybox(where / "rootfs")
    os.link(image / "big.bin", where / "rootfs/big.bin")
    return write_bundle(where, base, ["true"], {}), image


def bench_start(work: Work, base: dict[str, object], sizes: Sizes) -> dict[str, list[float]]:
    bundle, image = big_image(work, base, sizes)
    disk = erofs_disk_of(image)
    if disk.exists():
        raise Failed(f"{disk} exists already: the first erofs run would not build it")
    work.disks.append(disk)
    times: dict[str, list[float]] = {"runc": [], "vmpod-runtime": [], "vmpod run, first": []}
    times["vmpod run, first"].append(vmpod_run(image, timeout=600))
    if not disk.is_file():
        print(f"  note: {disk} not found after the first run; is the cache elsewhere?")
    times["vmpod run, cached"] = []
    for i in range(sizes.runs):  # interleaved so drift hits all alike
        times["runc"].append(runc_run(work, bundle, "start", timeout=120)[0])
        times["vmpod-runtime"].append(vmpod_runtime_run(work, bundle, "start", timeout=300)[0])
        times["vmpod run, cached"].append(vmpod_run(image, timeout=300))
        print(f"  round {i + 1}/{sizes.runs} done", flush=True)
    return times


def print_start(times: dict[str, list[float]], sizes: Sizes) -> None:
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"\n2. Start latency of `true` in a {sizes.image_mib} MiB image, whole command, "
        f"median of {sizes.runs} (the first erofs run: once)"
    )
    for name, ts in times.items():
        runs = ", ".join(f"{t:.2f}" for t in ts)
        print(f"{name:<18} {med[name]:7.2f} s   ({runs})   ÷ runc {med[name] / med['runc']:6.1f}x")
    shared, cached, first = med["vmpod-runtime"], med["vmpod run, cached"], med["vmpod run, first"]
    print(f"virtio-fs rootfs ÷ erofs cached: {shared / cached:.2f}x; ÷ erofs first: {shared / first:.2f}x")
    print(f"erofs first run − cached run (digest + mkfs.erofs): {first - cached:.2f} s")


# -- clean-up ------------------------------------------------------------------------


def mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix):
            found.append(point)
    return found


def cleanup(work: Work) -> None:
    for cid in work.runc_ids:
        quiet(["runc", "--root", str(work.runc_root), "delete", "--force", cid])
    if work.runtime_root.exists():
        listed = quiet([str(VMPOD_RUNTIME), "--root", str(work.runtime_root), "list", "--quiet"])
        for cid in listed.stdout.split():
            quiet([str(VMPOD_RUNTIME), "--root", str(work.runtime_root), "delete", "--force", cid])
    for disk in work.disks:
        disk.unlink(missing_ok=True)
    left = mounts_under(work.dir)
    if left:
        print(f"volumes.py: mounts left under {work.dir}, not removing it: {left}", file=sys.stderr)
        return
    shutil.rmtree(work.dir, ignore_errors=True)


@contextlib.contextmanager
def workdir() -> Iterator[Work]:
    def interrupted(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    # on disk, not tmpfs: the rootfs and volume runc sees are on the same file system
    work = Work(Path(tempfile.mkdtemp(prefix="vmpod-bench-volumes-", dir="/var/tmp")))
    try:
        yield work
    finally:
        # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            cleanup(work)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            signal.signal(signal.SIGINT, signal.default_int_handler)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 MiB, 300 files, a 64 MiB image, fewer runs")
    ap.add_argument("--runs", type=int, help="start-latency runs of each (default 5, 2 with --quick)")
    ap.add_argument("--io-runs", type=int, help="I/O runs of each runtime (default 3, 1 with --quick)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("volumes.py: run as root (runc, vmpod-runtime)")
    if args.quick:
        sizes = Sizes(32, 300, 64, runs=args.runs or 2, io_runs=args.io_runs or 1)
    else:
        sizes = Sizes(256, 2000, 1024, runs=args.runs or 5, io_runs=args.io_runs or 3)
    started = time.monotonic()
    try:
        with workdir() as work:
            base = base_spec(work.dir)
            print("1. I/O ...", flush=True)
            io = bench_io(work, base, sizes)
            print("2. start latency ...", flush=True)
            start = bench_start(work, base, sizes)
    except Failed as err:
        raise SystemExit(f"volumes.py: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit("volumes.py: interrupted (cleaned up)") from None
    print(f"\naccel {choose_accel('auto').accel}, {os.cpu_count()} host CPUs, files under /var/tmp")
    print_io(io, sizes)
    print_start(start, sizes)
    print(f"\n(total {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
