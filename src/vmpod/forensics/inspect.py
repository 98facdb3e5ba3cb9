"""``vmpod forensics inspect``: what an evidence archive's CRIU images say, offline,
on the host, like checkpointctl and beyond it: the process tree with command
lines and environments (read from the dumped memory, where the kernel keeps
them), open files with fd numbers and offsets, sockets, mounts, and a search of
every process's dumped memory for a string or a regular expression.

The archive is verified first (every digest), then unpacked, size-capped, into
an owned temp dir that goes when inspection ends. A damaged per-process image
is a warning naming it and the rest is still shown; a checkpoint without a
readable process tree is an error.
"""

from __future__ import annotations

import quopri
import re
import socket
import stat
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from vmpod.errors import ForensicsError
from vmpod.forensics import archive as a
from vmpod.forensics.images import Entry, Images, decode
from vmpod.forensics.memory import Hit, Memory, dotted, printable, strings
from vmpod.fsutil import owned_tmpdir
from vmpod.paths import Paths

MAX_UNPACKED = 32 << 30  # bytes an archive may unpack to
MAX_PROCESSES = 100_000
MAX_HITS = 100
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}
SOCK_TYPES = {1: "stream", 2: "dgram", 3: "raw", 5: "seqpacket"}
PROTOS = {6: "tcp", 17: "udp", 132: "sctp", 136: "udplite", 1: "icmp", 58: "icmpv6"}
# files.img: the field holding each file type's entry
FILE_FIELDS = {
    "REG": "reg",
    "PIPE": "pipe",
    "FIFO": "fifo",
    "INETSK": "isk",
    "UNIXSK": "usk",
    "NETLINKSK": "nlsk",
    "PACKETSK": "psk",
    "EVENTFD": "efd",
    "EVENTPOLL": "epfd",
    "SIGNALFD": "sgfd",
    "TIMERFD": "tfd",
    "INOTIFY": "ify",
    "FANOTIFY": "ffy",
    "TTY": "tty",
    "MEMFD": "memfd",
    "TUNF": "tunf",
    "EXT": "ext",
}
# pre-files.img images: (image, type)
LEGACY_FILES = (
    ("reg-files.img", "REG"),
    ("pipes.img", "PIPE"),
    ("inetsk.img", "INETSK"),
    ("unixsk.img", "UNIXSK"),
)


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    pgid: int
    sid: int
    comm: str
    threads: tuple[int, ...]
    uid: int | None
    gid: int | None
    exe: str
    cwd: str
    root: str
    argv: tuple[str, ...]
    env: tuple[str, ...]


@dataclass(frozen=True)
class OpenFile:
    pid: int
    fd: int
    type: str  # CRIU's file type: REG, PIPE, INETSK, UNIXSK, ...
    name: str  # a path, pipe:[id], socket:[inode], or type:[id]
    pos: int | None  # the file offset (regular files)
    mode: str  # r, w, rw (+append)
    cloexec: bool


@dataclass(frozen=True)
class Socket:
    pid: int
    fd: int
    family: str  # inet, inet6, unix
    type: str  # stream, dgram, ...
    proto: str  # tcp, udp, "" (unix)
    state: str
    local: str
    remote: str
    inode: int


@dataclass(frozen=True)
class Mount:
    mnt_id: int
    parent_id: int
    mountpoint: str
    fstype: str
    source: str
    root: str
    options: str
    readonly: bool


@dataclass(frozen=True)
class MemoryHit:
    pid: int
    comm: str
    address: int
    match: str  # printable, non-ASCII bytes escaped
    context: str  # a few bytes each side, non-printable ones as dots; the match in [ ]


@dataclass(frozen=True)
class Findings:
    """What the images of one checkpoint say."""

    processes: tuple[Process, ...]
    files: tuple[OpenFile, ...]
    sockets: tuple[Socket, ...]
    mounts: tuple[Mount, ...]
    hostname: str
    hits: tuple[MemoryHit, ...] = ()
    hits_truncated: bool = False  # more hits than --max-hits
    warnings: tuple[str, ...] = ()  # images that could not be read, pages not dumped


@dataclass(frozen=True)
class Inspection:
    archive: str
    container: dict[str, str]
    captured: str
    host: str
    guest_kernel: str
    criu: str
    search: str | None
    findings: Findings
    verified: bool = True  # False: a podman/Kubernetes archive (no manifest, no digests)

    def to_json(self) -> dict[str, object]:
        """Stable keys for machines (addresses as integers): the archive's facts,
        then processes, files, sockets, mounts, hostname, hits, hits_truncated, warnings."""
        out = asdict(self)
        out.update(out.pop("findings"))
        return out


# -- typed access to decoded entries -----------------------------------------------------


def _int(e: Entry, key: str, default: int = 0) -> int:
    v = e.get(key, default)
    if type(v) is not int:
        raise ForensicsError(f"a CRIU entry's '{key}' is not an integer")
    return v


def _str(e: Entry, key: str) -> str:
    v = e.get(key, "")
    return v if isinstance(v, str) else ""


def _obj(e: Entry, key: str) -> Entry:
    v = e.get(key)
    return v if isinstance(v, dict) else {}


def _task_id(e: Entry, key: str) -> int:
    """pstree's pid/pgid/sid, or the first of ns_<key> (images of nested pid namespaces)."""
    if key in e:
        return _int(e, key)
    ns = e.get(f"ns_{key}")
    if isinstance(ns, list) and ns and type(ns[0]) is int:
        return ns[0]
    raise ForensicsError(f"pstree.img: an entry has no {key}")


# -- the report ----------------------------------------------------------------------


class _Reader:
    def __init__(self, images: Images) -> None:
        self.im = images
        self.files = self._file_table()

    def _file_table(self) -> dict[int, tuple[str, Entry]]:
        table: dict[int, tuple[str, Entry]] = {}
        for e in self.im.entries("files.img") or []:
            typ = _str(e, "type")
            table[_int(e, "id")] = (typ, _obj(e, FILE_FIELDS.get(typ, "")))
        for image, typ in LEGACY_FILES:  # CRIU before 3.15 kept one image per type
            if not self.im.has("files.img"):
                for e in self.im.entries(image) or []:
                    table.setdefault(_int(e, "id"), (typ, e))
        return table

    def path_of(self, file_id: int) -> str:
        typ, e = self.files.get(file_id, ("", {}))
        return _str(e, "name") if typ == "REG" else ""

    def processes(self) -> list[tuple[Process, int]]:
        """The tree in pstree order, each with its fd table's id."""
        tree = self.im.entries("pstree.img", required=True) or []
        if len(tree) > MAX_PROCESSES:
            raise ForensicsError(f"pstree.img lists more than {MAX_PROCESSES} processes")
        out = []
        seen: set[int] = set()
        for e in tree:
            pid = _task_id(e, "pid")
            if pid in seen:
                raise ForensicsError(f"pstree.img lists pid {pid} twice")
            seen.add(pid)
            threads = e.get("threads")
            core = self.im.first(f"core-{pid}.img") or {}
            tc, creds = _obj(core, "tc"), _obj(_obj(core, "thread_core"), "creds")
            ids = self.im.first(f"ids-{pid}.img") or {}
            fs = self.im.first(f"fs-{pid}.img") or {}
            mm = self.im.first(f"mm-{pid}.img") or {}
            argv, env = self._argv_env(pid, mm)
            proc = Process(
                pid=pid,
                ppid=_int(e, "ppid"),
                pgid=_task_id(e, "pgid"),
                sid=_task_id(e, "sid"),
                comm=_str(tc, "comm"),
                threads=tuple(t for t in threads if type(t) is int) if isinstance(threads, list) else (pid,),
                uid=_int(creds, "uid") if "uid" in creds else None,
                gid=_int(creds, "gid") if "gid" in creds else None,
                exe=self.path_of(_int(mm, "exe_file_id", -1)),
                cwd=self.path_of(_int(fs, "cwd_id", -1)),
                root=self.path_of(_int(fs, "root_id", -1)),
                argv=argv,
                env=env,
            )
            out.append((proc, _int(ids, "files_id", pid)))
        return out

    def memory(self, pid: int) -> Memory | None:
        pagemap = self.im.entries(f"pagemap-{pid}.img")
        if pagemap is None:
            return None
        try:
            return Memory.load(self.im.root, list(pagemap), f"pagemap-{pid}.img")
        except ForensicsError as err:
            self.im.warn(err.message)
            return None

    def _argv_env(self, pid: int, mm: Entry) -> tuple[tuple[str, ...], tuple[str, ...]]:
        mem = self.memory(pid) if mm else None
        if mem is None:
            return (), ()
        got = []
        for start, end in (("mm_arg_start", "mm_arg_end"), ("mm_env_start", "mm_env_end")):
            lo, hi = _int(mm, start), _int(mm, end)
            data = mem.read(lo, hi - lo) if 0 < lo <= hi else None
            if data is None and hi > lo:
                self.im.warn(f"pid {pid}: {start[3:6]} at {lo:#x} was not dumped")
            got.append(strings(data or b""))
        return got[0], got[1]

    def fds(self, pid: int, files_id: int) -> tuple[list[OpenFile], list[Socket]]:
        fdinfo = self.im.entries(f"fdinfo-{files_id}.img")
        if fdinfo is None:
            return [], []
        files, sockets = [], []
        for e in fdinfo:
            fd, fid, typ = _int(e, "fd"), _int(e, "id"), _str(e, "type")
            _ftyp, f = self.files.get(fid, (typ, {}))
            flags = _int(f, "flags")
            mode = {0: "r", 1: "w", 2: "rw"}.get(flags & 3, "?") + ("+append" if flags & 0o2000 else "")
            pos = _int(f, "pos") if typ in ("REG", "MEMFD") and "pos" in f else None
            name = self._describe(typ, fid, f)
            files.append(OpenFile(pid, fd, typ, name, pos, mode, bool(_int(e, "flags") & 1)))
            if typ in ("INETSK", "UNIXSK"):
                sockets.append(self._socket(pid, fd, typ, f))
        return files, sockets

    def _describe(self, typ: str, fid: int, f: Entry) -> str:
        if typ == "REG":
            return _str(f, "name")
        if typ in ("PIPE", "FIFO"):
            return f"pipe:[{_int(f, 'pipe_id')}]"
        if typ in ("INETSK", "UNIXSK"):
            return f"socket:[{_int(f, 'ino')}]"
        return f"{typ.lower()}:[{fid}]"

    def _socket(self, pid: int, fd: int, typ: str, f: Entry) -> Socket:
        stype = SOCK_TYPES.get(_int(f, "type"), str(_int(f, "type")))
        ino = _int(f, "ino")
        if typ == "UNIXSK":
            name = _unix_name(_str(f, "name"))
            peer = _int(f, "peer")
            state = TCP_STATES.get(_int(f, "state"), str(_int(f, "state")))
            return Socket(pid, fd, "unix", stype, "", state, name, f"peer:[{peer}]" if peer else "", ino)
        family = _int(f, "family")
        fam = "inet6" if family == socket.AF_INET6 else "inet"
        proto = PROTOS.get(_int(f, "proto"), str(_int(f, "proto")))
        state = TCP_STATES.get(_int(f, "state"), str(_int(f, "state")))
        local = _endpoint(f.get("src_addr"), _int(f, "src_port"), fam)
        remote = _endpoint(f.get("dst_addr"), _int(f, "dst_port"), fam)
        return Socket(pid, fd, fam, stype, proto, state, local, remote, ino)

    def mounts(self, root_pid: int) -> list[Mount]:
        ids = self.im.first(f"ids-{root_pid}.img") or {}
        name = f"mountpoints-{_int(ids, 'mnt_ns_id', -1)}.img"
        entries = self.im.entries(name)
        if entries is None:
            return []
        out = [
            Mount(
                mnt_id=_int(e, "mnt_id"),
                parent_id=_int(e, "parent_mnt_id"),
                mountpoint=_str(e, "mountpoint"),
                fstype=_str(e, "fsname") or _str(e, "fstype_name") or str(_int(e, "fstype")),
                source=_str(e, "source"),
                root=_str(e, "root"),
                options=_str(e, "options"),
                readonly=bool(_int(e, "flags") & 1),  # MS_RDONLY
            )
            for e in entries
        ]
        return sorted(out, key=lambda m: (m.mountpoint, m.mnt_id))


def _unix_name(quoted: str) -> str:
    """A unix socket's name (pycriu gives it quoted-printable); abstract ones as @name."""
    raw = quopri.decodestring(quoted.encode())
    if raw.startswith(b"\0"):
        return "@" + printable(raw[1:])
    return printable(raw)


def _endpoint(addr: object, port: int, family: str) -> str:
    """address:port of an inet socket; CRIU keeps the address as the kernel's
    32-bit words in the dumping machine's byte order (x86: little-endian)."""
    words = [w for w in addr if type(w) is int and 0 <= w < 1 << 32] if isinstance(addr, list) else []
    try:
        if family == "inet6" and len(words) == 4:
            host = "[" + socket.inet_ntop(socket.AF_INET6, struct.pack("<4I", *words)) + "]"
        elif family == "inet" and len(words) == 1:
            host = socket.inet_ntop(socket.AF_INET, struct.pack("<I", words[0]))
        else:
            host = "?"
    except (OSError, ValueError):
        host = "?"
    return f"{host}:{port}"


def search_pattern(text: str | None, regex: str | None) -> re.Pattern[bytes] | None:
    """The pattern of --search (a literal) or --search-regex (Python re, bytes)."""
    if text is not None and regex is not None:
        raise ForensicsError("give --search or --search-regex, not both")
    if text is not None:
        if not text:
            raise ForensicsError("--search needs a non-empty string")
        return re.compile(re.escape(text.encode()))
    if regex is not None:
        try:
            pattern = re.compile(regex.encode())
        except re.error as err:
            raise ForensicsError(f"--search-regex {regex!r} is not a valid expression: {err}") from None
        if pattern.fullmatch(b""):
            raise ForensicsError(f"--search-regex {regex!r} matches the empty string")
        return pattern
    return None


def root_mode(root: Path) -> int | None:
    """The permission bits CRIU recorded for the first task's root directory (a
    restore fails unless the new root has them), if the images say."""
    images = decode(root)
    tree = images.entries("pstree.img", required=True) or []
    if not tree:
        return None
    fs = images.first(f"fs-{_task_id(tree[0], 'pid')}.img") or {}
    typ, entry = _Reader(images).files.get(_int(fs, "root_id", -1), ("", {}))
    mode = entry.get("mode")
    if typ != "REG" or type(mode) is not int or not stat.S_ISDIR(mode):
        return None
    return stat.S_IMODE(mode)


def inspect_dir(root: Path, pattern: re.Pattern[bytes] | None = None, max_hits: int = MAX_HITS) -> Findings:
    """Everything inspection shows of the CRIU image directory ``root``."""
    images = decode(root)
    r = _Reader(images)
    procs = r.processes()
    files: list[OpenFile] = []
    sockets: list[Socket] = []
    for proc, files_id in procs:
        f, s = r.fds(proc.pid, files_id)
        files += f
        sockets += s
    hits, truncated = _search(r, [p for p, _ in procs], pattern, max_hits) if pattern else ([], False)
    uts = next((e for n in images.names("utsns-") for e in images.entries(n) or []), {})
    return Findings(
        processes=tuple(p for p, _ in procs),
        files=tuple(files),
        sockets=tuple(sockets),
        mounts=tuple(r.mounts(procs[0][0].pid) if procs else ()),
        hostname=_str(uts, "nodename"),
        hits=tuple(hits),
        hits_truncated=truncated,
        warnings=tuple(images.warnings),
    )


def _search(
    r: _Reader, procs: list[Process], pattern: re.Pattern[bytes], max_hits: int
) -> tuple[list[MemoryHit], bool]:
    """Up to ``max_hits`` hits in the processes' pages, in tree order; and whether
    there were more."""
    hits: list[MemoryHit] = []
    for proc in procs:
        mem = r.memory(proc.pid)
        for h in mem.search(pattern, max_hits - len(hits) + 1) if mem is not None else ():
            if len(hits) == max_hits:
                return hits, True
            hits.append(_hit(proc, h))
    return hits, False


def _hit(proc: Process, h: Hit) -> MemoryHit:
    context = dotted(h.before) + "[" + printable(h.match) + "]" + dotted(h.after)
    return MemoryHit(proc.pid, proc.comm, h.address, printable(h.match), context)


def inspect_archive(
    paths: Paths,
    archive: Path,
    *,
    search: tuple[str, re.Pattern[bytes]] | None = None,
    max_hits: int = MAX_HITS,
    max_bytes: int = MAX_UNPACKED,
) -> Inspection:
    """Verify ``archive``, unpack it into an owned temp dir, and inspect its images;
    ``search``: (what the user asked for, its pattern)."""
    if not archive.is_file():
        raise ForensicsError(f"{archive} is not a file", hint="name an archive of vmpod forensics capture")
    paths.tmp.mkdir(parents=True, exist_ok=True)
    with owned_tmpdir(paths.tmp, "inspect-") as tmp:
        unpacked = tmp / "archive"
        unpacked.mkdir()
        manifest = a.extract(a.plain_tar(archive, tmp, max_bytes), unpacked, max_bytes)
        images_dir = unpacked / a.CHECKPOINT_DIR
        if not (images_dir / "inventory.img").is_file():
            raise ForensicsError(f"{archive} holds no CRIU images (checkpoint/inventory.img)")
        findings = inspect_dir(images_dir, search[1] if search else None, max_hits)
    if manifest is None:  # what podman's and Kubernetes' archives do not say is unknown
        return Inspection(str(archive), {}, "?", "?", "?", "", search[0] if search else None, findings, False)
    return Inspection(
        archive=str(archive),
        container=dict(manifest.container),
        captured=manifest.captured,
        host=manifest.host,
        guest_kernel=manifest.guest_kernel,
        criu=manifest.criu,
        search=search[0] if search else None,
        findings=findings,
    )
