"""Guest side: dump one container process's memory for forensics.

The host names the process by its pid in the container's pid namespace (what
``vmpod exec NAME ps`` shows). The agent knows the container's init by its pid
in the VM; a process is the container's when its pid namespace is the init's,
and the last number of its ``NSpid`` line (/proc/PID/status) is its pid there.
Its ``maps`` are copied, then every readable region is read from
``/proc/PID/mem`` into ``<start>-<end>.bin`` (runs of zero bytes become holes:
an untouched heap costs no disk). A region the kernel refuses (``[vvar]``,
device mappings) is listed, not fatal.

Standard library only.
"""

from __future__ import annotations

import os

from vmpod.agent.guest.errors import AgentFailure

CHUNK = 1 << 20
MAX_MAPS = 16 << 20  # bytes of /proc/PID/maps
MAX_UNREADABLE = 64  # regions listed as unreadable in the answer
_ZERO = bytes(CHUNK)


def _nspid(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


def vm_pid(init_pid: int, ns_pid: int) -> int:
    """The VM pid of the process numbered ``ns_pid`` in ``init_pid``'s pid namespace."""
    try:
        ns = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        raise AgentFailure("the container's init is gone", "invalid") from None
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        ids = _nspid(int(name))
        if ids and ids[-1] == ns_pid:
            try:
                if os.readlink(f"/proc/{name}/ns/pid") == ns:
                    return int(name)
            except OSError:
                continue
    raise AgentFailure(f"the container has no process {ns_pid}", "not_found")


def _regions(maps: str) -> list[tuple[int, int, str]]:
    out = []
    for line in maps.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5 or "r" not in fields[1]:
            continue
        lo, _, hi = fields[0].partition("-")
        try:
            out.append((int(lo, 16), int(hi, 16), line))
        except ValueError:
            continue
    return out


def dump(pid: int, dest: str, max_bytes: int) -> tuple[int, int, list[str]]:
    """(regions written, bytes, unreadable maps lines) of ``pid`` into ``dest``."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as fh:
            maps = fh.read(MAX_MAPS).decode(errors="replace")
        mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError as err:
        raise AgentFailure(f"cannot read the memory of process {pid}: {err.strerror}") from None
    try:
        _write(os.path.join(dest, "maps.txt"), maps.encode())
        regions, total = 0, 0
        unreadable: list[str] = []
        for lo, hi, line in _regions(maps):
            if total + hi - lo > max_bytes:
                raise AgentFailure(
                    f"the process's readable memory exceeds {max_bytes} bytes (raise --max-size)", "invalid"
                )
            path = os.path.join(dest, f"{lo:016x}-{hi:016x}.bin")
            if _copy(mem, lo, hi, path):
                regions, total = regions + 1, total + hi - lo
            elif len(unreadable) < MAX_UNREADABLE:
                unreadable.append(line[:300])
        return regions, total, unreadable
    finally:
        os.close(mem)


def _write(path: str, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except OSError as err:
        raise AgentFailure(f"cannot write the memory dump: {err.strerror or err}") from None


def _copy(mem: int, lo: int, hi: int, path: str) -> bool:
    """Copy [lo, hi) of the process's memory to ``path``; False (nothing left) if
    the kernel refuses to read any of it. A failed write is an error."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    done = False
    try:
        with os.fdopen(fd, "wb") as out:
            addr = lo
            while addr < hi:
                try:
                    data = os.pread(mem, min(CHUNK, hi - addr), addr)
                except (OSError, OverflowError):
                    data = b""
                if not data:
                    return False
                if data == _ZERO[: len(data)]:
                    out.seek(len(data), os.SEEK_CUR)  # a hole
                else:
                    out.write(data)
                addr += len(data)
            out.truncate(hi - lo)
        done = True
        return True
    except OSError as err:
        raise AgentFailure(f"cannot write the memory dump: {err.strerror or err}") from None
    finally:
        if not done:
            os.unlink(path)
